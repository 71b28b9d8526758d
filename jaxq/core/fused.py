"""FusedSlice: a compressed leaf that is a row range of a weight shared by a fused group.

Built by :func:`jaxq.calib.fuse.fuse_siblings` (which explains why); here are the leaf type
and the concatenation it needs, beside QArray.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core.leaf import Leaf, site_matmul
from jaxq.core.qarray import QArray, logical_shape


@dataclasses.dataclass(frozen=True, eq=False)
class FusedSlice(Leaf):
    """One member of a fused group: rows ``[start, start + prod(rest_shape))`` of ``fused``.

    Attributes:
      fused: the group's weight, a 2-D ``(N_total, K)`` QArray (``axis=-1``) or the
        :class:`~jaxq.kernels.repack.PackedForKernel` that ``prepare`` made of it. Every member
        of a group holds the same object (one buffer on the device).
      group: a name for the group (static): members of one group share it, and compressed
        execution uses it to compute the group's product once per activation.
      start: the member's first row in ``fused``.
      rest_shape: the member's output dims in storage order (its QArray's ``rest_shape``).
      axis: the member's logical input axis (negative), as in its QArray.
      dtype: the member's logical dtype.
    """

    fused: Any
    group: str
    start: int
    rest_shape: tuple[int, ...]
    axis: int
    dtype: Any

    _CHILDREN = ("fused",)
    kind = "quantized"

    @property
    def stop(self) -> int:
        return self.start + math.prod(self.rest_shape)

    @property
    def size(self) -> int:
        """Elements along the input axis (K)."""
        return self.fused.size

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.rest_shape, self.size, self.axis)

    @property
    def nbytes(self) -> int:
        """This member's share of the group's storage (by rows), so shares add up to it."""
        return self.fused.nbytes * (self.stop - self.start) // math.prod(self.fused.rest_shape)

    def materialize(self, dtype: Any = None) -> jax.Array:
        """The tensor this member replaced, in its logical shape."""
        w = self.fused.materialize(dtype or self.dtype)[self.start:self.stop]
        return jnp.moveaxis(w.reshape(*self.rest_shape, self.size), -1, self.axis)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        """This member's rows of the group's product, which the first member to meet ``x``
        computes and keeps in ``cache`` (one per activation) for its siblings."""
        cache = {} if cache is None else cache
        if self.group not in cache:
            cache[self.group] = site_matmul(self.fused, x)
        y = cache[self.group][..., self.start:self.stop]
        return y.reshape(*x.shape[:-1], *self.rest_shape)

    @property
    def scannable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return (f"FusedSlice(shape={self.shape}, group={self.group!r}, "
                f"rows=[{self.start}, {self.stop}))")


def _values(a: Any) -> Any:
    return None if a is None else (a.shape, jnp.dtype(a.dtype).name, np.asarray(a).tobytes())


def fusion_key(q: QArray) -> tuple:
    """What members of one fused weight must agree on: format, sizes, dtypes, and the values
    of any permutation or input scale (one copy of those is kept). Needs concrete arrays."""
    return (q.bits, q.group_size, q.size, q.fmt, jnp.dtype(q.dtype), q.scales.shape[-1],
            jnp.dtype(q.scales.dtype), q.biases is None, _values(q.perm),
            _values(q.input_scale))


def concat_rows(members: list[QArray]) -> QArray:
    """One ``(sum N_i, K)`` QArray (``axis=-1``) holding the members' output rows in order.

    The members must agree on :func:`fusion_key`; a per-tensor scale is broadcast to per-row
    first.
    """
    first = members[0]
    for q in members[1:]:
        if fusion_key(q) != fusion_key(first):
            raise ValueError(f"cannot fuse {q!r} with {first!r}: formats differ (or their "
                             "permutations or input scales)")

    def rows(q: QArray, a: jax.Array) -> jax.Array:
        n = math.prod(q.rest_shape)
        return jnp.broadcast_to(a, (*q.rest_shape, a.shape[-1])).reshape(n, a.shape[-1])

    def cat(name: str) -> jax.Array | None:
        if getattr(first, name) is None:
            return None
        return jnp.concatenate([rows(q, getattr(q, name)) for q in members])

    return dataclasses.replace(first, packed=cat("packed"), scales=cat("scales"),
                               biases=cat("biases"), axis=-1)
