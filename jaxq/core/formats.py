"""Code formats: how a group of unsigned codes turns back into floats, and affine quantization.

A format is a decoder ``(qarray, codes[*rest, n_groups, group]) -> floats`` registered by name.
``affine`` is the canonical one (``scale * q + bias``); codebook and floating-point formats
(NF4, FP8, MX) register their own decoders beside their quantizers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core import packing
from jaxq.core.qarray import QArray

Decoder = Callable[[QArray, jax.Array], jax.Array]
_DECODERS: dict[str, Decoder] = {}


def register_format(name: str, decoder: Decoder) -> None:
    """Register how codes of format ``name`` decode to floats (groups on the last two axes)."""
    _DECODERS[name] = decoder


def decode(qa: QArray, grouped_codes: jax.Array) -> jax.Array:
    try:
        decoder = _DECODERS[qa.fmt]
    except KeyError:
        raise ValueError(f"unknown QArray format {qa.fmt!r}; known: {sorted(_DECODERS)}") from None
    return decoder(qa, grouped_codes)


def _decode_affine(qa: QArray, codes: jax.Array) -> jax.Array:
    scales = qa.scales.astype(jnp.float32)[..., None]
    biases = qa.biases.astype(jnp.float32)[..., None]
    return codes.astype(jnp.float32) * scales + biases


register_format("affine", _decode_affine)


# --- validation -----------------------------------------------------------------------------

def check_bits(bits: Any, name: str = "tensor") -> None:
    """Raise unless ``bits`` is an int width jaxq packs; a bool is refused (``True == 1`` would
    make a 1-bit model of a ``bits: true`` typo)."""
    if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
            or bits not in packing.SUPPORTED_BITS):
        raise ValueError(f"{name}: unsupported bit width bits={bits!r}; expected an integer in "
                         f"{packing.SUPPORTED_BITS}")


def check_group_size(group_size: Any, name: str = "tensor") -> None:
    """Raise unless ``group_size`` is a positive int (not a bool: ``True`` would be groups of
    one), ``"channel"``, ``"tensor"`` or None."""
    if group_size is None or (isinstance(group_size, str) and group_size in ("channel",
                                                                               "tensor")):
        return
    if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
            or group_size <= 0):
        raise ValueError(f"{name}: group_size must be a positive int, 'channel' or 'tensor', "
                         f"got {group_size!r}")


#: Numeric fields quantizers share: (name, low bound, low bound excluded, high bound, integer).
_NUMERIC_FIELDS = (("clip_grid", 1, False, None, True), ("grid", 1, False, None, True),
                   ("clip_min_ratio", 0, True, 1, False), ("damp", 0, False, None, False),
                   ("block_size", 1, False, None, True), ("blocksize", 1, False, None, True),
                   ("dq_block_size", 1, False, None, True))


def check_quantizer_fields(t: Any) -> None:
    """Check the fields a quantizing transform ``t`` has of ``bits``, ``group_size``,
    ``group_fallback`` and :data:`_NUMERIC_FIELDS` as it is made, not when a layer meets them;
    bools are refused wherever a number is expected."""
    name = type(t).__name__
    if getattr(t, "bits", None) is not None:
        check_bits(t.bits, name)
    if hasattr(t, "group_size"):
        check_group_size(t.group_size, name)
    for g in getattr(t, "group_fallback", ()):
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0:
            raise ValueError(f"{name}: group_fallback takes positive ints, got {g!r}")
    for field, lo, lo_open, hi, integer in _NUMERIC_FIELDS:
        if not hasattr(t, field):
            continue
        v = getattr(t, field)
        kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if (isinstance(v, bool) or not isinstance(v, kinds) or not np.isfinite(v)
                or (v <= lo if lo_open else v < lo) or (hi is not None and v > hi)):
            bound = (f"in ({lo}, {hi}]" if hi is not None else
                     f"{'>' if lo_open else '>='} {lo}")
            raise ValueError(f"{name}: {field} must be {'an integer' if integer else 'a number'}"
                             f" {bound}, got {v!r}")


def resolve_group_size(size: int, group_size: int | str | None, name: str = "tensor") -> int:
    """Map ``group_size`` (an int, ``"channel"``/``None`` or ``"tensor"``) to elements per group."""
    check_group_size(group_size, name)
    if group_size is None or isinstance(group_size, str):
        return size
    if size % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide the input axis of "
                         f"length {size}")
    return int(group_size)


def check_quantizable(w: Any, bits: int, name: str = "tensor", *,
                      check_finite: bool = True) -> None:
    """Raise a clear error for non-float leaves, unsupported widths and NaN/Inf values."""
    check_bits(bits, name)
    dtype = jnp.result_type(w)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: cannot quantize a leaf of dtype {dtype}; only float leaves")
    if jnp.ndim(w) < 1:
        raise ValueError(f"{name}: cannot quantize a scalar")
    if check_finite and not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
        raise ValueError(f"{name}: weight contains NaN or Inf values")


# --- affine quantization ---------------------------------------------------------------------

def exact_div(a: Any, b: Any) -> jax.Array:
    """Correctly rounded ``a / b`` (float32), broadcasting ``b`` to ``a``.

    XLA on CPU turns a division by a broadcast (a scalar or a per-row scale) into a multiply by
    the reciprocal, which is off by one ulp about half the time and moves values across rounding
    ties. A full-shape divisor behind an optimisation barrier keeps the true division, which is
    what bit-exactness with MLX needs.
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return a / jax.lax.optimization_barrier(b)


_F16_MAX = float(jnp.finfo(jnp.float16).max)


def default_scale_dtype(weight_dtype: Any, w: Any = None) -> jnp.dtype:
    """The dtype scales and biases are stored in unless a transform says otherwise.

    float16 (bfloat16 for a bfloat16 weight, whose range float16 may not hold): a float32 scale
    and bias per group of 32 cost 2 bits per weight, a 16-bit pair 1, at the same quality (the
    rounding of a 16-bit scale is far below the quantization step). So "4-bit g32" on a float32
    model stores 5 bits per weight, not 6. A concrete float32 weight ``w`` whose values leave
    float16's range keeps float32 scales: a bias is the group's edge, and a symmetric grid's
    scale and bias reach twice the absmax (at 1 bit), so past half of float16's largest value
    they would overflow to Inf.
    Scales cannot underflow to zero: affine scales are at least 1e-7, a float16 subnormal.
    """
    dt = jnp.dtype(weight_dtype)
    if dt == jnp.bfloat16:
        return dt
    if (w is not None and dt.itemsize > 2 and not isinstance(w, jax.core.Tracer)
            and jnp.size(w) and not float(jnp.abs(w).max()) <= _F16_MAX / 2):
        return dt
    return jnp.dtype(jnp.float16)


def quantize(
    w: jax.Array,
    *,
    bits: int = 4,
    group_size: int | str | None = 64,
    axis: int = -1,
    symmetric: bool = False,
    scale_dtype: Any = None,
    clip_ratio: jax.Array | float | None = None,
    name: str = "tensor",
) -> QArray:
    """Round-to-nearest affine quantization into a :class:`QArray`.

    Asymmetric mode reproduces ``mlx.core.quantize`` bit for bit (min/max per group, the edge
    of larger magnitude made exactly representable). Symmetric mode uses ``zero = 2**(bits-1)``
    and stores ``bias = -zero * scale``. ``clip_ratio`` (scalar or one per group) shrinks the
    range before rounding; :func:`jaxq.quant.rtn.search_clip` picks it by MSE.

    ``group_size``: an int dividing the axis, ``"channel"`` (or None) or ``"tensor"``.
    ``scale_dtype`` defaults to :func:`default_scale_dtype` (float16; bfloat16 for a bfloat16
    weight). MLX keeps the weight's dtype instead; pass ``scale_dtype=w.dtype`` for that.
    """
    check_quantizable(w, bits, name)
    w = jnp.asarray(w)
    ndim = w.ndim
    axis = axis - ndim if axis >= 0 else axis
    if not -ndim <= axis < 0:
        raise ValueError(f"{name}: axis {axis} out of range for shape {w.shape}")
    size = w.shape[axis]
    gs = resolve_group_size(size, group_size, name)
    per_tensor = group_size == "tensor"
    scale_dtype = jnp.dtype(scale_dtype or default_scale_dtype(w.dtype, w))
    packed, scales, biases = _quantize_affine(
        w, clip_ratio, bits=bits, group_size=gs, axis=axis, symmetric=symmetric,
        per_tensor=per_tensor, scale_dtype=scale_dtype)
    return QArray(packed=packed, scales=scales, biases=biases, bits=bits, group_size=gs,
                  size=size, axis=axis, dtype=w.dtype, fmt="affine")


def affine_params(wg: jax.Array, bits: int, symmetric: bool, reduce_axes: tuple[int, ...],
                  clip_ratio: Any = None) -> tuple[jax.Array, jax.Array]:
    """Scales and biases (float32, keepdims) for groups of ``wg`` reduced over ``reduce_axes``."""
    n_bins = float(2**bits - 1)
    wg = wg.astype(jnp.float32)
    w_max = jnp.max(wg, axis=reduce_axes, keepdims=True)
    w_min = jnp.min(wg, axis=reduce_axes, keepdims=True)
    if clip_ratio is not None:
        w_max = w_max * clip_ratio
        w_min = w_min * clip_ratio
    if symmetric:
        absmax = jnp.maximum(jnp.abs(w_max), jnp.abs(w_min))
        scales = jnp.maximum(2.0 * absmax / n_bins, 1e-7)
        return scales, -(2.0 ** (bits - 1)) * scales
    # MLX's rule: the edge of larger magnitude is exactly representable.
    mask = jnp.abs(w_min) > jnp.abs(w_max)
    scales = jnp.maximum(exact_div(w_max - w_min, n_bins), 1e-7)
    scales = jnp.where(mask, scales, -scales)
    edge = jnp.where(mask, w_min, w_max)
    q0 = jnp.round(exact_div(edge, scales))
    scales = jnp.where(q0 != 0, exact_div(edge, q0), scales)
    biases = jnp.where(q0 == 0, 0.0, edge)
    return scales, biases


def affine_codes(wg: jax.Array, scales: jax.Array, biases: jax.Array, bits: int) -> jax.Array:
    """Round ``wg`` to the nearest code of the given (broadcastable) affine grid."""
    q = jnp.round(exact_div(wg.astype(jnp.float32) - biases, scales))
    return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint32)


@partial(jax.jit, static_argnames=("bits", "group_size", "axis", "symmetric", "per_tensor",
                                   "scale_dtype"))
def _quantize_affine(w, clip_ratio, *, bits, group_size, axis, symmetric, per_tensor,
                     scale_dtype):
    wt = jnp.moveaxis(w, axis, -1)
    rest = wt.shape[:-1]
    n_groups = wt.shape[-1] // group_size
    wg = wt.reshape(*rest, n_groups, group_size)
    if clip_ratio is not None:
        clip_ratio = jnp.asarray(clip_ratio, jnp.float32)
        if clip_ratio.ndim:
            clip_ratio = clip_ratio.reshape(*rest, n_groups, 1)
    reduce_axes = tuple(range(wg.ndim)) if per_tensor else (-1,)
    scales, biases = affine_params(wg, bits, symmetric, reduce_axes, clip_ratio)
    # Round with the scales as stored, so codes and stored parameters agree exactly.
    scales = scales.astype(scale_dtype)
    biases = biases.astype(scale_dtype)
    q = affine_codes(wg, scales.astype(jnp.float32), biases.astype(jnp.float32), bits)
    packed = packing.pack(q.reshape(*rest, n_groups * group_size), bits)
    keep = (1,) * len(rest) if per_tensor else rest
    return packed, scales.reshape(*keep, n_groups), biases.reshape(*keep, n_groups)
