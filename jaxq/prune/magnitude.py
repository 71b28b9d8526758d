"""Magnitude pruning: drop the weights of smallest |w|, per layer or over the whole model."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core import tree as tree_lib
from jaxq.core.transform import Stats, Transform
from jaxq.prune.base import Prune, select_mask


def magnitude_mask(w: jax.Array, sparsity: float = 0.5, pattern: str | None = None
                   ) -> jax.Array:
    """Keep mask of ``w[..., K]`` (input axis last): the largest |w| of the whole matrix, or of
    every N:M group along the last axis."""
    return select_mask(jnp.abs(w), sparsity, pattern, per_row=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Magnitude(Prune):
    """Magnitude pruning (no calibration).

    Attributes:
      scope: ``"layer"`` (each leaf loses ``sparsity`` of its weights) or ``"global"`` (one
        |w| threshold over every selected leaf: call it on the whole params tree, or run
        :meth:`planned` first for per-leaf use).

    >>> import jax.numpy as jnp
    >>> w = jnp.arange(1.0, 9.0).reshape(2, 4)
    >>> Magnitude(sparsity=0.5)({"fc": {"weight": w}})["fc"]["weight"]
    Array([[0., 0., 0., 0.],
           [5., 6., 7., 8.]], dtype=float32)
    """

    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise ValueError(f"Magnitude scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.pattern is not None:
            raise ValueError("Magnitude: an N:M pattern is per group; use scope='layer'")

    def prune_matrix(self, w, stats, name, dtype):
        keep = magnitude_mask(w, self.sparsity, self.pattern)
        return jnp.where(keep, w, 0.0), keep

    def plan(self, params: Any) -> dict[str, float]:
        """Per-leaf sparsity under one global |w| threshold (exactly ``floor(sparsity · N)``
        weights of the ``N`` selected ones are below it)."""
        chosen = [(p, np.abs(np.asarray(x, np.float32)).ravel())
                  for p, x in tree_lib.flatten_with_paths(params)[0]
                  if self.resolve(p, x) is not None and jnp.ndim(x) >= 2]
        if not chosen:
            return {}
        allw = np.concatenate([a for _, a in chosen])
        drop = int(self.sparsity * allw.size)
        if drop == 0:
            return {p: 0.0 for p, _ in chosen}
        thresh = np.partition(allw, drop - 1)[drop - 1]
        return {p: float(np.sum(a <= thresh)) / a.size for p, a in chosen}

    def planned(self, params: Any) -> Transform:
        """Per-layer magnitude pruning at the global plan's per-leaf sparsities."""
        if self.scope == "layer":
            return self
        fields = {f"^{re.escape(p)}$": {"sparsity": min(s, 0.999999)}
                  for p, s in self.plan(params).items()}
        return dataclasses.replace(self, scope="layer", overrides={**fields, **self.overrides})

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        if self.scope == "global":
            raise TypeError("Magnitude(scope='global') thresholds over the whole tree: call it "
                            "on the params, or use .planned(params) for per-leaf use")
        return super().apply_leaf(path, leaf, axis=axis, stats=stats)

    def __call__(self, params: Any, *, stats: Any = None, axes: Any = None) -> Any:
        return Prune.__call__(self.planned(params), params, stats=stats, axes=axes)

