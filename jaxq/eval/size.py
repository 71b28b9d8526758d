"""Storage figures: bytes, parameter counts and bits per weight as the eval protocol defines them.

Bits per weight = every stored bit of every parameter tensor (codes, scales, biases, norms,
embeddings at their stored dtype) over the number of logical parameters. The linear-layers-only
figure is reported beside it, labelled as such.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.core.tree import flatten_with_paths, is_leaf

#: Linear layers of the llama family (and generic flax kernels).
LINEAR = re.compile(r"(_proj/weight|lm_head/weight|/kernel)$")


def leaf_bytes(leaf: Any) -> int:
    if is_leaf(leaf):  # QArray, PackedForKernel, FusedSlice (its share of the group)
        return leaf.nbytes
    return int(np.prod(jnp.shape(leaf))) * jnp.dtype(jnp.result_type(leaf)).itemsize


def leaf_params(leaf: Any) -> int:
    return int(np.prod(leaf.shape if is_leaf(leaf) else jnp.shape(leaf)))


@dataclasses.dataclass(frozen=True)
class SizeReport:
    total_bytes: int
    n_params: int
    linear_bytes: int
    linear_params: int

    @property
    def mb(self) -> float:
        return self.total_bytes / 1e6

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / self.n_params

    @property
    def linear_bits_per_weight(self) -> float:
        return 8.0 * self.linear_bytes / max(self.linear_params, 1)


def size_report(params: Any, linear: re.Pattern = LINEAR) -> SizeReport:
    total = count = lin_bytes = lin_count = 0
    for path, leaf in flatten_with_paths(params)[0]:
        b, n = leaf_bytes(leaf), leaf_params(leaf)
        total += b
        count += n
        if linear.search(path):
            lin_bytes += b
            lin_count += n
    return SizeReport(total, count, lin_bytes, lin_count)
