"""Wanda: prune by |W_ij| · ||X_j|| within each output row (Sun et al., 2023)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxq.prune.base import Prune, select_mask


def wanda_mask(w: jax.Array, x_norm: jax.Array, sparsity: float = 0.5,
               pattern: str | None = None) -> jax.Array:
    """Keep mask of ``w[out, K]``: scores ``|w| · x_norm`` (``x_norm[K]`` the input channels'
    L2 norms over the calibration tokens) compared within each output row, or within every
    N:M group of a row."""
    scores = jnp.abs(w) * jnp.asarray(x_norm, jnp.float32)[None, :]
    return select_mask(scores, sparsity, pattern, per_row=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wanda(Prune):
    """Wanda pruning of each selected leaf (needs ``sq_norm`` statistics: Σx² per input).

    >>> import jax.numpy as jnp
    >>> w = jnp.ones((2, 4))
    >>> stats = {"fc/weight": {"sq_norm": jnp.array([1.0, 4.0, 9.0, 16.0])}}
    >>> Wanda(sparsity=0.5)({"fc": {"weight": w}}, stats=stats)["fc"]["weight"]
    Array([[0., 0., 1., 1.],
           [0., 0., 1., 1.]], dtype=float32)
    """

    needs = frozenset({"sq_norm"})

    def prune_matrix(self, w, stats, name, dtype):
        keep = wanda_mask(w, jnp.sqrt(stats["sq_norm"]), self.sparsity, self.pattern)
        return jnp.where(keep, w, 0.0), keep
