"""QArray: layout, nbytes, MLX bit-exactness, jit/vmap/grad, shardings, orbax round trip."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.core import packing

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_bit_exact_with_mlx(bits, group_size):
    mx = pytest.importorskip("mlx.core")
    w = rand(1024, 384)  # large enough that a reciprocal-multiply shortcut would show
    wq, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    # MLX stores scales in the weight's dtype; jaxq's default is float16, so ask for float32.
    qa = jaxq.quantize(jnp.asarray(w), bits=bits, group_size=group_size, scale_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(qa.packed), np.array(wq))
    np.testing.assert_array_equal(np.asarray(qa.scales), np.array(scales))
    np.testing.assert_array_equal(np.asarray(qa.biases), np.array(biases))
    ref = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.array(ref))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("wdtype, sdtype, eps", [(jnp.bfloat16, jnp.bfloat16, 2**-7),
                                                  (jnp.float32, jnp.float16, 2**-10)])
def test_mlx_dequantizes_jaxq_default_scales(bits, wdtype, sdtype, eps):
    """The default scale dtype (float16; bfloat16 for a bf16 weight) is one MLX reads."""
    mx = pytest.importorskip("mlx.core")
    w = rand(16, 256)
    qa = jaxq.quantize(jnp.asarray(w, wdtype), bits=bits, group_size=64)
    assert qa.scales.dtype == sdtype and qa.biases.dtype == sdtype
    mdt = {jnp.bfloat16: mx.bfloat16, jnp.float16: mx.float16}[sdtype]
    ref = mx.dequantize(mx.array(np.asarray(qa.packed)),
                        mx.array(np.asarray(qa.scales.astype(jnp.float32))).astype(mdt),
                        mx.array(np.asarray(qa.biases.astype(jnp.float32))).astype(mdt),
                        group_size=64, bits=bits)
    # MLX rounds scale*q to the scale dtype before adding the bias; jaxq dequantizes in f32.
    # They agree to that rounding of the largest term; jaxq agrees with float64 exactly.
    ours = np.asarray(qa.dequantize(jnp.float32))
    np.testing.assert_allclose(ours, np.array(ref.astype(mx.float32)), atol=eps * np.abs(w).max())
    codes = np.asarray(qa.codes(), np.float64).reshape(16, 4, 64)
    exact = codes * np.asarray(qa.scales, np.float64)[..., None] + np.asarray(
        qa.biases, np.float64)[..., None]
    np.testing.assert_allclose(ours, exact.reshape(16, 256).astype(np.float32), rtol=1e-6,
                               atol=1e-6)


def test_layout_nbytes_and_shapes():
    w = rand(48, 256)
    qa = jaxq.quantize(jnp.asarray(w), bits=3, group_size=64)
    assert qa.shape == (48, 256) and qa.packed.shape == (48, 256 * 3 // 32)
    assert qa.scales.shape == (48, 4) and qa.biases.shape == (48, 4)
    assert qa.nbytes == 48 * 24 * 4 + 2 * 48 * 4 * 2  # float16 scales and biases by default
    # Input axis first (flax kernel layout): stored transposed, logical shape unchanged.
    qk = jaxq.quantize(jnp.asarray(w.T), bits=4, group_size=64, axis=0)
    assert qk.shape == (256, 48) and qk.packed.shape == (48, 32) and qk.axis == -2
    np.testing.assert_allclose(np.asarray(qk.dequantize()), np.asarray(
        jaxq.quantize(jnp.asarray(w), bits=4, group_size=64).dequantize()).T)


@pytest.mark.parametrize("group_size", ["channel", "tensor", 32])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_granularities_and_error_bound(group_size, symmetric, scale_dtype):
    w = rand(8, 96)
    qa = jaxq.quantize(jnp.asarray(w), bits=4, group_size=group_size, symmetric=symmetric,
                       scale_dtype=scale_dtype)
    assert qa.scales.dtype == scale_dtype
    expected_scales = {"channel": (8, 1), "tensor": (1, 1), 32: (8, 3)}[group_size]
    assert qa.scales.shape == expected_scales
    assert qa.granularity == {"channel": "channel", "tensor": "tensor", 32: "group"}[group_size]
    gs = 96 if group_size in ("channel", "tensor") else 32
    wg = w.reshape(8, 96 // gs, gs) if group_size != "tensor" else w.reshape(1, 1, -1)
    deq = np.asarray(qa.dequantize()).reshape(wg.shape)
    scale = np.asarray(qa.scales, np.float64)[..., None]
    bias = np.asarray(qa.biases, np.float64)[..., None]
    lo = np.minimum(bias, bias + 15 * scale)
    hi = np.maximum(bias, bias + 15 * scale)
    # Low-precision scales are rounded after the range is fixed: allow that rounding.
    slack = 1e-6 if scale_dtype == jnp.float32 else 2**-7 * np.abs(w).max()
    inside = (wg >= lo) & (wg <= hi)
    err = np.abs(deq - wg)
    # Inside the grid's span, rounding to nearest is off by at most half a step ...
    bound = np.broadcast_to(np.abs(scale) / 2 * (1 + 1e-5) + slack, wg.shape)
    assert (err[inside] <= bound[inside]).all()
    # ... outside it (MLX's rule shifts the far edge to keep zero exact) values clip to the edge,
    # never more than one step away.
    clipped = np.clip(wg, lo, hi)
    np.testing.assert_allclose(deq[~inside], clipped[~inside], atol=slack + 1e-6)
    assert (np.abs(clipped - wg) <= np.abs(scale) + slack).all()


def test_default_scale_dtype_and_bits_per_weight():
    """float16 scales by default: 4-bit g32 of a float32 weight stores 5 bits per weight, not 6
    (float32 scales), and float16 costs nothing measurable in error."""
    w = jnp.asarray(rand(64, 512))
    qa = jaxq.quantize(w, bits=4, group_size=32)
    assert qa.scales.dtype == jnp.float16 and 8 * qa.nbytes / w.size == 5.0
    q32 = jaxq.quantize(w, bits=4, group_size=32, scale_dtype=jnp.float32)
    assert 8 * q32.nbytes / w.size == 6.0
    err16 = float(jnp.mean((qa.dequantize() - w) ** 2))
    err32 = float(jnp.mean((q32.dequantize() - w) ** 2))
    assert err16 < 1.01 * err32
    assert jaxq.quantize(w.astype(jnp.bfloat16), bits=4).scales.dtype == jnp.bfloat16
    # a float32 weight beyond float16's range keeps float32 scales (its biases would be inf)
    big = jaxq.quantize(w * 1e5, bits=4, group_size=32)
    assert big.scales.dtype == jnp.float32 and bool(jnp.isfinite(big.biases).all())


def test_symmetric_stores_bias_as_minus_zero_times_scale():
    qa = jaxq.quantize(jnp.asarray(rand(4, 64)), bits=4, group_size=32, symmetric=True)
    np.testing.assert_allclose(np.asarray(qa.biases), -8 * np.asarray(qa.scales), rtol=1e-6)


def test_jit_vmap_and_grad():
    w = jnp.asarray(rand(3, 16, 64))  # a stack of three (out, in) matrices
    # float32 scales: the gradient check below is exact to float32, not float16
    qa = jaxq.quantize(w, bits=4, group_size=32, scale_dtype=jnp.float32)
    assert qa.shape == (3, 16, 64)
    dense = qa.dequantize()
    # jit may fuse scale * q + bias into an FMA: equal up to one rounding.
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    close(jax.jit(lambda q: q.dequantize())(qa), dense)
    close(jax.vmap(lambda q: q.dequantize())(qa), dense)
    sliced = jax.tree.map(lambda a: a[1], qa)
    assert sliced.shape == (16, 64)
    np.testing.assert_array_equal(np.asarray(sliced.dequantize()), dense[1])

    x = jnp.asarray(rand(64))
    loss = lambda q: jnp.sum(q.dequantize() @ x)
    grads = jax.grad(loss, allow_int=True)(qa)
    codes = np.asarray(qa.codes(), np.float32).reshape(3, 16, 2, 32)
    xs = np.asarray(x).reshape(2, 32)
    np.testing.assert_allclose(np.asarray(grads.scales), (codes * xs).sum(-1), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads.biases), np.broadcast_to(xs.sum(-1), (3, 16, 2)),
                               rtol=1e-5)


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"dense": {"kernel": jaxq.quantize(jnp.asarray(rand(64, 32)), bits=3,
                                                group_size=32, axis=0)},
              "bias": jnp.arange(3.0)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                            params))
    q0, q1 = params["dense"]["kernel"], restored["dense"]["kernel"]
    assert isinstance(q1, jaxq.QArray) and (q1.bits, q1.axis, q1.group_size) == (3, -2, 32)
    np.testing.assert_array_equal(np.asarray(q1.dequantize()), np.asarray(q0.dequantize()))


def test_keeps_shardings():
    # Needs several host devices, which must be configured before jax starts: run apart.
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, jaxq
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((4,), ("x",))
        w = jax.device_put(jnp.asarray(np.random.randn(64, 128), jnp.float32),
                           NamedSharding(mesh, P("x", None)))
        qa = jaxq.quantize(w, bits=4, group_size=32)
        for leaf in (qa.packed, qa.scales, qa.biases):
            assert leaf.sharding.spec[0] == "x", leaf.sharding
        out = jax.jit(lambda q: q.dequantize())(qa)
        assert out.sharding.spec[0] == "x", out.sharding
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_packed_width_supports_odd_axis_per_channel():
    w = rand(5, 70)  # 70 * 3 bits is not a whole number of words
    qa = jaxq.quantize(jnp.asarray(w), bits=3, group_size="channel")
    assert qa.packed.shape == (5, packing.packed_width(70, 3))
    assert np.abs(np.asarray(qa.dequantize()) - w).max() <= np.abs(np.asarray(qa.scales)).max()


@pytest.mark.parametrize("bad,match", [
    (dict(bits=9), "unsupported bit width"),
    (dict(group_size=48), "does not divide"),
])
def test_bad_configuration_errors_name_the_tensor(bad, match):
    kwargs = dict(bits=4, group_size=32, name="layer7/w") | bad
    with pytest.raises(ValueError, match=match) as info:
        jaxq.quantize(jnp.asarray(rand(4, 64)), **kwargs)
    assert "layer7/w" in str(info.value)


def test_nan_and_non_float_errors():
    w = rand(4, 64)
    w[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        jaxq.quantize(jnp.asarray(w), bits=4, group_size=32, name="blk/w")
    with pytest.raises(TypeError, match="only float leaves"):
        jaxq.quantize(jnp.ones((4, 64), jnp.int32), bits=4, group_size=32)
