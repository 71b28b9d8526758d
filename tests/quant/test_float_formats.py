"""NF4, FP8 and MX formats: MLX bit-exactness, numpy references, storage, jit, errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.core import packing
from jaxq.quant.float_formats import (
    DYNAMIC8,
    FP4_E2M1_VALUES,
    FP8,
    MX,
    NF4,
    NF4_CODEBOOK,
    fp8_quantize,
    mx_quantize,
    nf4_quantize,
)

RNG = np.random.default_rng(0)

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), as published with QLoRA.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def special_groups(rows, group, elem_max, ties):
    """Rows of groups holding 0, -0, the format's max, exact ties and tiny values."""
    w = rand(rows, group * 4)
    t = np.array(ties, np.float32)
    for r in range(rows):
        k = np.float32(2.0 ** (r - rows // 2))
        g0, g1 = w[r, :group], w[r, group:2 * group]
        g0[:], g1[:] = 0.0, 0.0
        g0[:4] = [elem_max * k, -elem_max * k, -0.0, 0.0]  # absmax exact: scale 2**k
        g0[4:4 + t.size] = t * k
        g1[0] = elem_max * k
        g1[1:1 + t.size] = -t * k
        g1[-1] = 2.0 ** -9 * k  # an FP8 subnormal after scaling
        w[r, 2 * group:3 * group] = 0.0  # an all-zero group
    return w


def mlx_ref(w, mode, global_scale=None):
    mx = pytest.importorskip("mlx.core")
    kw = {} if global_scale is None else {"global_scale": mx.array(np.float32(global_scale))}
    wq, scales = mx.quantize(mx.array(w), mode=mode, **kw)
    deq = mx.dequantize(wq, scales, mode=mode, dtype=mx.float32, **kw)
    return np.array(wq), np.array(scales), np.array(deq)


# --- MX: bit-exact against MLX -----------------------------------------------------------------

FP4_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 3.0, 5.5]
FP8_TIES = [1.0625, 1.1875, 3.25, 104.0, 208.0, 432.0, 2.0 ** -9 * 1.5, 2.0 ** -7 * 1.25]


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("shape", [(6, 128), (2, 3, 256)])
def test_mx_bit_exact_with_mlx(mode, shape):
    group, elem_max = (16 if mode == "nvfp4" else 32), (448.0 if mode == "mxfp8" else 6.0)
    w = rand(*shape, scale=0.05)
    flat = w.reshape(-1, shape[-1])
    ties = FP8_TIES if mode == "mxfp8" else FP4_TIES
    special = special_groups(4, group, elem_max, ties)
    flat[:4, :special.shape[1]] = special
    w = flat.reshape(shape)
    wq, scales, deq = mlx_ref(w, mode)
    qa = mx_quantize(jnp.asarray(w), mode=mode)
    np.testing.assert_array_equal(np.asarray(qa.packed), wq)
    np.testing.assert_array_equal(np.asarray(qa.scales), scales)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), deq)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mx_bit_exact_random_scales_and_dtypes(mode, dtype):
    """Magnitudes over 6 decades, in each weight dtype (MLX computes in the weight's dtype)."""
    mx = pytest.importorskip("mlx.core")
    w = rand(16, 96) * (10.0 ** RNG.uniform(-3, 2, size=(16, 1))).astype(np.float32)
    w_lp = np.asarray(jnp.asarray(w).astype(dtype).astype(jnp.float32))
    wq, scales = mx.quantize(mx.array(w_lp).astype(getattr(mx, dtype)), mode=mode)
    qa = mx_quantize(jnp.asarray(w_lp).astype(dtype), mode=mode)
    np.testing.assert_array_equal(np.asarray(qa.packed), np.array(wq))
    np.testing.assert_array_equal(np.asarray(qa.scales), np.array(scales))
    assert qa.dtype == jnp.dtype(dtype)


def test_nvfp4_global_scale_bit_exact():
    w = rand(8, 64, scale=1e-3)  # small weights: without a global scale E4M3 underflows
    gs = float(np.abs(w).max())
    wq, scales, deq = mlx_ref(w, "nvfp4", global_scale=gs)
    qa = mx_quantize(jnp.asarray(w), mode="nvfp4", global_scale=True)
    assert qa.biases.shape == (1, 1) and float(qa.biases[0, 0]) == np.float32(gs)
    np.testing.assert_array_equal(np.asarray(qa.packed), wq)
    np.testing.assert_array_equal(np.asarray(qa.scales), scales)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), deq)
    plain = mx_quantize(jnp.asarray(w), mode="nvfp4")
    err = lambda q: float(jnp.mean((q.dequantize() - w) ** 2))
    assert err(qa) < 0.1 * err(plain)


def test_mx_decode_matches_numpy_reference():
    w = rand(4, 64)
    for mode in ("mxfp4", "mxfp8", "nvfp4"):
        qa = mx_quantize(jnp.asarray(w), mode=mode)
        codes = np.asarray(qa.codes()).reshape(4, -1, qa.group_size)
        if mode == "mxfp8":
            vals = codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        else:
            vals = FP4_E2M1_VALUES[codes]
        s = np.asarray(qa.scales)
        scale = (s.view(ml_dtypes.float8_e4m3fn).astype(np.float32) if mode == "nvfp4"
                 else np.exp2(s.astype(np.float64) - 127).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                      (vals * scale[..., None]).reshape(4, 64))


def test_mx_input_axis_first_matches_transpose():
    w = rand(64, 24)  # flax (in, out) kernel
    qa = MX(mode="mxfp4")({"dense": {"kernel": jnp.asarray(w)}})["dense"]["kernel"]
    assert qa.shape == (64, 24) and qa.axis == -2
    ref = mx_quantize(jnp.asarray(w.T), mode="mxfp4")
    np.testing.assert_array_equal(np.asarray(qa.packed), np.asarray(ref.packed))
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(ref.dequantize()).T)


# --- FP8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,np_dtype", [("e4m3", ml_dtypes.float8_e4m3fn),
                                              ("e5m2", ml_dtypes.float8_e5m2)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_round_to_nearest_even_vs_ml_dtypes(variant, np_dtype, granularity):
    fmax = float(ml_dtypes.finfo(np_dtype).max)
    w = rand(6, 48)
    w[0, 0] = 4.0  # row 0's absmax; its scale is 4 / fmax
    # Exact ties between neighbouring FP8 values, FP8 subnormals, zeros and the max.
    grid = np.array([0.0, 1.0, 1.125, 2.0 ** -9, 2.0 ** -10, 0.75, fmax], np.float32)
    vals = grid.astype(np_dtype).astype(np.float32)
    mids = (vals[:-1] + np.nextafter(vals[:-1], np.float32(np.inf))) / 2
    special = np.concatenate([vals, -vals, mids, [-0.0]]).astype(np.float32)
    w[0, 1:1 + special.size] = special * np.float32(4.0 / fmax)
    w[1] = 0.0
    qa = fp8_quantize(jnp.asarray(w), variant=variant, granularity=granularity)
    absmax = np.abs(w).max(axis=-1, keepdims=True)
    if granularity == "tensor":
        absmax = np.abs(w).max(keepdims=True)
    scale = np.where(absmax > 0, absmax / np.float32(fmax), 1).astype(np.float32)
    x = np.clip(w / scale, -fmax, fmax)
    codes = x.astype(np_dtype).view(np.uint8)
    assert qa.scales.shape == ((1, 1) if granularity == "tensor" else (6, 1))
    np.testing.assert_array_equal(np.asarray(qa.scales), scale)
    np.testing.assert_array_equal(np.asarray(qa.packed), packing.pack_numpy(codes, 8))
    deq = codes.view(np_dtype).astype(np.float32) * scale
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), deq)
    assert np.abs(np.asarray(qa.dequantize()) - w).max() <= (
        np.abs(w).max() * (2.0 ** -4 if variant == "e4m3" else 2.0 ** -3))


def test_fp8_transform_on_kernel_axis():
    w = jnp.asarray(rand(32, 8))
    out = FP8(variant="e5m2", granularity="channel")({"mlp": {"kernel": w}})["mlp"]["kernel"]
    assert out.fmt == "fp8_e5m2" and out.shape == (32, 8) and out.scales.shape == (8, 1)
    np.testing.assert_allclose(np.asarray(out.dequantize()), np.asarray(w), rtol=0.13, atol=1e-6)


# --- NF4 ---------------------------------------------------------------------------------------

def test_nf4_codebook_is_qlora_table():
    np.testing.assert_array_equal(NF4_CODEBOOK, np.array(BNB_NF4, np.float32))


def test_nf4_nearest_code_vs_numpy():
    w = rand(8, 128)
    # Exact ties: the rounded midpoints between levels, in a block whose absmax is 1.
    w[0, :64] = 0.0
    w[0, 0] = 1.0
    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    w[0, 1:16] = mids
    w[0, 16:31] = np.nextafter(mids, np.float32(np.inf))
    w[0, 31:46] = np.nextafter(mids, np.float32(-np.inf))
    w[1, 64:] = 0.0  # an all-zero block
    qa = nf4_quantize(jnp.asarray(w), block_size=64)
    wg = w.reshape(8, 2, 64)
    absmax = np.abs(wg).max(-1, keepdims=True)
    x = np.where(absmax > 0, wg / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    ref = np.argmin(np.abs(x[..., None] - NF4_CODEBOOK), axis=-1)  # first index wins ties
    np.testing.assert_array_equal(np.asarray(qa.codes()).reshape(8, 2, 64), ref)
    np.testing.assert_array_equal(np.asarray(qa.scales), absmax[..., 0])
    np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                  (NF4_CODEBOOK[ref] * absmax).reshape(8, 128))
    assert qa.fmt == "nf4" and qa.biases is None


def test_nf4_double_quant_storage_and_error():
    w = jnp.asarray(rand(2, 40, 448, scale=0.02))  # two stacked layers, 280 blocks each
    single = nf4_quantize(w, block_size=64)
    dq = nf4_quantize(w, block_size=64, double_quant=True)
    assert dq.fmt == "nf4_dq" and dq.scales.dtype == jnp.uint8
    assert dq.scales.shape == (2, 40, 7) and dq.biases.shape == (2, 2)  # 280 -> 2 x 140
    n = 2 * 40 * 448
    assert dq.nbytes == n // 2 + n // 64 + 2 * 2 * 4
    assert single.bits_per_weight == pytest.approx(4.5)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 2 * 2 * 32 / n)
    err = lambda q: float(jnp.mean((q.dequantize() - w) ** 2))
    assert err(dq) < 1.02 * err(single)
    # Decode reference in numpy: absmax = dynamic-code value of the byte * the block's maximum.
    codes = np.asarray(dq.scales).reshape(2, 2, 140)
    b = np.asarray(dq.biases)
    absmax = (DYNAMIC8[codes] * b[:, :, None]).reshape(2, 40, 7)
    levels = NF4_CODEBOOK[np.asarray(dq.codes())].reshape(2, 40, 7, 64)
    np.testing.assert_allclose(np.asarray(dq.dequantize()),
                               (levels * absmax[..., None]).reshape(2, 40, 448), rtol=1e-6,
                               atol=1e-9)
    # Stacked layers slice consistently.
    layer = jax.tree.map(lambda a: a[1], dq)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), np.asarray(dq.dequantize())[1])


def test_dynamic_code_is_qloras_nonlinear_8_bit_map():
    """Byte layout: leading zeros give the decade, the bits after the first one a linear
    fraction; 256 distinct values in [0, 1], the same set as bitsandbytes' unsigned map."""
    assert DYNAMIC8[0] == 0 and DYNAMIC8[1] == 1 and len(set(DYNAMIC8.tolist())) == 256
    assert DYNAMIC8[0b1000_0000] == pytest.approx(0.1 + 0.9 * 0.5 / 128)  # no leading zero
    assert DYNAMIC8[0b0000_0010] == pytest.approx(1e-6 * (0.1 + 0.9 * 0.25))  # six of them
    top = np.sort(DYNAMIC8)[-129:-1]  # the 128 values of the first decade, evenly spaced
    np.testing.assert_allclose(np.diff(top), 0.9 / 128, rtol=1e-4)
    # bitsandbytes create_dynamic_map(signed=False): per decade 10**(i - 6) * bin midpoints.
    bnb = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1, 2 ** (i + 1) + 1)
        bnb += list(10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2)
    np.testing.assert_allclose(np.sort(DYNAMIC8), np.sort(bnb), rtol=1e-6)


def test_nf4_double_quant_keeps_quiet_rows_beside_an_outlier():
    """One outlier weight makes its block's absmax 30 while quiet rows' are ~0.006: the old
    linear 8-bit second level rounded those to its first step and their weights to the NF4
    zero (error 0.95, 97% zeros); the dynamic code keeps them as good as float32 absmax."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 512)).astype(np.float32)
    w[8:16] = rng.normal(0, 0.002, (8, 512))
    w[0, 3] = 30.0
    w = jnp.asarray(w)
    quiet = lambda q: q.dequantize()[8:16]
    rel = lambda q: float(jnp.sqrt(jnp.mean((quiet(q) - w[8:16]) ** 2) / jnp.mean(w[8:16] ** 2)))
    dq, single = nf4_quantize(w, double_quant=True), nf4_quantize(w)
    assert rel(dq) < 1.1 * rel(single) < 0.12, (rel(dq), rel(single))
    assert float(jnp.mean(quiet(dq) == 0)) < 0.15


def test_nf4_double_quant_costs_nothing_on_normal_weights():
    """On Gaussian weights the 8-bit absmax adds no error beyond noise (the old linear code
    measured 0.99989-1.00005 x the float32-absmax MSE on these seeds)."""
    for seed in range(3):
        w = jnp.asarray(np.random.default_rng(seed).normal(0, 0.02, (2, 64, 1024)), jnp.float32)
        mse = lambda q: float(jnp.mean((q.dequantize() - w) ** 2))
        ratio = mse(nf4_quantize(w, double_quant=True)) / mse(nf4_quantize(w))
        assert ratio < 1.001, (seed, ratio)


# --- storage, jit, errors ----------------------------------------------------------------------

@pytest.mark.parametrize("make,bpw", [
    (lambda w: nf4_quantize(w), 4 + 32 / 64),
    (lambda w: fp8_quantize(w, granularity="channel"), 8 + 32 / 256),
    (lambda w: fp8_quantize(w, granularity="tensor"), 8 + 32 / (16 * 256)),
    (lambda w: mx_quantize(w, mode="mxfp4"), 4 + 8 / 32),
    (lambda w: mx_quantize(w, mode="mxfp8"), 8 + 8 / 32),
    (lambda w: mx_quantize(w, mode="nvfp4"), 4 + 8 / 16),
    (lambda w: mx_quantize(w, mode="nvfp4", global_scale=True), 4 + 8 / 16 + 32 / (16 * 256)),
])
def test_bits_per_weight(make, bpw):
    qa = make(jnp.asarray(rand(16, 256)))
    assert qa.bits_per_weight == pytest.approx(bpw)


def test_jit_and_vmap():
    w = jnp.asarray(rand(2, 8, 64))
    for qa in (nf4_quantize(w, double_quant=True), fp8_quantize(w),
               mx_quantize(w, mode="nvfp4", global_scale=True)):
        dense = np.asarray(qa.dequantize())
        np.testing.assert_allclose(np.asarray(jax.jit(lambda q: q.dequantize())(qa)), dense,
                                   rtol=1e-6)
    qa = mx_quantize(w, mode="mxfp4")
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize())(qa)),
                                  np.asarray(qa.dequantize()))
    # Quantizing inside jit (traced weights) gives the same codes.
    traced = jax.jit(lambda w: mx_quantize(w, mode="mxfp8").packed)(w)
    np.testing.assert_array_equal(np.asarray(traced),
                                  np.asarray(mx_quantize(w, mode="mxfp8").packed))


def test_errors_name_the_leaf():
    bad = {"layers": {"0": {"weight": jnp.ones((4, 48))}}}
    with pytest.raises(ValueError, match="layers/0/weight.*groups of 32"):
        MX(mode="mxfp4")(bad)
    with pytest.raises(ValueError, match="layers/0/weight.*group size 64"):
        NF4()(bad)
    nan = {"w": jnp.ones((4, 64)).at[0, 0].set(jnp.nan)}
    for t in (NF4(), FP8(), MX(mode="nvfp4")):
        with pytest.raises(ValueError, match="w: weight contains NaN or Inf"):
            t(nan, axes={"w": -1})
    with pytest.raises(TypeError, match="dtype int32"):
        fp8_quantize(jnp.ones((4, 64), jnp.int32), name="ints")
    with pytest.raises(ValueError, match="mode must be one of"):
        MX(mode="mxfp6")
    with pytest.raises(ValueError, match="only defined for nvfp4"):
        MX(mode="mxfp4", global_scale=True)
    with pytest.raises(ValueError, match="variant"):
        FP8(variant="e3m4")
    with pytest.raises(ValueError, match="granularity"):
        FP8(granularity="group")
