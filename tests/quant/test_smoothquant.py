"""SmoothQuant W8A8: exact int8 matmul, smoothing helps with outlier channels, exact folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.quant.awq import ScaleGroup
from jaxq.quant.smoothquant import (
    W8A8,
    SmoothQuant,
    int8_matmul,
    smooth_scales,
    w8a8_matmul,
    w8a8_quantize,
)

K, N_OUT = 64, 48
GROUPS = [ScaleGroup(sites=("fc/weight",), prev="norm/weight", prev_kind="norm")]


def tiny(seed=0):
    r = np.random.default_rng(seed)
    params = {"norm": {"weight": jnp.asarray(1 + 0.1 * r.normal(size=K), jnp.float32)},
              "fc": {"weight": jnp.asarray(r.normal(size=(N_OUT, K)) / 8, jnp.float32)}}
    x = r.normal(size=(128, K)).astype(np.float32)
    x[:, [2, 30, 50]] *= 40  # outlier channels survive the (per-token) norm
    return params, jnp.asarray(x)


def normed(p, x):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * p["norm"]["weight"]


def model(p, x, w8a8=True):
    h, w = normed(p, x), p["fc"]["weight"]
    if isinstance(w, W8A8) and w8a8:
        return w8a8_matmul(h, w)
    return h @ jaxq.dequantize(w).T


def stats_of(p, x):
    h = normed(p, x)
    return {"fc/weight": {"absmax": jnp.max(jnp.abs(h), axis=0)}}


def test_int8_matmul_exact():
    r = np.random.default_rng(1)
    a = r.integers(-127, 128, size=(5, 3, 256)).astype(np.int8)
    b = r.integers(-127, 128, size=(40, 256)).astype(np.int8)
    got = int8_matmul(jnp.asarray(a), jnp.asarray(b))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64).T)


def test_w8a8_matches_manual_int_pipeline():
    r = np.random.default_rng(2)
    w = r.normal(size=(N_OUT, K)).astype(np.float32)
    x = r.normal(size=(7, K)).astype(np.float32)
    q = w8a8_quantize(jnp.asarray(w))
    sw = np.abs(w).max(1) / 127
    wq = np.clip(np.round(w / sw[:, None]), -127, 127).astype(np.int64)
    np.testing.assert_array_equal(q.int8_weight(), wq)
    sx = np.abs(x).max(1, keepdims=True) / 127
    xq = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    want = (xq @ wq.T) * sx * sw
    np.testing.assert_allclose(w8a8_matmul(jnp.asarray(x), q), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.dequantize(), wq * sw[:, None], rtol=1e-6, atol=1e-7)


def test_w8a8_is_a_pytree_under_jit():
    q = w8a8_quantize(jnp.ones((8, 32)), act="static", act_absmax=jnp.full((32,), 3.0))
    leaves, tree = jax.tree.flatten(q)
    back = jax.tree.unflatten(tree, leaves)
    assert isinstance(back, W8A8) and back.act == "static"
    y = jax.jit(w8a8_matmul)(jnp.ones((2, 32)), q)
    np.testing.assert_allclose(y, 32.0, rtol=2e-2)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_smoothing_reduces_w8a8_error(act):
    params, x = tiny()
    ref, st = model(params, x), stats_of(params, x)
    err = lambda p: float(jnp.sum((model(p, x) - ref) ** 2) / jnp.sum(ref**2))  # noqa: E731
    plain = SmoothQuant(alpha=0.0, act=act, groups=GROUPS)(params, stats=st)
    smooth = SmoothQuant(alpha=0.5, act=act, groups=GROUPS)(params, stats=st)
    assert isinstance(smooth["fc"]["weight"], W8A8)
    assert err(smooth) < 0.5 * err(plain)


def test_smoothing_fold_alone_keeps_float_output():
    params, x = tiny()
    ref = model(params, x)
    sm = SmoothQuant(alpha=0.5, scale_only=True, groups=GROUPS)(params,
                                                                stats=stats_of(params, x))
    assert not np.allclose(sm["norm"]["weight"], params["norm"]["weight"])
    np.testing.assert_allclose(model(sm, x), ref, rtol=1e-5, atol=1e-5)


def test_unfolded_site_uses_input_scale():
    params, x = tiny()
    st = stats_of(params, x)["fc/weight"]
    h = normed(params, x)
    q = SmoothQuant(alpha=0.5).transform_leaf("fc/weight", params["fc"]["weight"], axis=-1,
                                              stats=st)
    assert q.input_scale is not None
    ref = h @ params["fc"]["weight"].T
    np.testing.assert_allclose(q.dequantize(), params["fc"]["weight"], atol=2e-2)
    assert float(jnp.sum((w8a8_matmul(h, q) - ref) ** 2) / jnp.sum(ref**2)) < 1e-3


def test_smooth_scales_formula():
    a = jnp.array([1.0, 4.0, 100.0])
    w = jnp.array([[1.0, -2.0, 0.5], [0.25, 1.0, -0.1]])
    np.testing.assert_allclose(smooth_scales(a, w, 0.5),
                               np.sqrt([1.0, 4.0, 100.0]) / np.sqrt([1.0, 2.0, 0.5]), rtol=1e-6)


def test_compressed_execution_runs_w8a8_sites_in_int8():
    """jaxq.apply sends a W8A8 leaf to the int8 matmul (not a float dequantize-at-use)."""
    import jaxq
    from jaxq.quant.smoothquant import w8a8_matmul, w8a8_quantize

    r = np.random.default_rng(3)
    w = jnp.asarray(r.standard_normal((16, 64)), jnp.float32)
    x = jnp.asarray(r.standard_normal((4, 64)) * 3, jnp.float32)
    params = {"lin": {"weight": w8a8_quantize(w)}}
    fn = lambda p, x: jnp.tanh(x @ p["lin"]["weight"].T)
    y = jax.jit(jaxq.apply(fn))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.tanh(np.asarray(
        w8a8_matmul(x, params["lin"]["weight"]))), rtol=1e-6, atol=1e-6)
    float_path = np.tanh(np.asarray(x) @ np.asarray(params["lin"]["weight"].dequantize()).T)
    assert np.abs(np.asarray(y) - float_path).max() > 1e-5  # activations were quantized
