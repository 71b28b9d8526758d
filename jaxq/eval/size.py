"""Storage figures: bytes, parameter counts and bits per weight as the eval protocol defines them.

Bits per weight = every stored bit of every parameter tensor (codes, scales, biases, masks,
indices, factors, norms, embeddings at their stored dtype) over the number of logical
parameters. Beside it: the figure per kind of leaf (each compressed leaf's ``kind``, ``dense``
for plain arrays) and the linear-layers-only figure, where the linear layers are the matrices
that are neither embeddings, norms nor biases (:data:`jaxq.core.tree.DEFAULT_EXCLUDE`), named
by no model family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxq.core.leaf import is_leaf, n_params, nbytes
from jaxq.core.tree import DEFAULT_EXCLUDE, flatten_with_paths


@dataclasses.dataclass(frozen=True)
class SizeReport:
    total_bytes: int
    n_params: int
    linear_bytes: int
    linear_params: int
    #: ``{kind: (bytes, params)}``: compressed leaves by their ``kind``, plain arrays as "dense".
    by_kind: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def mb(self) -> float:
        return self.total_bytes / 1e6

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.n_params

    @property
    def linear_bits_per_weight(self) -> float:
        return 8.0 * self.linear_bytes / max(self.linear_params, 1)


def is_linear(path: str, leaf: Any) -> bool:
    """A matrix (compressed, or a float array of rank >= 2) that is not an embedding, a norm
    or a bias."""
    matrix = is_leaf(leaf) or (jnp.ndim(leaf) >= 2
                               and jnp.issubdtype(jnp.result_type(leaf), jnp.floating))
    return matrix and DEFAULT_EXCLUDE.search(path) is None


def size_report(params: Any) -> SizeReport:
    total = count = lin_bytes = lin_count = 0
    by_kind: dict[str, tuple[int, int]] = {}
    for path, leaf in flatten_with_paths(params)[0]:
        b, n = nbytes(leaf), n_params(leaf)
        total += b
        count += n
        kind = leaf.kind if is_leaf(leaf) else "dense"
        kb, kn = by_kind.get(kind, (0, 0))
        by_kind[kind] = (kb + b, kn + n)
        if is_linear(path, leaf):
            lin_bytes += b
            lin_count += n
    return SizeReport(total, count, lin_bytes, lin_count, by_kind)
