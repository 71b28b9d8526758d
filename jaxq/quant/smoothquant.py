"""SmoothQuant and W8A8: int8 weights and int8 activations (Xiao et al., 2023).

Activations have a few channels far louder than the rest, which ruins per-token int8
quantization; weights do not. ``s = max|x|^α / max|W_col|^(1-α)`` moves part of that range into
the weight (``W·diag(s)``, ``x·diag(1/s)``), folded into the previous op exactly as AWQ's scales
are (:func:`jaxq.quant.awq.apply_scales`).

The compressed leaf is :class:`W8A8`: a :class:`~jaxq.core.qarray.QArray` (8-bit, one
symmetric scale per output channel, stored in the canonical affine layout, so everything that
handles QArrays, dequantization and MLX export included, handles it) plus how the activations
are quantized: per token at run time (``"dynamic"``) or with one calibrated scale
(``"static"``, the ``act_scale`` child). :func:`w8a8_matmul` is the int8 x int8 -> int32 op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.calib.groups import ScaleGroup
from jaxq.core import formats, packing
from jaxq.core import tree as tree_lib
from jaxq.core.leaf import register_leaf
from jaxq.core.qarray import QArray
from jaxq.core.transform import LeafTransform, Stats, infer_input_axis
from jaxq.quant.awq import (
    _scale_input,
    _to_matrix,
    apply_scales,
    configured_groups,
    scale_stats,
    site_scales,
)

_ZERO = 128  # int8 code q is stored as the unsigned code q + 128 (bias = -128 · scale)


@register_leaf("w8a8")
@dataclasses.dataclass(frozen=True, eq=False)
class W8A8(QArray):
    """An int8 weight (a QArray: bits 8, per-channel symmetric scale, ``bias = -128·scale``)
    whose matmul also quantizes its input to int8.

    Attributes (beyond QArray's):
      act_scale: static mode's per-tensor activation scale (a float32 scalar), else None.
      act: ``"dynamic"`` (per-token scales computed at run time) or ``"static"``.
    """

    act_scale: jax.Array | None = None
    act: str = "dynamic"

    _CHILDREN = ("packed", "scales", "biases", "perm", "input_scale", "act_scale")

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        """An int8 x int8 -> int32 matmul: the activations are quantized too."""
        return w8a8_matmul(x, self.as_matrix()).reshape(*x.shape[:-1], *self.rest_shape)

    def int8_weight(self) -> jax.Array:
        """The signed int8 codes ``[N, K]`` (rows flattened, input axis last)."""
        q = self.codes().reshape(-1, self.size).astype(jnp.int32) - _ZERO
        return q.astype(jnp.int8)

    def __repr__(self) -> str:
        return f"W8A8(shape={self.shape}, act={self.act}, axis={self.axis})"


def w8a8_quantize(w: jax.Array, *, axis: int = -1, act: str = "dynamic",
                  act_absmax: jax.Array | None = None, input_scale: jax.Array | None = None,
                  name: str = "tensor") -> W8A8:
    """int8 per-output-channel symmetric weight (``scale = max|w_row| / 127``).

    ``act_absmax`` (per input channel, of the site's input as the model computes it) sets the
    static activation scale ``max(act_absmax · input_scale) / 127``; needed for ``"static"``.
    """
    if act not in ("dynamic", "static"):
        raise ValueError(f"{name}: W8A8 act must be 'dynamic' or 'static', got {act!r}")
    formats.check_quantizable(w, 8, name)
    w = jnp.asarray(w)
    axis = axis - w.ndim if axis >= 0 else axis
    packed, scales, biases = _quantize_int8(w, axis=axis)
    act_scale = None
    if act == "static":
        if act_absmax is None:
            raise ValueError(f"{name}: static W8A8 needs the activations' absmax statistic")
        a = jnp.asarray(act_absmax, jnp.float32)
        if input_scale is not None:
            a = a * jnp.abs(input_scale)
        act_scale = jnp.maximum(jnp.max(a), 1e-8) / 127.0
    return W8A8(packed=packed, scales=scales, biases=biases, bits=8, group_size=w.shape[axis],
                size=w.shape[axis], axis=axis, dtype=w.dtype, fmt="affine",
                input_scale=None if input_scale is None else input_scale.astype(jnp.float32),
                act_scale=act_scale, act=act)


@partial(jax.jit, static_argnames=("axis",))
def _quantize_int8(w, *, axis):
    wt = jnp.moveaxis(w, axis, -1).astype(jnp.float32)
    sw = jnp.maximum(jnp.max(jnp.abs(wt), axis=-1, keepdims=True), 1e-8) / 127.0
    q = jnp.clip(jnp.round(wt / sw), -127, 127)
    packed = packing.pack((q + _ZERO).astype(jnp.uint32), 8)
    return packed, sw, -float(_ZERO) * sw


def quantize_act(x: jax.Array, act_scale: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """int8 activations and their scale: per token (last axis) if ``act_scale`` is None."""
    x = x.astype(jnp.float32)
    if act_scale is None:
        act_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-8) / 127.0
    xq = jnp.clip(jnp.round(x / act_scale), -127, 127).astype(jnp.int8)
    return xq, act_scale


def int8_matmul(xq: jax.Array, wq: jax.Array) -> jax.Array:
    """``xq[..., K] @ wq[N, K]ᵀ`` in int8 with exact int32 accumulation."""
    return jax.lax.dot_general(xq, wq, (((xq.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)


@jax.jit
def w8a8_matmul(x: jax.Array, w: W8A8) -> jax.Array:
    """``x[..., K] @ Wᵀ -> [..., N]`` (N = W's other axes flattened, in storage order) with
    int8 activations, int8 weights and an int32 accumulator, rescaled to ``x.dtype``.

    Applies the leaf's ``input_scale`` (unfolded smoothing) and ``perm`` before quantizing.
    """
    xs = x.astype(jnp.float32)
    if w.input_scale is not None:
        xs = xs * w.input_scale
    if w.perm is not None:
        xs = jnp.take(xs, w.perm, axis=-1)
    xq, a = quantize_act(xs, w.act_scale if w.act == "static" else None)
    acc = int8_matmul(xq, w.int8_weight())
    y = acc.astype(jnp.float32) * a * w.scales.reshape(-1).astype(jnp.float32)
    return y.astype(x.dtype)


# --- smoothing -------------------------------------------------------------------------------

def smooth_scales(act_absmax: jax.Array, w: jax.Array | Sequence[jax.Array],
                  alpha: float = 0.5, index: Any = None) -> jax.Array:
    """``s = absmax^α / max|W_col|^(1-α)`` per input channel (``w[out, in]``, or several
    weights reading the same input: the column max is over all of them). ``index`` (each input
    channel's producer channel, :meth:`ScaleGroup.channel_index`) ties the channels sharing a
    producer channel to one scale, from the maxima over them."""
    ws = (w,) if not isinstance(w, (list, tuple)) else tuple(w)
    wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=0)
                              for x in ws]), axis=0)
    a = jnp.asarray(act_absmax, jnp.float32)
    if index is None:
        index = np.arange(a.shape[0])
    uniq, idx = np.unique(np.asarray(index), return_inverse=True)
    if len(uniq) != a.shape[0]:  # one scale per tied channel: maxima over its copies
        a = jax.ops.segment_max(a, jnp.asarray(idx), len(uniq))
        wmax = jax.ops.segment_max(wmax, jnp.asarray(idx), len(uniq))
    s = jnp.maximum(a, 1e-5) ** alpha / jnp.maximum(wmax, 1e-5) ** (1.0 - alpha)
    return jnp.maximum(s, 1e-5)[idx]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuant(LeafTransform):
    """SmoothQuant W8A8 (needs ``absmax`` stats): smoothing folded into the previous op, then
    int8 weights per output channel and int8 activations.

    Attributes:
      alpha: migration strength (0: no smoothing; 1: all of the activation range moved).
      act: ``"dynamic"`` (per token) or ``"static"`` (per tensor, calibrated from absmax).
      scale_only: return the smoothed float params (no quantization).
      groups: as in :class:`~jaxq.quant.awq.AWQ` (None: the groups :func:`jaxq.calibrate`
        finds from the trace).
    """

    alpha: float = 0.5
    act: str = "dynamic"
    scale_only: bool = False
    groups: Sequence[ScaleGroup] | Callable[[Any], Sequence[ScaleGroup]] | None = None

    needs = frozenset({"absmax"})

    def __post_init__(self) -> None:
        if self.act not in ("dynamic", "static"):
            raise ValueError(f"SmoothQuant act must be 'dynamic' or 'static', got {self.act!r}")

    def with_traced_groups(self, groups: Sequence[ScaleGroup]) -> SmoothQuant:
        """This SmoothQuant with the groups found from the trace, unless groups were given."""
        return self if self.groups is not None else dataclasses.replace(
            self, groups=tuple(groups))

    def smooth(self, params: Any, *, stats: Mapping[str, Stats],
               axes: Mapping[str, int] | None = None, groups: Any = None
               ) -> tuple[list[ScaleGroup], dict[int, jax.Array]]:
        """Groups and each group's smoothing scale."""
        axes = axes or {}
        flat, cfgs, groups = configured_groups(self, params, groups)
        scales = {}
        for i, g in enumerate(groups):
            sites = [p for p in g.sites if cfgs.get(p) is not None]
            if not sites:
                continue
            if "absmax" not in stats.get(sites[0], {}):
                raise ValueError(f"SmoothQuant needs calibration statistics ['absmax'] for "
                                 f"'{sites[0]}'")
            alpha = cfgs[sites[0]].alpha
            ws = [_to_matrix(flat[p], axes.get(p, infer_input_axis(p, flat[p]))) for p in sites]
            scales[i] = smooth_scales(stats[sites[0]]["absmax"], ws, alpha,
                                      g.channel_index(ws[0].shape[1]))
        return groups, scales

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None, groups: Any = None) -> Any:
        stats, axes = stats or {}, axes or {}
        groups, scales = self.smooth(params, stats=stats, axes=axes, groups=groups)
        smoothed, unfolded = apply_scales(params, groups, scales, axes)
        if self.scale_only:
            return smoothed
        site_scale = site_scales(groups, scales)

        def one(path: str, leaf: Any) -> Any:
            cfg = self.resolve(path, leaf)
            if cfg is None or path not in site_scale:
                return leaf
            axis = axes.get(path, infer_input_axis(path, leaf))
            s = site_scale[path]
            inv = None
            if path in unfolded:
                leaf, inv = _scale_input(leaf, s, axis), 1.0 / s
                absmax = stats[path]["absmax"]  # w8a8_quantize applies input_scale itself
            else:
                absmax = scale_stats(stats[path], s)["absmax"]
            return w8a8_quantize(leaf, axis=axis, act=cfg.act, act_absmax=absmax,
                                 input_scale=inv, name=path)

        return tree_lib.map_with_path(one, smoothed)

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        """Per leaf (sequential mode): smoothing kept as the leaf's ``input_scale``."""
        if self.scale_only:
            return leaf
        s = smooth_scales(stats["absmax"], _to_matrix(leaf, axis), self.alpha)
        return w8a8_quantize(_scale_input(leaf, s, axis), axis=axis, act=self.act,
                             act_absmax=stats["absmax"], input_scale=1.0 / s, name=path)


__all__ = ["SmoothQuant", "W8A8", "int8_matmul", "quantize_act", "smooth_scales",
           "w8a8_matmul", "w8a8_quantize"]
