"""The compressed-leaf protocol: a new leaf type is one class plus its registration, and then
runs, saves, loads, reports its size, exports dense and trains without touching jaxq."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq.core.leaf import Leaf, register_leaf
from jaxq.eval.size import size_report
from jaxq.export.common import flat_params


@register_leaf("test-rank1")
@dataclasses.dataclass(frozen=True, eq=False)
class Rank1(Leaf):
    """A test leaf: ``W = outer(u, v)`` for an ``(out, in)`` weight, run as two products."""

    u: jax.Array
    v: jax.Array
    dtype: Any = jnp.float32
    axis: int = -1

    _CHILDREN = ("u", "v")
    kind = "rank-1"
    reachable: ClassVar[dict] = {"v": (-1, True)}
    calls: ClassVar[list] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.u.shape[-1], self.v.shape[-1])

    def materialize(self, dtype: Any = None) -> jax.Array:
        return jnp.outer(self.u, self.v).astype(dtype or self.dtype)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        Rank1.calls.append(x.shape)
        return ((x @ self.v)[..., None] * self.u).astype(x.dtype)


def _case():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"a": {"weight": Rank1(jax.random.normal(k[0], (16,)),
                                    jax.random.normal(k[1], (32,)))},
              "b": {"weight": jax.random.normal(k[2], (8, 16)) * 0.3}}
    x = jax.random.normal(k[3], (3, 32))
    return params, x


def _fn(params, x):
    h = jnp.tanh(x @ params["a"]["weight"].T)
    return h @ params["b"]["weight"].T


def test_new_leaf_runs_its_own_site_op_in_apply():
    params, x = _case()
    Rank1.calls.clear()
    got = jax.jit(jaxq.apply(_fn))(params, x)
    assert Rank1.calls == [(3, 32)]  # its matmul, not a dense fallback
    np.testing.assert_allclose(got, _fn(jaxq.materialize(params), x), rtol=1e-5, atol=1e-5)


def test_new_leaf_saves_loads_and_counts(tmp_path):
    params, x = _case()
    jaxq.save(tmp_path / "m", params)
    back, _ = jaxq.load(tmp_path / "m")
    leaf = back["a"]["weight"]
    assert isinstance(leaf, Rank1) and leaf.dtype == jnp.float32 and leaf.axis == -1
    np.testing.assert_array_equal(leaf.u, params["a"]["weight"].u)
    report = size_report(params)
    assert report.by_kind["rank-1"] == ((16 + 32) * 4, 16 * 32)
    assert report.total_bytes == (16 + 32) * 4 + 8 * 16 * 4
    assert flat_params(params)["a.weight"].shape == (16, 32)  # exporters get it dense


def test_unregistered_leaf_is_refused_by_save(tmp_path):
    @dataclasses.dataclass(frozen=True, eq=False)
    class Unsaved(Rank1):
        pass

    params, _ = _case()
    params["a"]["weight"] = Unsaved(params["a"]["weight"].u, params["a"]["weight"].v)
    with pytest.raises(TypeError, match="cannot save a Unsaved"):
        jaxq.save(tmp_path / "m", params)
    assert not (tmp_path / "m").exists()


def test_transforms_reach_the_reachable_children():
    params, _ = _case()
    out = jaxq.RTN(bits=8, group_size=32, where=lambda p, x: x.ndim == 2)(
        {"w": jax.tree.map(lambda c: jnp.tile(c, (2, 1)), params["a"]["weight"])})
    leaf = out["w"]
    assert isinstance(leaf, Rank1) and isinstance(leaf.v, jaxq.QArray)
    assert not isinstance(leaf.u, jaxq.QArray)  # not reachable


def test_optax_steps_on_quantized_scales_reduce_a_reconstruction_loss():
    """Gradients through compressed execution reach the scales and biases of QArrays (codes
    held fixed) and any optax optimizer trains them."""
    k = jax.random.split(jax.random.key(1), 3)
    w1 = jax.random.normal(k[0], (64, 64)) * 0.2
    w2 = jax.random.normal(k[1], (16, 64)) * 0.2
    x = jax.random.normal(k[2], (256, 64))
    fn = lambda p, x: jnp.tanh(x @ p["l1"].T) @ p["l2"].T  # noqa: E731
    target = fn({"l1": w1, "l2": w2}, x)
    # float32 scales: optax's Adam in float16 underflows its epsilon (train in f32, store f16)
    q = jaxq.RTN(bits=3, group_size=32, where=".*", scale_dtype=jnp.float32)({"l1": w1, "l2": w2})
    train, frozen = jaxq.partition(q)
    assert all(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(train))
    run = jaxq.apply(fn)

    @jax.jit
    def loss(t):
        return jnp.mean((run(jaxq.combine(t, frozen), x) - target) ** 2)

    opt = optax.adam(3e-3)
    state = opt.init(train)
    first = float(loss(train))
    for _ in range(30):
        grads = jax.grad(loss)(train)
        updates, state = opt.update(grads, state, train)
        train = optax.apply_updates(train, updates)
    trained = jaxq.combine(train, frozen)
    assert float(loss(train)) < 0.85 * first
    np.testing.assert_array_equal(trained["l1"].packed, q["l1"].packed)  # codes fixed
    assert not np.allclose(trained["l1"].scales, q["l1"].scales)


def test_mask_marks_float_children_for_optax_masked():
    q = jaxq.RTN(bits=4, group_size=32, where=".*")({"w": jnp.ones((8, 64)), "b": jnp.ones(8)})
    m = jaxq.mask(q)
    assert m["w"].scales is True and m["w"].packed is False and m["b"] is False
    m_all = jaxq.mask(q, where=lambda path, x: path == "b")
    assert m_all["b"] is True


def test_apply_keeps_remat_regions_and_dense_custom_rules():
    @jax.custom_vjp
    def scaled_grad(h):  # the model's own rule: gradient doubled
        return h

    scaled_grad.defvjp(lambda h: (h, None), lambda _, g: (2.0 * g,))

    def fn(p, x):
        blk = jax.checkpoint(lambda h, w: jnp.tanh(h @ w.T),
                             policy=jax.checkpoint_policies.nothing_saveable)
        return (scaled_grad(blk(x, p["a"])) @ p["dense"]).sum()

    k = jax.random.split(jax.random.key(2), 2)
    w = jax.random.normal(k[0], (64, 64)) * 0.1
    params = {"a": jaxq.quantize(w, bits=4, group_size=32), "dense": jnp.ones((64, 3))}
    x = jax.random.normal(k[1], (4, 64))
    run = jaxq.apply(fn)
    train, frozen = jaxq.partition(params, where=lambda path, x: True)
    loss = lambda t: run(jaxq.combine(t, frozen), x)  # noqa: E731
    assert [e.primitive.name for e in jax.make_jaxpr(loss)(train).eqns].count("remat2") == 1
    got = jax.grad(loss)(train)
    dense = jaxq.materialize(params)
    ref = jax.grad(lambda p: fn(p, x))(dense)
    np.testing.assert_allclose(got["dense"], ref["dense"], rtol=1e-5)
    # The doubled gradient reaches the scales: d loss / d scales from the dense gradient.
    _, vjp = jax.vjp(lambda s: dataclasses.replace(params["a"], scales=s).dequantize(),
                     params["a"].scales)
    np.testing.assert_allclose(got["a"].scales, vjp(ref["a"])[0], rtol=1e-4, atol=1e-5)


def test_partition_keeps_a_models_own_pairs():
    q = jaxq.quantize(jnp.ones((4, 32)), bits=4, group_size=32)
    params = {"layers": (q, jnp.ones(3)), "pair": (1.0, 2.0)}
    train, frozen = jaxq.partition(params, where=lambda path, x: path == "layers/1")
    back = jaxq.combine(train, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert train["layers"][1] is params["layers"][1] and frozen["pair"] == (1.0, 2.0)
