"""QAT on models written four ways (plain function, Flax Linen, Flax NNX, Equinox): a few
optax steps reduce a distillation loss, and the converted QArray tree run by ``jaxq.apply``
gives the fake-quant model's outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tinyllama import tiny_llama

import jaxq
from jaxq.qat import QAT, labels, partition

D_IN, D_H, D_OUT = 32, 64, 16


def _x(n=64, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, D_IN))


def _check(apply_fn, params, n_selected=2):
    """Distil the float model into its 3-bit LSQ+ fake-quant self; convert; compare."""
    x = _x()
    teacher = apply_fn(params, x)
    qat = QAT(bits=3, group_size=16, estimator="lsq+")
    state = qat.init(params)
    is_state = lambda s: isinstance(s, jaxq.qat.QuantizerState)  # noqa: E731
    assert sum(map(is_state, jax.tree.leaves(state, is_leaf=is_state))) == n_selected
    train, frozen = partition(params, state)
    tx = optax.multi_transform({"weights": optax.adam(1e-3), "quantizer": optax.adam(1e-3)},
                               labels(train))
    opt_state = tx.init(train)

    def loss(t):
        p, s = jaxq.combine(t, frozen)
        return jnp.mean((apply_fn(qat.apply(p, s), x) - teacher) ** 2)

    @jax.jit
    def step(train, opt_state):
        value, g = jax.value_and_grad(loss)(train)
        upd, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, upd), opt_state, value

    losses = []
    for _ in range(8):
        train, opt_state, value = step(train, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses

    p, s = jaxq.combine(train, frozen)
    fake = apply_fn(qat.apply(p, s), x)
    converted = qat.convert(p, s)
    assert sum(isinstance(q, jaxq.QArray)
               for q in jax.tree.leaves(converted, is_leaf=jaxq.is_leaf)) == n_selected
    np.testing.assert_allclose(jaxq.apply(apply_fn)(converted, x), fake, rtol=1e-5, atol=1e-5)


def test_plain_function():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"w1": jax.random.normal(k[0], (D_H, D_IN)) / 6, "b1": jnp.zeros(D_H),
              "w2": jax.random.normal(k[1], (D_OUT, D_H)) / 8}

    def apply_fn(p, x):
        return jax.nn.relu(x @ p["w1"].T + p["b1"]) @ p["w2"].T

    _check(apply_fn, params)


def test_flax_linen():
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D_OUT)(nn.relu(nn.Dense(D_H)(x)))

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), _x(1))["params"]
    _check(lambda p, x: model.apply({"params": p}, x), params)


def test_flax_nnx():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(D_IN, D_H, rngs=rngs)
            self.down = nnx.Linear(D_H, D_OUT, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    _check(lambda s, x: nnx.merge(graphdef, s)(x), state)


def test_equinox():
    import equinox as eqx

    model = eqx.nn.MLP(D_IN, D_OUT, D_H, depth=1, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _check(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params)


def test_activation_fake_quant_w4a8():
    """W4A8: per-token int8 activations at the weights' matmuls, through jaxq.apply; the
    training forward and the converted model agree, and gradients reach the latent weights."""
    from jaxq.quant.smoothquant import quantize_act

    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"w1": jax.random.normal(k[0], (D_H, D_IN)) / 6,
              "w2": jax.random.normal(k[1], (D_OUT, D_H)) / 8}

    def apply_fn(p, x):
        return jax.nn.relu(x @ p["w1"].T) @ p["w2"].T

    x = _x()
    xq, a = quantize_act(x)  # SmoothQuant's dynamic int8 rule, independently
    np.testing.assert_allclose(jaxq.qat.fake_quant_act(x, 8), xq.astype(jnp.float32) * a,
                               rtol=1e-6, atol=1e-7)
    qat = QAT(bits=4, group_size=16, estimator="lsq", act_bits=8)
    state = qat.init(params)
    run = jax.jit(jaxq.apply(apply_fn))
    fq = qat.apply(params, state)
    assert isinstance(fq["w1"], jaxq.qat.ActQuant)
    h = jnp.maximum(jaxq.qat.fake_quant_act(x, 8) @ fq["w1"].weight.T, 0)
    ref = jaxq.qat.fake_quant_act(h, 8) @ fq["w2"].weight.T
    np.testing.assert_allclose(run(fq, x), ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ref, apply_fn({k: v.weight for k, v in fq.items()}, x), atol=1e-4)

    teacher = apply_fn(params, x)
    train, frozen = partition(params, state)
    tx = optax.adam(1e-3)
    opt_state = tx.init(train)

    @jax.jit
    def step(train, opt_state):
        def loss(t):
            return jnp.mean((jaxq.apply(apply_fn)(qat.apply(*jaxq.combine(t, frozen)), x)
                             - teacher) ** 2)
        value, g = jax.value_and_grad(loss)(train)
        upd, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, upd), opt_state, value

    losses = []
    for _ in range(8):
        train, opt_state, value = step(train, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    p, s = jaxq.combine(train, frozen)
    converted = qat.convert(p, s)
    assert isinstance(converted["w1"].weight, jaxq.QArray)
    np.testing.assert_allclose(run(converted, x), run(qat.apply(p, s), x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_llama_continues_act_order_gptq():
    """The whole path on jaxq's llama: GPTQ (act-order) through jaxq.calibrate, QAT from it
    (step 0 is the GPTQ model's logits), a few KD steps lower the KL, convert matches."""
    from jaxq.models import llama

    cfg, params = tiny_llama(1, scale=0.15, vocab_size=128)
    apply_fn = llama.make_apply_fn(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 0, 128)
    ptq, _ = jaxq.calibrate(apply_fn, params, [toks],
                            jaxq.GPTQ(bits=3, group_size=32, act_order=True), progress=False)
    latent = jaxq.qat.latent_from(ptq)
    qat = QAT(estimator="lsq+")
    state = qat.init(latent, from_=ptq)
    run = jax.jit(jaxq.apply(apply_fn))
    np.testing.assert_allclose(apply_fn(qat.apply(latent, state), toks), run(ptq, toks),
                               atol=2e-5)

    teacher = jax.nn.log_softmax(apply_fn(params, toks))
    train, frozen = partition(latent, state)
    tx = optax.adam(1e-4)
    opt_state = tx.init(train)

    def kl(t):
        logp = jax.nn.log_softmax(apply_fn(qat.apply(*jaxq.combine(t, frozen)), toks))
        return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - logp), -1))

    @jax.jit
    def step(train, opt_state):
        value, g = jax.value_and_grad(kl)(train)
        upd, opt_state = tx.update(g, opt_state, train)
        return optax.apply_updates(train, upd), opt_state, value

    losses = []
    for _ in range(6):
        train, opt_state, value = step(train, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.97 * losses[0], losses
    p, s = jaxq.combine(train, frozen)
    np.testing.assert_allclose(run(qat.convert(p, s), toks), apply_fn(qat.apply(p, s), toks),
                               atol=2e-5)
