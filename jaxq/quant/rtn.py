"""Round-to-nearest (RTN) quantization, with min-max or MSE-optimal clipping."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import formats
from jaxq.core.qarray import QArray
from jaxq.core.sparse import from_codes, mask_from_zeros, parse_pattern
from jaxq.core.transform import LeafTransform, Stats


@partial(jax.jit, static_argnames=("bits", "group_size", "axis", "symmetric", "grid",
                                   "min_ratio"))
def search_clip(w: jax.Array, importance: jax.Array | None = None, *, bits: int,
                group_size: int, axis: int = -1, symmetric: bool = False, grid: int = 20,
                min_ratio: float = 0.5) -> jax.Array:
    """Per-group clip ratio in ``[min_ratio, 1]`` minimising the (weighted) squared error.

    ``importance`` (one weight per input channel, e.g. the diagonal of XᵀX) turns the weight
    error into an estimate of output error. Returns ratios shaped ``[*rest, n_groups]``.
    """
    wt = jnp.moveaxis(w, axis, -1).astype(jnp.float32)
    rest, size = wt.shape[:-1], wt.shape[-1]
    wg = wt.reshape(*rest, size // group_size, group_size)
    imp = (jnp.ones((size,), jnp.float32) if importance is None
           else importance.astype(jnp.float32)).reshape(size // group_size, group_size)
    ratios = jnp.linspace(1.0, min_ratio, grid)

    def body(best, ratio):
        best_err, best_ratio = best
        scales, biases = formats.affine_params(wg, bits, symmetric, (-1,), ratio)
        q = formats.affine_codes(wg, scales, biases, bits)
        err = jnp.sum(imp * (q * scales + biases - wg) ** 2, axis=-1)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

    init = (jnp.full(wg.shape[:-1], jnp.inf), jnp.ones(wg.shape[:-1]))
    (_, best_ratio), _ = jax.lax.scan(body, init, ratios)
    return best_ratio


def fallback_group_size(size: int, group_size: int | str | None,
                        candidates: tuple[int, ...]) -> int | str | None:
    """``group_size`` if it divides ``size``, else the largest candidate that does."""
    if not isinstance(group_size, int) or size % group_size == 0:
        return group_size
    for g in sorted(candidates, reverse=True):
        if size % g == 0:
            return g
    return group_size  # nothing fits: let quantize() raise its clear error


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(LeafTransform):
    """Round-to-nearest affine quantization of each selected leaf into a :class:`QArray`.

    Attributes:
      bits: 1 to 8. group_size: int, ``"channel"`` or ``"tensor"``.
      symmetric: zero point fixed at ``2**(bits-1)``.
      clip: ``"minmax"`` (MLX-identical) or ``"mse"`` (per-group clip-ratio search).
      scale_dtype: dtype of scales and biases (default float16, bfloat16 for a bfloat16
        weight: :func:`jaxq.core.formats.default_scale_dtype`).
      group_fallback: where ``group_size`` does not divide a leaf's input axis, use the
        largest of these that does (empty: raise instead).
      keep_mask: None, ``"unstructured"`` or ``"N:M"``: keep an already pruned leaf's exact
        zeros (grids fitted to the kept weights; a sparse leaf with QArray values).

    >>> import jax.numpy as jnp, jaxq
    >>> params = {"dense": {"kernel": jnp.ones((64, 8))}}
    >>> jaxq.RTN(bits=4, group_size=32)(params)["dense"]["kernel"].shape
    (64, 8)
    """

    bits: int = 4
    group_size: int | str | None = 64
    symmetric: bool = False
    clip: str = "minmax"
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    scale_dtype: Any = None
    group_fallback: tuple[int, ...] = ()
    keep_mask: str | None = None

    def __post_init__(self) -> None:
        formats.check_quantizer_fields(self)
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"RTN clip must be 'minmax' or 'mse', got {self.clip!r}")
        if self.keep_mask is not None:
            if self.keep_mask != "unstructured":
                parse_pattern(self.keep_mask, "RTN keep_mask")
            if self.clip != "minmax":
                raise ValueError("RTN keep_mask takes clip='minmax' only")

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        formats.check_quantizable(leaf, self.bits, path)
        if self.keep_mask is not None:
            return rtn_sparse(
                leaf, keep_mask=self.keep_mask, bits=self.bits,
                group_size=fallback_group_size(leaf.shape[axis], self.group_size,
                                               self.group_fallback),
                axis=axis, symmetric=self.symmetric, scale_dtype=self.scale_dtype, name=path)
        return rtn_quantize(
            leaf, bits=self.bits,
            group_size=fallback_group_size(leaf.shape[axis], self.group_size,
                                           self.group_fallback),
            axis=axis, symmetric=self.symmetric, clip=self.clip, clip_grid=self.clip_grid,
            clip_min_ratio=self.clip_min_ratio, scale_dtype=self.scale_dtype,
            importance=None if stats is None else stats.get("sq_norm"), name=path)


def rtn_quantize(w: jax.Array, *, bits: int = 4, group_size: int | str | None = 64,
                 axis: int = -1, symmetric: bool = False, clip: str = "minmax",
                 clip_grid: int = 20, clip_min_ratio: float = 0.5, scale_dtype: Any = None,
                 importance: jax.Array | None = None, name: str = "tensor") -> QArray:
    """RTN on one array; ``clip="mse"`` searches a clip ratio per group first."""
    ratio = None
    if clip == "mse":
        formats.check_quantizable(w, bits, name)
        size = w.shape[axis]
        gs = formats.resolve_group_size(size, group_size, name)
        ratio = search_clip(jnp.asarray(w), importance, bits=bits,
                            group_size=gs, axis=axis, symmetric=symmetric, grid=clip_grid,
                            min_ratio=clip_min_ratio)
        if group_size == "tensor":
            ratio = None  # a per-tensor range has one ratio; min-max is already MSE-close
    return formats.quantize(w, bits=bits, group_size=group_size, axis=axis,
                            symmetric=symmetric, scale_dtype=scale_dtype, clip_ratio=ratio,
                            name=name)


def rtn_sparse(w: jax.Array, *, keep_mask: str, bits: int = 4,
               group_size: int | str | None = 64, axis: int = -1, symmetric: bool = False,
               scale_dtype: Any = None, name: str = "tensor") -> Any:
    """RTN of an already pruned ``w`` keeping its zeros as the mask: each group's grid comes
    from its kept weights only (pruned ones replaced by the kept range's midpoint), and the
    result is a sparse leaf whose QArray values never decide a pruned weight."""
    w = jnp.asarray(w)
    axis = axis - w.ndim if axis >= 0 else axis
    wt = jnp.moveaxis(w, axis, -1)
    pattern = None if keep_mask == "unstructured" else keep_mask
    keep = mask_from_zeros(wt, pattern, name)
    gs = formats.resolve_group_size(wt.shape[-1], group_size, name)
    q = formats.quantize(_fill_pruned(wt, keep, gs), bits=bits, group_size=gs, axis=-1,
                         symmetric=symmetric, scale_dtype=scale_dtype or w.dtype, name=name)
    return from_codes(q.codes(), q.scales, q.biases, keep, bits=bits, group_size=gs,
                      axis=axis, dtype=w.dtype, pattern=pattern, name=name)


@partial(jax.jit, static_argnames=("gs",))
def _fill_pruned(wt: jax.Array, keep: jax.Array, gs: int) -> jax.Array:
    """Pruned entries set to the midpoint of their group's kept range (moves neither edge)."""
    rest, k = wt.shape[:-1], wt.shape[-1]
    wg = wt.astype(jnp.float32).reshape(*rest, k // gs, gs)
    kg = keep.reshape(wg.shape)
    hi = jnp.max(jnp.where(kg, wg, -jnp.inf), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(kg, wg, jnp.inf), axis=-1, keepdims=True)
    mid = jnp.where(hi >= lo, (hi + lo) / 2, 0.0)
    return jnp.where(kg, wg, mid).reshape(wt.shape).astype(wt.dtype)
