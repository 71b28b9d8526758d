"""Codebook and floating-point weight formats: NF4, FP8 (e4m3 / e5m2), MXFP4, MXFP8 and NVFP4.

Every format is a :class:`~jaxq.core.qarray.QArray` with the canonical packing (unsigned codes,
LSB-first in uint32 words along the input axis) and its own ``fmt`` decoder, so jit, vmap,
checkpoints, ``nbytes`` and the XLA fallback of compressed execution work unchanged.

Storage per format (``rest`` = the logical shape without the input axis):

=========  ====  =====  ===========================================  ==========================
fmt        bits  group  scales                                       biases
=========  ====  =====  ===========================================  ==========================
nf4        4     64     absmax, float32 ``[*rest, n_groups]``        None
nf4_dq     4     64     absmax codes, uint8 ``[*rest, n_groups]``    float32 ``[*lead, nb]``
fp8_e4m3   8     size   absmax/448, float32 ``[*rest, 1]``            None
fp8_e5m2   8     size   absmax/57344, float32 ``[*rest, 1]``          None
mxfp4      4     32     E8M0 exponent, uint8 ``[*rest, n_groups]``   None
mxfp8      8     32     E8M0 exponent, uint8 ``[*rest, n_groups]``   None
nvfp4      4     16     E4M3 bit pattern, uint8 ``[*rest, n_grp]``   None, or the float32 global
                                                                     scale ``[1, ..., 1]``
=========  ====  =====  ===========================================  ==========================

FP8 per-tensor scales are ``[1, ..., 1]``. NF4 double quantization (``nf4_dq``, QLoRA): the
absmax of each block is stored as an 8-bit code; ``lead = rest[:-1]`` and the absmax of each
``lead`` slice (rows times groups, flattened, ``m`` values) is split into ``nb = ceil(m / 256)``
equal blocks, each divided by its largest value (the float32 ``biases[..., j]``) and rounded to
the nearest value of :data:`DYNAMIC8` (QLoRA's nonlinear "dynamic" 8-bit code: an exponent
given by leading zero bits, then a linear fraction). A linear 8-bit grid spaces its levels by
the block's largest absmax / 255, so one outlier block rounds the absmax of quiet rows to 0 (or
to the grid's first step, far above their values, which then round to the NF4 zero); the
dynamic code keeps a few percent relative precision down to 1e-4 of the block's largest.
Slicing leading (stacked-layer) axes of an ``nf4_dq`` QArray stays consistent; rows do not.

MXFP4 / MXFP8 / NVFP4 reproduce ``mlx.core.quantize`` / ``dequantize`` (mlx 0.32) bit for bit:
E8M0 exponent ``ceil(log2(absmax / elem_max))`` (0 for an all-zero group), E4M3 scales rounded
to nearest even and saturated at 448, FP4 elements rounded to the nearest value with ties to
the smaller magnitude (MLX's argmin over the FP4 table), float32/bfloat16/float16 weights alike.
Known divergences, all outside real weights: groups whose absmax is below about 2**-110 (XLA on
CPU flushes subnormal floats to zero; mlx wraps the exponent byte there), NVFP4 values above
about 1e9 without a global scale (MLX's float distances tie), and float16 groups so small that
MLX's float16 ``2**e`` underflows.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.core import formats, packing
from jaxq.core.nf4 import NF4_CODEBOOK
from jaxq.core.qarray import QArray
from jaxq.core.transform import LeafTransform, Stats

#: FP4 E2M1 values by 4-bit code (sign bit 3), as MLX and the OCP MX spec order them.
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

#: Largest finite value of each FP8 variant (OCP FP8: e4m3 has no inf, "fn").
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}

#: MX-style modes: (group size, element bits, largest element value).
MX_MODES = {"mxfp4": (32, 4, 6.0), "mxfp8": (32, 8, 448.0), "nvfp4": (16, 4, 6.0)}

# Midpoints between consecutive NF4 levels: a value above ``_NF4_MIDS[i]`` rounds past level i.
_NF4_MIDS = ((NF4_CODEBOOK[:-1].astype(np.float64) + NF4_CODEBOOK[1:]) / 2).astype(np.float32)
# FP4 magnitudes' decision points (ties go to the smaller magnitude, as in MLX).
_FP4_MIDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_NVFP4_RANGE = np.float32(6.0 * 448.0)  # MLX's global-scale normaliser: fp4 max * e4m3 max


# --- shared helpers ----------------------------------------------------------------------------

def _grouped(w: jax.Array, axis: int, group_size: int) -> jax.Array:
    """``w`` with the input axis last, split into ``[*rest, n_groups, group_size]``."""
    wt = jnp.moveaxis(w, axis, -1)
    return wt.reshape(*wt.shape[:-1], wt.shape[-1] // group_size, group_size)


def _prepare(w: Any, axis: int, bits: int, name: str) -> tuple[jax.Array, int]:
    """Validate a leaf (float, finite, rank >= 1) and normalise ``axis`` to a negative index."""
    formats.check_quantizable(w, bits, name)
    w = jnp.asarray(w)
    axis = axis - w.ndim if axis >= 0 else axis
    if not -w.ndim <= axis < 0:
        raise ValueError(f"{name}: axis {axis} out of range for shape {w.shape}")
    return w, axis


def _round_to(x: jax.Array, dtype: Any) -> jax.Array:
    """Round float32 ``x`` to ``dtype``'s precision, kept in float32 (models MLX's per-op math)."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    # A convert pair, not reduce_precision: that flushes float16 subnormals, which MLX keeps.
    return x.astype(dtype).astype(jnp.float32)


def _lookup(table: np.ndarray, codes: jax.Array) -> jax.Array:
    return jnp.asarray(table)[codes.astype(jnp.int32)]


# --- NF4 ---------------------------------------------------------------------------------------

def nf4_quantize(w: jax.Array, *, block_size: int = 64, axis: int = -1,
                 double_quant: bool = False, dq_block_size: int = 256,
                 scale_dtype: Any = jnp.float32, name: str = "tensor") -> QArray:
    """QLoRA NF4: blockwise absmax, each value rounded to the nearest NormalFloat level.

    ``double_quant`` stores the absmax as 8-bit codes (``fmt="nf4_dq"``, see the module
    docstring), bringing the scale overhead from 32/64 to about 8/64 bits per weight.
    ``scale_dtype`` is the absmax dtype without double quantization.
    """
    w, axis = _prepare(w, axis, 4, name)
    size = w.shape[axis]
    bs = formats.resolve_group_size(size, block_size, name)
    if double_quant and (not isinstance(dq_block_size, int) or dq_block_size <= 0):
        raise ValueError(f"{name}: dq_block_size must be a positive int, got {dq_block_size!r}")
    packed, scales, biases = _nf4_quantize(w, block_size=bs, axis=axis, double_quant=double_quant,
                                           dq_block_size=dq_block_size,
                                           scale_dtype=jnp.dtype(scale_dtype))
    return QArray(packed=packed, scales=scales, biases=biases, bits=4, group_size=bs, size=size,
                  axis=axis, dtype=w.dtype, fmt="nf4_dq" if double_quant else "nf4")


@partial(jax.jit, static_argnames=("block_size", "axis", "double_quant", "dq_block_size",
                                   "scale_dtype"))
def _nf4_quantize(w, *, block_size, axis, double_quant, dq_block_size, scale_dtype):
    wg = _grouped(w, axis, block_size).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(wg), axis=-1)
    if double_quant:
        block = _dq_block(_dq_layout(absmax.shape, 1)[1], dq_block_size)
        scales, biases = _dq_encode(absmax, block)
        stored = _dq_decode(scales, biases, block)
    else:
        scales, biases = absmax.astype(scale_dtype), None
        stored = scales.astype(jnp.float32)
    # Round against the absmax as stored, so codes and stored scale agree exactly.
    x = jnp.where(stored[..., None] != 0, formats.exact_div(wg, stored[..., None]), 0.0)
    q = nf4_codes(x)
    packed = packing.pack(q.reshape(*q.shape[:-2], -1), 4)
    return packed, scales, biases


def nf4_codes(x: jax.Array) -> jax.Array:
    """Index of the NF4 level nearest to normalised ``x`` (float32 distances, ties to the lower).

    The midpoints pick a level; its two neighbours are then compared by float32 distance, so a
    value at a rounded midpoint goes exactly where an argmin over the codebook would send it.
    """
    cb = jnp.asarray(NF4_CODEBOOK)
    mids = jnp.asarray(np.append(_NF4_MIDS, np.inf).astype(np.float32))
    k = jnp.zeros(x.shape, jnp.int32)
    for step in (8, 4, 2, 1):  # unrolled binary search: k = number of midpoints below x
        k = k + step * (x > mids[k + step - 1]).astype(jnp.int32)
    best, best_d = None, None
    for c in (jnp.maximum(k - 1, 0), k, jnp.minimum(k + 1, 15)):
        d = jnp.abs(x - cb[c])
        if best is None:
            best, best_d = c, d
        else:
            better = (d < best_d) | ((d == best_d) & (c < best))
            best, best_d = jnp.where(better, c, best), jnp.where(better, d, best_d)
    return best.astype(jnp.uint32)


def _dq_layout(shape: tuple[int, ...], block: int) -> tuple[tuple[int, ...], int, int]:
    """``(lead, m, nb)``: ``m`` absmax values per ``lead`` slice in ``nb`` second-level blocks."""
    lead = shape[:max(len(shape) - 2, 0)]
    m = int(np.prod(shape[len(lead):]))
    return lead, m, -(-m // block)


def _dq_block(m: int, max_block: int) -> int:
    """Blocks of equal length, at most ``max_block``: the decoder recovers it from the shapes."""
    return -(-m // -(-m // max_block))


def dynamic_code(bits: int = 8) -> np.ndarray:
    """The unsigned dynamic code: the value of each ``bits``-wide byte, indexed by the byte.

    A byte with ``k`` leading zero bits (``k < bits - 1``) stands for ``10**-k`` times a linear
    fraction in ``[0.1, 1]``: the bits after its first one bit pick the middle of one of
    ``2**(bits - 1 - k)`` equal bins. Large values get many fraction bits, small ones few, so
    the relative precision is near-constant over ``bits - 1`` decades. Byte 0 is 0 and byte 1
    (no fraction bits left) is exactly 1, the block's own maximum.
    """
    table = np.zeros(2**bits, np.float64)
    table[1] = 1.0
    for b in range(2, 2**bits):
        lead = bits - b.bit_length()  # leading zero bits
        frac_bits = bits - 1 - lead
        frac = b & ((1 << frac_bits) - 1)
        table[b] = 10.0**-lead * (0.1 + 0.9 * (frac + 0.5) / 2**frac_bits)
    return table.astype(np.float32)


#: QLoRA's 8-bit code for the second-level (absmax) quantization, by byte.
DYNAMIC8 = dynamic_code(8)
_DYN_ORDER = np.argsort(DYNAMIC8, kind="stable").astype(np.uint8)
_DYN_SORTED = DYNAMIC8[_DYN_ORDER]
_DYN_MIDS = ((_DYN_SORTED[:-1].astype(np.float64) + _DYN_SORTED[1:]) / 2).astype(np.float32)


def _dq_encode(absmax: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Second-level quantization of the absmax: per block of ``block`` values, the largest
    (float32) and each value over it as the nearest :data:`DYNAMIC8` byte."""
    lead, m, nb = _dq_layout(absmax.shape, block)
    flat = jnp.pad(absmax.reshape(*lead, m), [(0, 0)] * len(lead) + [(0, nb * block - m)])
    flat = flat.reshape(*lead, nb, block)
    top = jnp.max(flat, axis=-1)
    top = jnp.where(top > 0, top, 1.0)
    x = formats.exact_div(flat, top[..., None])
    idx = jnp.searchsorted(jnp.asarray(_DYN_MIDS), x, side="left")
    codes = jnp.asarray(_DYN_ORDER)[idx]
    codes = codes.reshape(*lead, nb * block)[..., :m].reshape(absmax.shape)
    return codes, top.astype(jnp.float32)


def _dq_decode(codes: jax.Array, params: jax.Array, block: int) -> jax.Array:
    """The absmax (float32) that ``nf4_dq`` codes and block maxima stand for."""
    lead, m, nb = _dq_layout(codes.shape, block)
    vals = _lookup(DYNAMIC8, codes.reshape(*lead, m))
    vals = jnp.pad(vals, [(0, 0)] * len(lead) + [(0, nb * block - m)]).reshape(*lead, nb, block)
    vals = vals * params[..., None]
    return vals.reshape(*lead, nb * block)[..., :m].reshape(codes.shape)


def _decode_nf4(qa: QArray, codes: jax.Array) -> jax.Array:
    return _lookup(NF4_CODEBOOK, codes) * qa.scales.astype(jnp.float32)[..., None]


def _decode_nf4_dq(qa: QArray, codes: jax.Array) -> jax.Array:
    _, m, _ = _dq_layout(qa.scales.shape, 1)
    absmax = _dq_decode(qa.scales, qa.biases, -(-m // qa.biases.shape[-1]))
    return _lookup(NF4_CODEBOOK, codes) * absmax[..., None]


# --- FP8 ---------------------------------------------------------------------------------------

def fp8_quantize(w: jax.Array, *, variant: str = "e4m3", granularity: str = "channel",
                 axis: int = -1, scale_dtype: Any = jnp.float32,
                 name: str = "tensor") -> QArray:
    """FP8 weights: codes are the raw e4m3fn / e5m2 bit patterns of ``w / scale``.

    ``scale = absmax / fp8_max`` per output channel (``granularity="channel"``) or per tensor;
    values are rounded to nearest even and saturate at the format's largest finite value.
    """
    if variant not in FP8_MAX:
        raise ValueError(f"{name}: FP8 variant must be one of {sorted(FP8_MAX)}, got {variant!r}")
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"{name}: FP8 granularity must be 'tensor' or 'channel', "
                         f"got {granularity!r}")
    w, axis = _prepare(w, axis, 8, name)
    packed, scales = _fp8_quantize(w, variant=variant, per_tensor=granularity == "tensor",
                                   axis=axis, scale_dtype=jnp.dtype(scale_dtype))
    return QArray(packed=packed, scales=scales, biases=None, bits=8, group_size=w.shape[axis],
                  size=w.shape[axis], axis=axis, dtype=w.dtype, fmt=f"fp8_{variant}")


@partial(jax.jit, static_argnames=("variant", "per_tensor", "axis", "scale_dtype"))
def _fp8_quantize(w, *, variant, per_tensor, axis, scale_dtype):
    wt = jnp.moveaxis(w, axis, -1).astype(jnp.float32)
    fmax = FP8_MAX[variant]
    reduce_axes = tuple(range(wt.ndim)) if per_tensor else (-1,)
    absmax = jnp.max(jnp.abs(wt), axis=reduce_axes, keepdims=True)
    scales = jnp.where(absmax > 0, formats.exact_div(absmax, fmax), 1.0).astype(scale_dtype)
    # A row so small that its scale underflows a 16-bit scale_dtype stores zeros, not 0/0 = NaN.
    stored = scales.astype(jnp.float32)
    x = jnp.where(stored != 0, formats.exact_div(wt, jnp.where(stored != 0, stored, 1.0)), 0.0)
    codes = fp8_codes(x, variant)
    return packing.pack(codes, 8), scales


def fp8_codes(x: jax.Array, variant: str = "e4m3") -> jax.Array:
    """FP8 bit patterns (uint32) of float32 ``x``: round to nearest even, saturating."""
    fmax = FP8_MAX[variant]
    f8 = jnp.clip(x, -fmax, fmax).astype(FP8_DTYPES[variant])
    return lax.bitcast_convert_type(f8, jnp.uint8).astype(jnp.uint32)


def fp8_values(codes: jax.Array, variant: str = "e4m3") -> jax.Array:
    """Float32 values of FP8 bit patterns."""
    f8 = lax.bitcast_convert_type(codes.astype(jnp.uint8), FP8_DTYPES[variant])
    return f8.astype(jnp.float32)


def _fp8_decoder(variant: str):
    def decode(qa: QArray, codes: jax.Array) -> jax.Array:
        return fp8_values(codes, variant) * qa.scales.astype(jnp.float32)[..., None]
    return decode


# --- MXFP4 / MXFP8 / NVFP4 ---------------------------------------------------------------------

def mx_quantize(w: jax.Array, *, mode: str = "mxfp4", axis: int = -1,
                global_scale: bool | jax.Array | float | None = None,
                name: str = "tensor") -> QArray:
    """Microscaling formats, bit-exact with ``mlx.core.quantize(w, mode=mode)``.

    ``global_scale`` (NVFP4 only, as MLX's argument): ``True`` uses the tensor's absmax (what
    mlx-lm does), a number or array is used as given; it is stored in ``biases`` (float32).
    It moves the E4M3 block scales into their precise range, which small weights need: without
    it a block whose absmax is below 6 * 2**-10 gets a zero scale.
    """
    if mode not in MX_MODES:
        raise ValueError(f"{name}: mode must be one of {sorted(MX_MODES)}, got {mode!r}")
    group_size, bits, _ = MX_MODES[mode]
    w, axis = _prepare(w, axis, bits, name)
    size = w.shape[axis]
    if size % group_size:
        raise ValueError(f"{name}: {mode} needs groups of {group_size}, which do not divide the "
                         f"input axis of length {size}")
    if global_scale is not None and global_scale is not False and mode != "nvfp4":
        raise ValueError(f"{name}: a global scale is only defined for nvfp4, not {mode}")
    gscale = None
    if global_scale is True:
        gscale = jnp.max(jnp.abs(w)).astype(jnp.float32)
    elif global_scale is not None and global_scale is not False:
        gscale = jnp.asarray(global_scale, jnp.float32)
        if gscale.size != 1:
            raise ValueError(f"{name}: global_scale must be a scalar, got shape {gscale.shape}")
    packed, scales, biases = _mx_quantize(w, gscale, mode=mode, axis=axis)
    return QArray(packed=packed, scales=scales, biases=biases, bits=bits, group_size=group_size,
                  size=size, axis=axis, dtype=w.dtype, fmt=mode)


@partial(jax.jit, static_argnames=("mode", "axis"))
def _mx_quantize(w, gscale, *, mode, axis):
    group_size, bits, elem_max = MX_MODES[mode]
    dtype = w.dtype
    wg = _grouped(w, axis, group_size).astype(jnp.float32)
    rest, n_groups = wg.shape[:-2], wg.shape[-2]
    # MLX computes in the weight's dtype: each rounding it makes is reproduced by _round_to.
    s = _round_to(formats.exact_div(jnp.max(jnp.abs(wg), axis=-1, keepdims=True), elem_max), dtype)
    biases = None
    if mode == "nvfp4":
        if gscale is not None:
            norm = formats.exact_div(_NVFP4_RANGE, gscale.reshape(()))
            s = s * norm
            biases = gscale.reshape((1,) * (len(rest) + 1))
        scale_codes = fp8_codes(s)
        sf = fp8_values(scale_codes)
        x = jnp.where(sf != 0, _round_to(formats.exact_div(wg, sf), dtype), 0.0)
        if gscale is not None:
            x = x * norm
    else:
        e = e8m0_exponent(s)
        scale_codes = (e + 127).astype(jnp.uint32)
        x = _round_to(wg * _pow2(-e), dtype)  # exact: a power of 2
    codes = fp4_codes(x) if bits == 4 else fp8_codes(x)
    packed = packing.pack(codes.reshape(*rest, n_groups * group_size), bits)
    return packed, scale_codes.astype(jnp.uint8).reshape(*rest, n_groups), biases


def e8m0_exponent(s: jax.Array) -> jax.Array:
    """``ceil(log2(s))`` exactly (int32, from the float32 bits), 0 where ``s`` is 0."""
    b = lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    exp = ((b >> 23) & 0xFF).astype(jnp.int32)
    mant = b & 0x7FFFFF
    e = exp - 127 + (mant != 0).astype(jnp.int32)
    return jnp.where(exp == 0, 0, e)  # zero (or flushed subnormal): MLX stores exponent 0


def _pow2(e: jax.Array) -> jax.Array:
    """``2.0 ** e`` in float32 for normal exponents, built from bits (exact)."""
    return lax.bitcast_convert_type(((e + 127).astype(jnp.uint32) << 23), jnp.float32)


def fp4_codes(x: jax.Array) -> jax.Array:
    """FP4 E2M1 codes of float32 ``x``: nearest value, ties to the smaller magnitude (MLX)."""
    mag = jnp.abs(x)
    k = jnp.zeros(x.shape, jnp.uint32)
    for t in _FP4_MIDS.tolist():
        k = k + (mag > t).astype(jnp.uint32)
    return jnp.where((x < 0) & (k > 0), k + 8, k)


def e8m0_values(s: jax.Array) -> jax.Array:
    """``2 ** (s - 127)`` (float32) of E8M0 bytes; 255 decodes to inf as in MLX."""
    s = s.astype(jnp.uint32)
    normal = lax.bitcast_convert_type(s << 23, jnp.float32)
    return jnp.where(s == 0, np.float32(2.0**-127), normal)


def _decode_mx(qa: QArray, codes: jax.Array) -> jax.Array:
    vals = _lookup(FP4_E2M1_VALUES, codes) if qa.bits == 4 else fp8_values(codes)
    return vals * e8m0_values(qa.scales)[..., None]


def _decode_nvfp4(qa: QArray, codes: jax.Array) -> jax.Array:
    scale = fp8_values(qa.scales)
    if qa.biases is not None:  # MLX: values * (scale * (global / (6 * 448)))
        scale = scale * formats.exact_div(qa.biases, _NVFP4_RANGE)
    return _lookup(FP4_E2M1_VALUES, codes) * scale[..., None]


formats.register_format("nf4", _decode_nf4)
formats.register_format("nf4_dq", _decode_nf4_dq)
formats.register_format("fp8_e4m3", _fp8_decoder("e4m3"))
formats.register_format("fp8_e5m2", _fp8_decoder("e5m2"))
formats.register_format("mxfp4", _decode_mx)
formats.register_format("mxfp8", _decode_mx)
formats.register_format("nvfp4", _decode_nvfp4)


# --- transforms --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4(LeafTransform):
    """QLoRA NF4 round-to-nearest of each selected leaf.

    >>> import jax.numpy as jnp, jaxq
    >>> jaxq.NF4()({"dense": {"kernel": jnp.ones((64, 8))}})["dense"]["kernel"].fmt
    'nf4'
    """

    block_size: int = 64
    double_quant: bool = False
    dq_block_size: int = 256
    scale_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        formats.check_quantizer_fields(self)

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> QArray:
        return nf4_quantize(leaf, block_size=self.block_size, axis=axis,
                            double_quant=self.double_quant, dq_block_size=self.dq_block_size,
                            scale_dtype=self.scale_dtype, name=path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(LeafTransform):
    """FP8 (e4m3 or e5m2) weights with per-channel or per-tensor float32 scales."""

    variant: str = "e4m3"
    granularity: str = "channel"
    scale_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.variant not in FP8_MAX:
            raise ValueError(f"FP8 variant must be one of {sorted(FP8_MAX)}, got {self.variant!r}")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"FP8 granularity must be 'tensor' or 'channel', "
                             f"got {self.granularity!r}")

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> QArray:
        return fp8_quantize(leaf, variant=self.variant, granularity=self.granularity, axis=axis,
                            scale_dtype=self.scale_dtype, name=path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MX(LeafTransform):
    """MXFP4 / MXFP8 / NVFP4 weights, bit-exact with MLX's modes of the same names.

    ``global_scale`` (NVFP4): also store the tensor absmax as a float32 global scale.
    """

    mode: str = "mxfp4"
    global_scale: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MX_MODES:
            raise ValueError(f"MX mode must be one of {sorted(MX_MODES)}, got {self.mode!r}")
        if self.global_scale and self.mode != "nvfp4":
            raise ValueError(f"a global scale is only defined for nvfp4, not {self.mode}")

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> QArray:
        return mx_quantize(leaf, mode=self.mode, axis=axis,
                           global_scale=True if self.global_scale else None, name=path)
