"""One way to run calibrated transforms: ``jaxq.calibrate`` folds AWQ with the groups found
from the trace (equal to the Llama names), hands scaled statistics down a chain, refuses modes
a step cannot run in; ragged batches and padding masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tinyllama import tiny_llama

import jaxq
from jaxq.models import llama
from jaxq.models.llama import llama_scale_groups


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_traced_groups_equal_the_llama_names(kv_heads):
    cfg, params = tiny_llama(scale=0.2, vocab_size=32, hidden_size=32, intermediate_size=48,
                             num_kv_heads=kv_heads, head_dim=8, attention_bias=True,
                             tie_word_embeddings=True)
    tokens = jnp.arange(16).reshape(2, 8) % 32

    def apply_fn(p, t):  # attention in blocks of 4: sliced and concatenated values
        return llama.forward(p, t, cfg, attn_block=4)

    traced = jaxq.calib.scale_groups(apply_fn, params, tokens)
    named = llama_scale_groups(params, head_dim=8)

    def key(g):
        return (g.sites, g.prev, g.prev_kind, g.prev_bias,
                tuple(g.channel_index(32 if "o_proj" in g.sites[0] else 32)))

    assert sorted(map(key, traced)) == sorted(map(key, named))
    assert any(g.index is not None for g in traced) == (kv_heads != 4)


def _tiny():
    """norm -> fc1 -> relu -> fc2 on inputs with outlier channels (AWQ's case)."""
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.normal(size=s).astype(np.float32))  # noqa: E731
    params = {"norm": {"weight": 1 + 0.1 * f(64)}, "fc1": {"weight": f(96, 64) / 8},
              "fc2": {"weight": f(32, 96) / 10}}

    def apply_fn(p, x):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * p["norm"]["weight"]
        return jax.nn.relu(h @ p["fc1"]["weight"].T) @ p["fc2"]["weight"].T

    xs = []
    for _ in range(4):
        x = r.normal(size=(64, 64)).astype(np.float32)
        x[:, [3, 11, 40]] *= 25
        xs.append(jnp.asarray(x))
    return apply_fn, params, xs


@pytest.mark.slow
def test_awq_then_gptq_through_calibrate_folds():
    apply_fn, params, xs = _tiny()
    gptq = jaxq.GPTQ(bits=3, group_size=32)
    plain, _ = jaxq.calibrate(apply_fn, params, xs, gptq, progress=False)
    with pytest.warns(UserWarning, match="fc2/weight"):  # behind a relu: nothing to fold into
        both, _ = jaxq.calibrate(apply_fn, params, xs,
                                 jaxq.chain(jaxq.AWQ(bits=3, group_size=32, scale_only=True),
                                            gptq), progress=False)
    assert not np.array_equal(plain["fc1"]["weight"].packed, both["fc1"]["weight"].packed)
    assert not np.allclose(both["norm"]["weight"], params["norm"]["weight"])

    def err(q):
        return float(sum(jnp.sum((jaxq.apply(apply_fn)(q, x) - apply_fn(params, x)) ** 2)
                         for x in xs))

    assert err(both) < 0.9 * err(plain)


def test_a_step_that_cannot_run_sequentially_is_an_error():
    apply_fn, params, xs = _tiny()
    with pytest.raises(ValueError, match="AWQ folds scales"):
        jaxq.calibrate(apply_fn, params, xs, jaxq.chain(
            jaxq.AWQ(scale_only=True, group_size=32), jaxq.GPTQ(group_size=32)),
            sequential=True, progress=False)


def test_ragged_masked_statistics_equal_the_unpadded_tokens():
    r = np.random.default_rng(1)
    w = jnp.asarray(r.normal(size=(8, 16)).astype(np.float32))

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"].T)

    batches, masks, real = [], [], []
    for b, t in ((2, 5), (3, 7), (1, 4)):  # ragged: each batch its own length
        x = r.normal(size=(b, t, 16)).astype(np.float32)
        x[..., 2] *= 30
        m = r.random((b, t)) < 0.6
        m[:, 0] = True
        x[~m] = 1e3  # padding that would dominate every statistic if counted
        batches.append(jnp.asarray(x))
        masks.append(jnp.asarray(m))
        real.append(x[m].astype(np.float64))
    _, stats = jaxq.calibrate(apply_fn, {"w": w}, batches, mask=masks, progress=False,
                              collectors=["gram", "mean_abs", "absmax", "sq_norm", "count"])
    rows = np.concatenate(real)
    st = stats["w"]
    np.testing.assert_allclose(st["gram"], rows.T @ rows, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(st["mean_abs"], np.abs(rows).mean(0), rtol=1e-5)
    np.testing.assert_allclose(st["absmax"], np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(st["sq_norm"], (rows * rows).sum(0), rtol=1e-5)
    assert float(st["count"]) == len(rows)
