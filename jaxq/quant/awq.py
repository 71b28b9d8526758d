"""AWQ: activation-aware per-input-channel scaling before quantization (Lin et al., 2023).

A linear site ``y = x Wᵀ`` is unchanged by ``W -> W·diag(s)``, ``x -> x·diag(1/s)``; scaling up
the input channels with large activations shrinks their relative rounding error. The search
picks ``s = mean|x|^α`` (normalised) over a grid of ``α`` and measures each candidate's output
error *exactly* from the Gram matrix, ``tr(ΔW XᵀX ΔWᵀ)``, so no activations are kept.

The inverse scale goes into the op that produces ``x`` where the graph allows (a norm's weight,
or the rows of a previous linear: :class:`ScaleGroup`); sites sharing an input share one ``s``
and the search minimises the sum of their errors. A site with no such op keeps ``1/s`` as the
QArray's ``input_scale`` (compressed execution multiplies the input by it).

The groups come from the model's trace (:mod:`jaxq.calib.groups`; :func:`jaxq.calibrate` finds
them), or are given by hand (``groups=``; :func:`jaxq.models.llama.llama_scale_groups` names the
Llama layout). The folding code here (:func:`apply_scales`, :func:`scale_stats`) is shared with
SmoothQuant.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.calib.groups import SIBLING, ScaleGroup
from jaxq.core import formats
from jaxq.core import tree as tree_lib
from jaxq.core.leaf import is_leaf
from jaxq.core.qarray import QArray
from jaxq.core.transform import LeafTransform, Stats, Transform, infer_input_axis
from jaxq.quant.rtn import fallback_group_size

_HI = jax.lax.Precision.HIGHEST


# --- scale groups and folding (shared with SmoothQuant) --------------------------------------

def _bias_path(g: ScaleGroup, flat: Mapping[str, Any]) -> str | None:
    if g.prev_bias != SIBLING:
        return g.prev_bias
    path = g.prev.rsplit("/", 1)[0] + "/bias"
    return path if path in flat else None


def _to_matrix(w: jax.Array, axis: int) -> jax.Array:
    """``[rows, K]`` view of a weight with its input axis last (float32)."""
    w = jnp.moveaxis(jnp.asarray(w), axis, -1)
    return w.reshape(-1, w.shape[-1]).astype(jnp.float32)


def _scale_input(w: jax.Array, s: jax.Array, axis: int) -> jax.Array:
    """``w`` with its input axis multiplied by ``s``, in ``w``'s dtype."""
    shape = [1] * w.ndim
    shape[axis] = -1
    return (w.astype(jnp.float32) * s.reshape(shape)).astype(w.dtype)


def apply_scales(params: Any, groups: Sequence[ScaleGroup], scales: Mapping[int, jax.Array],
                 axes: Mapping[str, int] | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """Fold per-group scales into params: sites ``W·diag(s)``, previous op ``/ s``.

    ``scales[i]`` is group ``i``'s scale over its sites' input channels. Exact in float: the
    model's output is unchanged (up to rounding). Groups without ``prev`` are *not* changed;
    the returned dict ``{site: s}`` lists their sites, whose quantizer must store ``W·s`` with
    ``input_scale = 1/s``.
    """
    axes = axes or {}
    flat = dict(tree_lib.flatten_with_paths(params)[0])
    updates: dict[str, Any] = {}
    unfolded: dict[str, jax.Array] = {}

    def get(path: str) -> Any:
        return updates.get(path, flat[path])

    for i, g in enumerate(groups):
        if i not in scales:
            continue
        s = jnp.asarray(scales[i], jnp.float32)
        if g.prev is None or g.prev not in flat:
            for site in g.sites:
                unfolded[site] = s
            continue
        for site in g.sites:
            leaf = get(site)
            updates[site] = _scale_input(leaf, s, axes.get(site, infer_input_axis(site, leaf)))
        idx = g.channel_index(s.shape[0])
        prev = get(g.prev)
        if g.prev_kind == "norm":
            s_prev = jnp.ones((prev.shape[0],), jnp.float32).at[idx].set(s)
            updates[g.prev] = (prev.astype(jnp.float32) / s_prev).astype(prev.dtype)
        else:
            if prev.ndim != 2:
                raise ValueError(f"{g.prev}: folding into linear rows needs a 2-D weight")
            in_axis = axes.get(g.prev, infer_input_axis(g.prev, prev)) % 2
            out_axis = 1 - in_axis
            s_prev = jnp.ones((prev.shape[out_axis],), jnp.float32).at[idx].set(s)
            updates[g.prev] = _scale_input(prev, 1.0 / s_prev, out_axis - 2)
        bias = _bias_path(g, flat)
        if bias is not None:
            b = get(bias)
            updates[bias] = (b.astype(jnp.float32) / s_prev).astype(b.dtype)
    new = tree_lib.map_with_path(lambda p, leaf: updates.get(p, leaf), params)
    return new, unfolded


def scale_stats(stats: Stats, s: jax.Array) -> dict[str, Any]:
    """A site's statistics after its input was multiplied by ``1/s`` (exact for all built-ins)."""
    s = jnp.asarray(s, jnp.float32)
    out = dict(stats)
    if "gram" in out:
        out["gram"] = out["gram"] / (s[:, None] * s[None, :])
    if "sq_norm" in out:
        out["sq_norm"] = out["sq_norm"] / (s * s)
    for name in ("mean_abs", "absmax"):
        if name in out:
            out[name] = out[name] / s
    return out


def site_scales(groups: Sequence[ScaleGroup], scales: dict[int, Any]) -> dict[str, Any]:
    """Each site's scale, from the scales found per group."""
    return {p: scales[i] for i, g in enumerate(groups) if i in scales for p in g.sites}


def configured_groups(transform: Any, params: Any, groups: Any = None
                      ) -> tuple[dict[str, Any], dict[str, Any], list[ScaleGroup]]:
    """The leaves by path, each leaf's resolved configuration (None where the transform skips
    it) and the scale groups over the selected leaves: the set-up AWQ and SmoothQuant share."""
    flat = dict(tree_lib.flatten_with_paths(params)[0])
    cfgs = {p: transform.resolve(p, leaf) for p, leaf in flat.items()}
    selected = [p for p, c in cfgs.items() if c is not None]
    spec = transform.groups if groups is None else groups
    return flat, cfgs, resolve_groups(spec, params, selected)


def resolve_groups(groups: Any, params: Any, selected: Sequence[str]) -> list[ScaleGroup]:
    """Groups from a spec (list, ``params -> list``, or None: none known, which is what a
    whole-tree call outside :func:`jaxq.calibrate` gets; ``jaxq.calibrate`` fills in the groups
    found from the trace), with every selected site not in any group added as a group of its
    own without ``prev``. Those sites keep an unfolded ``input_scale``: a warning names them."""
    if callable(groups):
        groups = groups(params)
    groups = list(groups or ())
    covered = {s for g in groups for s in g.sites}
    alone = [p for p in selected if p not in covered]
    alone += [p for g in groups if g.prev is None for p in g.sites if p in selected]
    if alone:
        shown = ", ".join(alone[:8]) + (f" and {len(alone) - 8} more" if len(alone) > 8 else "")
        how = ("no scale groups were given: run it through jaxq.calibrate (which finds them "
               "from the trace) or pass groups=" if not groups else
               "no norm or linear producing their input could take the scale")
        warnings.warn(f"scales not folded for {len(alone)} site(s) ({how}): {shown}",
                      stacklevel=3)
    return groups + [ScaleGroup(sites=(p,)) for p in selected if p not in covered]


# --- the search ------------------------------------------------------------------------------

def _rtn_dequant(w: jax.Array, bits: int, gs: int, symmetric: bool, ratio: Any = None):
    rows, k = w.shape
    wg = w.reshape(rows, k // gs, gs)
    s, b = formats.affine_params(wg, bits, symmetric, (-1,), ratio)
    q = formats.affine_codes(wg, s, b, bits)
    return (q * s + b).reshape(rows, k)


def gram_error(dw: jax.Array, gram: jax.Array) -> jax.Array:
    """Summed squared output error ``tr(ΔW G ΔWᵀ) = Σ_rows ||X Δwᵀ||²`` for ``G = XᵀX``."""
    return jnp.sum(jnp.dot(dw, gram, precision=_HI) * dw)


def awq_candidates(stat: jax.Array, alphas: jax.Array, idx: jax.Array) -> jax.Array:
    """Scales ``stat^α`` (clamped, normalised by ``sqrt(max·min)``), expanded through ``idx``."""
    s = jnp.maximum(stat[None, :] ** alphas[:, None], 1e-4)
    s = s / jnp.sqrt(jnp.max(s, axis=1, keepdims=True) * jnp.min(s, axis=1, keepdims=True))
    return s[:, idx]


@partial(jax.jit, static_argnames=("cfgs", "grid"))
def _search(ws: tuple, gram, stat, idx, *, cfgs: tuple, grid: int):
    alphas = jnp.linspace(0.0, 1.0, grid)
    cands = awq_candidates(stat, alphas, idx)

    def err(s):
        total = jnp.zeros((), jnp.float32)
        for w, (bits, gs, sym) in zip(ws, cfgs):
            dq = _rtn_dequant(w * s, bits, gs, sym) / s
            total = total + gram_error(dq - w, gram)
        return total

    errs = jax.lax.map(err, cands)
    best = jnp.argmin(errs)
    return cands[best], errs[best], errs


def awq_search(w: jax.Array | Sequence[jax.Array], gram: jax.Array, mean_abs: jax.Array, *,
               bits: int = 4, group_size: int | str | None = 64, grid: int = 20,
               symmetric: bool = False) -> tuple[jax.Array, jax.Array]:
    """Best AWQ scale ``s [in]`` for ``w[out, in]`` (or several weights sharing the input).

    For each ``α`` in ``linspace(0, 1, grid)``: ``s = mean_abs^α`` normalised, RTN of
    ``W·diag(s)``, dequantized and divided by ``s``; the output error ``tr(ΔW G ΔWᵀ)`` (summed
    over the weights) is exact for the calibration set. Returns ``(s, error)``. ``α = 0`` is
    plain RTN, so the result is never worse than RTN on the calibration set.
    """
    ws = (w,) if not isinstance(w, (list, tuple)) else tuple(w)
    ws = tuple(jnp.asarray(x, jnp.float32) for x in ws)
    k = ws[0].shape[1]
    gs = formats.resolve_group_size(k, group_size)
    cfgs = tuple((bits, gs, symmetric) for _ in ws)
    s, loss, _ = _search(ws, jnp.asarray(gram, jnp.float32), jnp.asarray(mean_abs, jnp.float32),
                         jnp.arange(k), cfgs=cfgs, grid=grid)
    return s, loss


@partial(jax.jit, static_argnames=("bits", "gs", "symmetric", "grid", "min_ratio"))
def search_clip_gram(w: jax.Array, gram: jax.Array, *, bits: int, gs: int,
                     symmetric: bool = False, grid: int = 20,
                     min_ratio: float = 0.5) -> jax.Array:
    """Per-group clip ratio ``[rows, n_groups]`` minimising each group's output error
    ``Δw_g G_gg Δw_gᵀ`` (the Gram's diagonal block: cross-group terms are ignored, as AWQ's
    own clipping search does with sampled activations).

    Not :func:`jaxq.quant.rtn.search_clip`: that one weighs each weight's squared error by one
    importance per input channel (the Gram's diagonal), which is all RTN's ``clip="mse"`` has;
    AWQ has the whole Gram, and within a group the channels' errors correlate through it (the
    off-diagonal terms of ``G_gg``), so this search measures the output error exactly per group.
    Grid and ratios are the same (``linspace(1, min_ratio, grid)``)."""
    rows, k = w.shape
    ng = k // gs
    blocks = gram.reshape(ng, gs, ng, gs)[jnp.arange(ng), :, jnp.arange(ng), :]  # [ng, gs, gs]
    wg = w.reshape(rows, ng, gs)
    ratios = jnp.linspace(1.0, min_ratio, grid)

    def err(r):
        s, b = formats.affine_params(wg, bits, symmetric, (-1,), r)
        d = formats.affine_codes(wg, s, b, bits) * s + b - wg
        return jnp.einsum("ogi,gij,ogj->og", d, blocks, d, precision=_HI)

    errs = jax.lax.map(err, ratios)
    return ratios[jnp.argmin(errs, axis=0)]


# --- the transform ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ(LeafTransform):
    """AWQ scaling, then RTN (default) or another quantizer (``then=``), or scaling only.

    Attributes:
      bits, group_size, symmetric, scale_dtype, group_fallback: the quantization grid (also the
        grid the search measures against; per-path ``overrides`` apply per site).
      grid: number of ``α`` values in ``[0, 1]``.
      clip: after scaling, search a per-group clip ratio by Gram-weighted error (RTN only).
      then: a leaf transform (e.g. ``GPTQ(...)``) given the scaled weight and the scaled
        statistics (``diag(1/s) G diag(1/s)``) instead of RTN.
      scale_only: return float params with the scales folded (sites without a previous op are
        left unscaled, since a float leaf cannot carry an input scale).
      groups: a list of :class:`ScaleGroup`, a callable ``params -> list``, or None: the
        groups :func:`jaxq.calibrate` finds from the trace (selected sites outside every group
        keep ``input_scale``, and a warning names them).

    Whole-tree use (``awq(params, stats=..., axes=...)``) folds scales; per-leaf use (the
    calibration interpreter's sequential mode) cannot reach other leaves, so each site keeps
    its scale as ``input_scale`` there.
    """

    bits: int = 4
    group_size: int | str | None = 64
    symmetric: bool = False
    grid: int = 20
    clip: bool = False
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    scale_dtype: Any = None
    group_fallback: tuple[int, ...] = ()
    then: Transform | None = None
    scale_only: bool = False
    groups: Sequence[ScaleGroup] | Callable[[Any], Sequence[ScaleGroup]] | None = None

    needs = frozenset({"gram", "mean_abs"})

    def __post_init__(self) -> None:
        formats.check_quantizer_fields(self)

    def with_traced_groups(self, groups: Sequence[ScaleGroup]) -> AWQ:
        """This AWQ with the groups found from the trace, unless groups were given."""
        return self if self.groups is not None else dataclasses.replace(
            self, groups=tuple(groups))

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        base = super().required_stats(path, leaf)
        if base and self.then is not None:
            base = base | self.then.required_stats(path, leaf)
        return base

    def _gs(self, size: int) -> int:
        return formats.resolve_group_size(
            size, fallback_group_size(size, self.group_size, self.group_fallback))

    # -- search -----------------------------------------------------------------------------
    def search(self, params: Any, *, stats: Mapping[str, Stats], axes: Mapping[str, int] | None
               = None, groups: Any = None) -> tuple[list[ScaleGroup], dict[int, jax.Array]]:
        """The groups and each group's best scale (``{group index: s}``)."""
        axes = axes or {}
        flat, cfgs, groups = configured_groups(self, params, groups)
        scales = {}
        for i, g in enumerate(groups):
            sites = [p for p in g.sites if cfgs.get(p) is not None]
            if not sites:
                continue
            for p in sites:
                missing = self.needs - set(stats.get(p, {}))
                if missing:
                    raise ValueError(f"AWQ needs calibration statistics {sorted(missing)} "
                                     f"for '{p}'")
            st = stats[sites[0]]
            ws = tuple(_to_matrix(flat[p], axes.get(p, infer_input_axis(p, flat[p])))
                       for p in sites)
            k = ws[0].shape[1]
            # One statistic per producer channel: the mean over the site channels it feeds.
            uniq, idx = np.unique(g.channel_index(k), return_inverse=True)
            stat = jnp.asarray(st["mean_abs"], jnp.float32)
            if len(uniq) != k:
                counts = np.bincount(idx, minlength=len(uniq))
                stat = jax.ops.segment_sum(stat, jnp.asarray(idx), len(uniq)) / counts
            search_cfgs = tuple((cfgs[p].bits, cfgs[p]._gs(k), cfgs[p].symmetric)
                                for p in sites)
            s, _, _ = _search(ws, jnp.asarray(st["gram"], jnp.float32), stat, jnp.asarray(idx),
                              cfgs=search_cfgs, grid=self.grid)
            scales[i] = s
        return groups, scales

    # -- whole tree ------------------------------------------------------------------------
    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None, groups: Any = None) -> Any:
        return self.transform_with_stats(params, stats=stats, axes=axes, groups=groups)[0]

    def transform_with_stats(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                             axes: Mapping[str, int] | None = None, groups: Any = None
                             ) -> tuple[Any, dict[str, Stats]]:
        """New params and the statistics of the scaled model, from one search.

        The statistics are what a transform applied next (``chain(AWQ(scale_only=True),
        GPTQ())``) must see: folded sites' inputs are divided by their scale.
        """
        stats, axes = stats or {}, axes or {}
        groups, scales = self.search(params, stats=stats, axes=axes, groups=groups)
        scaled, unfolded = apply_scales(params, groups, scales, axes)
        site_scale = site_scales(groups, scales)
        new_stats = dict(stats)
        for p, s in site_scale.items():
            if p not in unfolded and p in new_stats:
                new_stats[p] = scale_stats(new_stats[p], s)
        if self.scale_only:
            return scaled, new_stats

        def one(path: str, leaf: Any) -> Any:
            cfg = self.resolve(path, leaf)
            if cfg is None or path not in site_scale:
                return leaf
            axis = axes.get(path, infer_input_axis(path, leaf))
            s = site_scale[path]
            original = leaf
            if path in unfolded:
                leaf = _scale_input(leaf, s, axis)
            return cfg._quantize(path, leaf, axis, scale_stats(stats[path], s),
                                 1.0 / s if path in unfolded else None, original=original)

        return tree_lib.map_with_path(one, scaled), new_stats

    def stats_after(self, params: Any, *, stats: Mapping[str, Stats],
                    axes: Mapping[str, int] | None = None, groups: Any = None
                    ) -> dict[str, Stats]:
        """Statistics of the scaled model (see :meth:`transform_with_stats`)."""
        only = dataclasses.replace(self, scale_only=True)
        return only.transform_with_stats(params, stats=stats, axes=axes, groups=groups)[1]

    # -- per leaf (sequential mode): the scale stays an input scale ----------------------------
    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        if self.scale_only:
            return leaf  # a float leaf cannot carry 1/s; whole-tree mode folds it instead
        w = _to_matrix(leaf, axis)
        k = w.shape[1]
        s, _, _ = _search((w,), jnp.asarray(stats["gram"], jnp.float32),
                          jnp.asarray(stats["mean_abs"], jnp.float32), jnp.arange(k),
                          cfgs=((self.bits, self._gs(k), self.symmetric),), grid=self.grid)
        return self._quantize(path, _scale_input(leaf, s, axis), axis, scale_stats(stats, s),
                              1.0 / s, original=leaf)

    def _quantize(self, path: str, w: Any, axis: int, stats: Stats,
                  input_scale: jax.Array | None, original: Any) -> Any:
        """Quantize the scaled weight ``w`` (RTN or ``then``); attach ``input_scale``."""
        if self.then is not None:
            q = self.then.apply_leaf(path, w, axis=axis, stats=stats)
            if not is_leaf(q):  # ``then`` skipped it: undo an unfolded scale
                return w if input_scale is None else original
            if input_scale is not None and not isinstance(q, QArray):
                raise ValueError(
                    f"AWQ: {path}: its scale could not be folded into a previous op, and "
                    f"`then` made a {q.kind} leaf, which cannot carry an input scale; exclude "
                    "the site from AWQ or give it a scale group")
        else:
            k = w.shape[axis]
            gs = fallback_group_size(k, self.group_size, self.group_fallback)
            ratio = None
            if self.clip and gs not in (None, "channel", "tensor"):
                ratio = search_clip_gram(_to_matrix(w, axis),
                                         jnp.asarray(stats["gram"], jnp.float32),
                                         bits=self.bits, gs=self._gs(k),
                                         symmetric=self.symmetric, grid=self.clip_grid,
                                         min_ratio=self.clip_min_ratio)
                rest = jnp.moveaxis(jnp.asarray(w), axis, -1).shape[:-1]
                ratio = ratio.reshape(*rest, -1)
            q = formats.quantize(w, bits=self.bits, group_size=gs, axis=axis,
                                 symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                                 clip_ratio=ratio, name=path)
        if input_scale is not None:
            q = dataclasses.replace(q, input_scale=input_scale.astype(jnp.float32))
        return q
