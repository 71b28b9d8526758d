"""OWL: non-uniform layer sparsities from outlier statistics (Yin et al., 2024).

A layer whose Wanda scores ``|W_ij| · ||X_j||`` hold more outliers (scores above ``m`` times
the layer's mean) keeps more of its weights. The outlier ratios ``D_l`` are mapped linearly
onto ``[s - lam, s + lam]`` (more outliers, less sparsity) and shifted so that the
parameter-weighted mean sparsity is the global target ``s``; the pruning transform then runs
with each layer's own sparsity.

The ratios come from the *float* model's activations, before any layer is pruned, so OWL
plans first (:meth:`OWL.planned`, or :func:`plan` which runs the statistics pass) and the
planned transform then runs in sequential calibration like any other.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.calib import collect_stats
from jaxq.core import tree as tree_lib
from jaxq.core.transform import Chain, Stats, Transform
from jaxq.prune.base import Prune
from jaxq.prune.magnitude import Magnitude


@jax.jit
def outlier_counts(w: jax.Array, x_norm: jax.Array, m: float) -> tuple[jax.Array, jax.Array]:
    """``(outliers, count)`` of the Wanda scores of ``w[..., K]`` (input axis last) against
    ``m`` times their mean."""
    scores = jnp.abs(w.astype(jnp.float32)) * x_norm.astype(jnp.float32)
    return jnp.sum(scores > m * jnp.mean(scores)), jnp.asarray(scores.size, jnp.float32)


def outlier_ratio(w: jax.Array, x_norm: jax.Array, m: float = 5.0) -> float:
    """Fraction of ``w``'s Wanda scores above ``m`` times their mean (OWL's LOD)."""
    out, count = outlier_counts(jnp.asarray(w), jnp.asarray(x_norm), m)
    return float(out) / float(count)


def owl_sparsities(ratios: np.ndarray, target: float, lam: float,
                   sizes: np.ndarray | None = None) -> np.ndarray:
    """Per-layer sparsities: ``ratios`` (outlier fractions) mapped onto ``[target - lam,
    target + lam]``, decreasing in the ratio, with ``sizes``-weighted mean ``target``."""
    d = np.asarray(ratios, np.float64)
    sizes = np.ones_like(d) if sizes is None else np.asarray(sizes, np.float64)
    span = d.max() - d.min()
    density = (d - d.min()) / span * 2 * lam if span > 0 else np.zeros_like(d)
    density = density - np.average(density, weights=sizes) + (1.0 - target)
    return np.clip(1.0 - density, 0.0, 0.99)


@dataclasses.dataclass(frozen=True)
class OWL(Transform):
    """OWL-style per-layer sparsities for a pruning transform under its global sparsity.

    Attributes:
      inner: the pruning transform (Magnitude, Wanda, SparseGPT; unstructured); its
        ``sparsity`` is the global target.
      lam: half-width of the sparsity range (the paper's λ, 0.08).
      m: outlier threshold in multiples of a layer's mean score (the paper's M, 5).
      group: a regex whose match in a path names the layer that leaves share one ratio with
        (e.g. ``r"layers/\\d+/"`` for a transformer block, as in the paper); None: per leaf.
    """

    inner: Prune
    lam: float = dataclasses.field(default=0.08, kw_only=True)
    m: float = dataclasses.field(default=5.0, kw_only=True)
    group: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Prune) or self.inner.pattern is not None:
            raise ValueError("OWL wraps an unstructured pruning transform (Magnitude, Wanda, "
                             "SparseGPT without a pattern)")
        if getattr(self.inner, "scope", "layer") != "layer":
            raise ValueError("OWL sets per-layer sparsities: give the inner Magnitude "
                             "scope='layer'")

    def _selected(self, path: str, leaf: Any) -> bool:
        return jnp.ndim(leaf) >= 2 and self.inner.resolve(path, leaf) is not None

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        need = self.inner.required_stats(path, leaf)
        return need | {"sq_norm"} if self._selected(path, leaf) else need

    def plan(self, params: Any, stats: Mapping[str, Stats],
             axes: Mapping[str, int] | None = None) -> dict[str, float]:
        """``{path: sparsity}`` for every leaf the inner transform selects."""
        axes = axes or {}
        groups: dict[str, list] = {}
        for path, leaf in tree_lib.flatten_with_paths(params)[0]:
            if not self._selected(path, leaf):
                continue
            norm = (stats.get(path) or {}).get("sq_norm")
            if norm is None:
                raise ValueError(f"OWL needs 'sq_norm' statistics for '{path}'")
            axis = axes.get(path, -1)
            w = jnp.moveaxis(jnp.asarray(leaf), axis, -1)
            x = jnp.sqrt(jnp.asarray(norm))
            if x.ndim == 2:  # a leaf stacked for scan: one norm per layer slice
                x = x.reshape(x.shape[0], *(1,) * (w.ndim - 2), x.shape[1])
            out, count = outlier_counts(w, x, self.m)
            key = path
            if self.group is not None:
                found = re.search(self.group, path)
                key = found[0] if found else path
            groups.setdefault(key, []).append((path, float(out), float(count)))
        if not groups:
            return {}
        keys = list(groups)
        ratios = np.array([sum(o for _, o, _ in groups[g]) / sum(c for _, _, c in groups[g])
                           for g in keys])
        sizes = np.array([sum(c for _, _, c in groups[g]) for g in keys])
        sp = owl_sparsities(ratios, self.inner.sparsity, self.lam, sizes)
        return {p: float(s) for g, s in zip(keys, sp) for p, _, _ in groups[g]}

    def planned(self, params: Any, stats: Mapping[str, Stats],
                axes: Mapping[str, int] | None = None) -> Prune:
        """The inner transform with each leaf's planned sparsity in its overrides."""
        own = dict(self.inner.overrides)
        fields = {f"^{re.escape(p)}$": {**(next((f for pat, f in own.items()
                                                  if re.search(pat, p)), None) or {}),
                                        "sparsity": s}
                  for p, s in self.plan(params, stats, axes).items()}
        return dataclasses.replace(self.inner, overrides={**fields, **own})

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        raise TypeError("OWL plans sparsities over the whole model from the float model's "
                        "statistics: call it on the params with stats, or resolve it first "
                        "with jaxq.prune.plan(transform, apply_fn, params, batches)")

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        stats = stats or {}
        return self.planned(params, stats, axes)(params, stats=stats, axes=axes)


@dataclasses.dataclass(frozen=True)
class _NormsOnly(Transform):
    """The statistics OWL plans from, without the inner transform's (no Gram matrices)."""

    owl: OWL

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        return frozenset({"sq_norm"}) if self.owl._selected(path, leaf) else frozenset()


def _needs_plan(t: Transform) -> bool:
    if isinstance(t, Chain):
        return any(_needs_plan(s) for s in t.transforms)
    return isinstance(t, OWL) or (isinstance(t, Magnitude) and t.scope == "global")


def plan(transform: Transform, apply_fn: Callable, params: Any, batches: Iterable[Any], *,
         progress: bool = True) -> Transform:
    """``transform`` with every whole-model decision settled, ready for
    ``jaxq.calibrate(apply_fn, params, batches, planned)``: OWL steps get their per-layer
    sparsities (one statistics pass over the float model), global magnitude its threshold."""
    if not _needs_plan(transform):
        return transform
    batches = list(batches)
    steps = transform.transforms if isinstance(transform, Chain) else (transform,)
    owls = [s for s in steps if isinstance(s, OWL)]
    stats, axes = ({}, {})
    if owls:
        stats, axes = collect_stats(apply_fn, params, batches, [_NormsOnly(o) for o in owls],
                                    progress=progress)

    def one(t: Transform) -> Transform:
        if isinstance(t, OWL):
            return t.planned(params, stats, axes)
        if isinstance(t, Magnitude):
            return t.planned(params)
        return t

    out = tuple(one(s) for s in steps)
    return Chain(out) if isinstance(transform, Chain) else out[0]
