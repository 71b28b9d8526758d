"""What every pruning transform shares: the pattern, the storage, stacked leaves, and the
unstructured mask."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core.leaf import Leaf
from jaxq.core.sparse import nm_mask, parse_pattern, to_sparse
from jaxq.core.transform import LeafTransform, Stats


@partial(jax.jit, static_argnames=("sparsity", "per_row"))
def unstructured_mask(scores: jax.Array, sparsity: float, per_row: bool = False) -> jax.Array:
    """Keep mask dropping exactly ``floor(sparsity · count)`` lowest scores, over the whole
    matrix or (``per_row``) within each row of the last axis (ties: the earlier is dropped)."""
    flat = scores.reshape(-1, scores.shape[-1]) if per_row else scores.reshape(1, -1)
    drop = int(sparsity * flat.shape[-1])
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
    return (ranks >= drop).reshape(scores.shape)


def select_mask(scores: jax.Array, sparsity: float, pattern: str | None, *,
                per_row: bool) -> jax.Array:
    """Keep mask for ``scores[..., K]``: N:M along the last axis, or unstructured."""
    nm = parse_pattern(pattern)
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, float(sparsity), per_row)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune(LeafTransform):
    """Base of the pruning transforms.

    Attributes:
      sparsity: fraction of weights set to zero (ignored with a pattern).
      pattern: None (unstructured) or ``"N:M"`` (``n`` kept of every ``m`` inputs).
      storage: ``"dense"`` (a float array with exact zeros: what the next transform of a chain,
        e.g. ``GPTQ(keep_mask=...)``, wants) or ``"sparse"`` (a :class:`~jaxq.core.sparse.
        NMSparse` / :class:`~jaxq.core.sparse.Sparse` leaf that stores only what is kept).
    """

    sparsity: float = 0.5
    pattern: str | None = None
    storage: str = "dense"

    def __post_init__(self) -> None:
        parse_pattern(self.pattern, type(self).__name__)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"{type(self).__name__}: sparsity must be in [0, 1), got "
                             f"{self.sparsity}")
        if self.storage not in ("dense", "sparse"):
            raise ValueError(f"{type(self).__name__}: storage must be 'dense' or 'sparse', "
                             f"got {self.storage!r}")

    @property
    def effective_sparsity(self) -> float:
        nm = parse_pattern(self.pattern)
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]

    def prune_matrix(self, w: jax.Array, stats: Stats | None, name: str, dtype: Any
                     ) -> tuple[jax.Array, jax.Array] | Leaf:
        """``w[rows, K]`` (input axis last) -> ``(pruned float32 [rows, K], keep mask)``, or a
        finished leaf ``[rows, K]`` (axis -1) for transforms that quantize too."""
        raise NotImplementedError

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.ndim < 2:
            raise ValueError(f"{path}: {type(self).__name__} prunes float matrices, got "
                             f"{leaf.dtype} {leaf.shape}")
        axis = axis - leaf.ndim if axis >= 0 else axis
        stacked = stats is not None and any(
            jnp.ndim(v) == (3 if k == "gram" else 2) for k, v in stats.items())
        if stacked:  # a leaf stacked for scan: one set of statistics per layer slice
            if axis == -leaf.ndim:
                raise ValueError(f"{path}: the stacking axis cannot be the input axis")
            outs = [self._one(f"{path}[{i}]", leaf[i], axis,
                              {k: v[i] for k, v in stats.items()})
                    for i in range(leaf.shape[0])]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return self._one(path, leaf, axis, stats)

    def _one(self, path: str, leaf: jax.Array, axis: int, stats: Stats | None) -> Any:
        wt = jnp.moveaxis(leaf, axis, -1)
        rest, k = wt.shape[:-1], wt.shape[-1]
        nm = parse_pattern(self.pattern, path)
        if nm is not None and k % nm[1]:
            raise ValueError(f"{path}: {self.pattern} sparsity needs the input width {k} to "
                             f"be a multiple of {nm[1]}")
        out = self.prune_matrix(wt.reshape(-1, k).astype(jnp.float32), stats, path, leaf.dtype)
        if isinstance(out, Leaf):  # pruned and quantized: already a sparse leaf
            return _reshape_leaf(out, rest, axis)
        w, keep = out
        w = w.reshape(*rest, k).astype(leaf.dtype)
        w, keep = jnp.moveaxis(w, -1, axis), jnp.moveaxis(keep.reshape(*rest, k), -1, axis)
        if self.storage == "sparse":
            return to_sparse(w, keep, axis=axis, pattern=self.pattern, name=path)
        return w


def _reshape_leaf(leaf: Leaf, rest: tuple[int, ...], axis: int) -> Leaf:
    """A sparse leaf built on ``[rows, K]`` given back its rows' shape and its input axis."""
    def rows(x: jax.Array) -> jax.Array:
        return x if x.ndim == 1 else x.reshape(*rest, x.shape[-1])

    return dataclasses.replace(jax.tree.map(rows, leaf), axis=axis)
