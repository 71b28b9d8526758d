"""Sparse leaves: pruned tensors stored so that they shrink, and their masks.

* :class:`NMSparse`: N:M sparsity along the input axis (``n`` kept of every ``m`` consecutive
  weights). The kept values form a dense ``[*rest, K·n/m]`` matrix (floats, or a
  :class:`~jaxq.core.qarray.QArray` over that matrix: 2:4 + 4-bit), and each one's position in
  its group is an index of ``ceil(log2 m)`` bits, packed LSB-first into uint32 words.
* :class:`Sparse`: any mask. A bitmask (1 bit per weight, packed in uint32) plus the kept
  values: a 1-D float array of the kept weights in row order (``[*rest, K]`` storage order), or
  a QArray over the full ``[*rest, K]`` whose codes at pruned positions are never read.

Either way a pruned weight materializes as an exact 0: the mask, not the quantizer, makes the
zero, so a pruned-then-quantized layer keeps every mask and every N:M group exactly.
``nbytes`` counts values, indices and masks. They live in core (beside QArray) because both
the pruning and the quantization transforms build them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import packing
from jaxq.core.leaf import Leaf, is_leaf, register_leaf
from jaxq.core.qarray import QArray, logical_shape


def parse_pattern(pattern: str | None, name: str = "tensor") -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None stays None (unstructured)."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ValueError(f"{name}: sparsity pattern must look like 'N:M' (e.g. '2:4'), "
                         f"got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m or m > 256:
        raise ValueError(f"{name}: pattern {pattern!r} needs 0 < N < M <= 256")
    return n, m


def index_bits(m: int) -> int:
    """Bits of one N:M position index."""
    return max(1, math.ceil(math.log2(m)))


@jax.jit
def _keep_sorted(keep: jax.Array) -> jax.Array:
    """Positions of the kept entries of each group (last axis), kept ones first, ascending."""
    return jnp.argsort(~keep, axis=-1, stable=True)


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep mask (True = kept) of the ``n`` highest scores of every ``m`` consecutive entries
    along the last axis (ties: the earlier entry is kept)."""
    *rest, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity needs the input width {k} to be a multiple of M={m}")
    g = scores.reshape(*rest, k // m, m)
    # An entry's rank among its m: the entries above it, and equal ones before it (m² compares,
    # far cheaper than two sorts for the small m of N:M patterns).
    gi, gj = g[..., :, None], g[..., None, :]
    before = jnp.arange(m)[:, None] < jnp.arange(m)[None, :]
    ranks = jnp.sum((gi > gj) | ((gi == gj) & before), axis=-2)
    return (ranks < n).reshape(*rest, k)


@register_leaf("nm_sparse")
@dataclasses.dataclass(frozen=True, eq=False)
class NMSparse(Leaf):
    """N:M-sparse tensor (see the module docstring).

    Attributes:
      values: ``[*rest, size·n/m]`` kept values in input order (floats or a QArray).
      indices: uint32 ``[*rest, words]``: ``index_bits(m)``-bit position of each kept value in
        its group of ``m``.
      n, m: the pattern. size: the logical input width. axis: the input axis (negative).
      dtype: the logical dtype.
    """

    values: Any
    indices: jax.Array
    n: int
    m: int
    size: int
    axis: int = -1
    dtype: Any = jnp.float32

    _CHILDREN = ("values", "indices")
    kind = "sparse"
    reachable = {"values": (-1, False)}

    @property
    def rest_shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.rest_shape, self.size, self.axis)

    def positions(self) -> jax.Array:
        """Each kept value's position in its group, ``[*rest, size·n/m]`` (uint32)."""
        return packing.unpack(self.indices, index_bits(self.m), self.size * self.n // self.m)

    def materialize(self, dtype: Any = None) -> jax.Array:
        rest, g = self.rest_shape, self.size // self.m
        v = self.values.materialize(jnp.float32) if is_leaf(self.values) else self.values
        v = v.astype(jnp.float32).reshape(*rest, g, self.n)
        idx = self.positions().reshape(*rest, g, self.n)
        onehot = idx[..., None] == jnp.arange(self.m, dtype=jnp.uint32)
        dense = jnp.sum(jnp.where(onehot, v[..., None], 0.0), axis=-2)
        w = jnp.moveaxis(dense.reshape(*rest, self.size), -1, self.axis)
        return w.astype(dtype or self.dtype)

    def describe(self) -> str:
        inner = self.values.describe() if is_leaf(self.values) else "float"
        return f"{self.n}:{self.m} sparse, {inner} values"


@register_leaf("sparse")
@dataclasses.dataclass(frozen=True, eq=False)
class Sparse(Leaf):
    """Unstructured sparse tensor (see the module docstring).

    Attributes:
      values: 1-D ``[nnz]`` kept values in ``[*rest, size]`` row order, or a QArray over the
        whole ``[*rest, size]`` (axis -1) whose pruned positions are masked out.
      bitmask: uint32 ``[*rest, ceil(size/32)]``, bit ``j`` of a row set where kept.
      size, axis, dtype: the logical input width, input axis (negative) and dtype.
    """

    values: Any
    bitmask: jax.Array
    size: int
    axis: int = -1
    dtype: Any = jnp.float32

    _CHILDREN = ("values", "bitmask")
    kind = "sparse"

    @property
    def rest_shape(self) -> tuple[int, ...]:
        return tuple(self.bitmask.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.rest_shape, self.size, self.axis)

    @property
    def scannable(self) -> bool:
        return is_leaf(self.values) and super().scannable

    def keep(self) -> jax.Array:
        """The mask ``[*rest, size]`` (True = kept)."""
        return packing.unpack(self.bitmask, 1, self.size).astype(bool)

    def materialize(self, dtype: Any = None) -> jax.Array:
        keep = self.keep()
        if is_leaf(self.values):
            dense = jnp.where(keep, self.values.materialize(jnp.float32), 0.0)
        else:
            flat = keep.reshape(-1)
            pos = jnp.clip(jnp.cumsum(flat) - 1, 0, max(self.values.shape[0] - 1, 0))
            vals = self.values.astype(jnp.float32)
            picked = vals[pos] if self.values.shape[0] else jnp.zeros(flat.shape)
            dense = jnp.where(flat, picked, 0.0).reshape(keep.shape)
        return jnp.moveaxis(dense, -1, self.axis).astype(dtype or self.dtype)

    def describe(self) -> str:
        inner = self.values.describe() if is_leaf(self.values) else "float"
        return f"unstructured sparse, {inner} values"


# --- building the leaves --------------------------------------------------------------------

def _rows(x: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(jnp.asarray(x), axis, -1)


def check_nm(keep: jax.Array, n: int, m: int, name: str = "tensor") -> None:
    """Every group of ``m`` along the last axis keeps exactly ``n``."""
    k = keep.shape[-1]
    counts = jnp.sum(keep.reshape(*keep.shape[:-1], k // m, m), axis=-1)
    if not bool(jnp.all(counts == n)):
        raise ValueError(f"{name}: mask is not {n}:{m} in every group of {m} inputs")


def to_sparse(w: jax.Array, keep: jax.Array, *, axis: int = -1,
              pattern: str | None = None, name: str = "tensor") -> Leaf:
    """``w`` (pruned where ``keep`` is False; same shape) as a sparse leaf with float values:
    :class:`NMSparse` for an N:M ``pattern`` (checked), else :class:`Sparse`."""
    w = jnp.asarray(w)
    axis = axis - w.ndim if axis >= 0 else axis
    wt, kt = _rows(w, axis), _rows(keep, axis).astype(bool)
    rest, k = wt.shape[:-1], wt.shape[-1]
    nm = parse_pattern(pattern, name)
    if nm is None:
        bitmask = packing.pack(kt.astype(jnp.uint32), 1)
        return Sparse(values=wt[kt], bitmask=bitmask, size=k, axis=axis, dtype=w.dtype)
    n, m = nm
    check_nm(kt, n, m, name)
    pos = _keep_sorted(kt.reshape(*rest, k // m, m))[..., :n]
    vals = jnp.take_along_axis(wt.reshape(*rest, k // m, m), pos, axis=-1)
    return NMSparse(values=vals.reshape(*rest, k * n // m),
                    indices=packing.pack(pos.reshape(*rest, -1), index_bits(m)),
                    n=n, m=m, size=k, axis=axis, dtype=w.dtype)


def from_codes(codes: jax.Array, scales: jax.Array, biases: jax.Array | None,
               keep: jax.Array, *, bits: int, group_size: int, axis: int, dtype: Any,
               pattern: str | None = None, name: str = "tensor") -> Leaf:
    """A pruned *and quantized* weight as a sparse leaf whose values are a QArray.

    ``codes``/``keep`` are ``[*rest, K]`` in storage order (input axis last), ``scales`` and
    ``biases`` ``[*rest, K // group_size]`` (affine). For an N:M pattern the kept codes are
    compacted: a dense group of ``group_size`` inputs holds ``group_size·n/m`` kept values,
    which form one group of the compact QArray with the same scale and bias.
    """
    rest, k = codes.shape[:-1], codes.shape[-1]
    keep = keep.astype(bool)
    nm = parse_pattern(pattern, name)
    if nm is None:
        q = QArray(packed=packing.pack(codes, bits), scales=scales, biases=biases, bits=bits,
                   group_size=group_size, size=k, axis=-1, dtype=dtype)
        return Sparse(values=q, bitmask=packing.pack(keep.astype(jnp.uint32), 1), size=k,
                      axis=axis, dtype=dtype)
    n, m = nm
    if group_size % m:
        raise ValueError(f"{name}: group size {group_size} must be a multiple of M={m}")
    check_nm(keep, n, m, name)
    pos = _keep_sorted(keep.reshape(*rest, k // m, m))[..., :n]
    kept = jnp.take_along_axis(codes.reshape(*rest, k // m, m), pos, axis=-1)
    kc = k * n // m
    q = QArray(packed=packing.pack(kept.reshape(*rest, kc), bits), scales=scales,
               biases=biases, bits=bits, group_size=group_size * n // m, size=kc, axis=-1,
               dtype=dtype)
    return NMSparse(values=q, indices=packing.pack(pos.reshape(*rest, -1), index_bits(m)),
                    n=n, m=m, size=k, axis=axis, dtype=dtype)


def mask_from_zeros(wt: jax.Array, pattern: str | None, name: str = "tensor") -> jax.Array:
    """The keep mask of an already pruned ``wt[..., K]`` (input axis last): its nonzeros, and
    for an N:M pattern, zeros added (earliest first) to groups holding fewer than N nonzeros.
    A group with more than N nonzeros is an error naming ``name``."""
    nz = wt != 0
    nm = parse_pattern(pattern, name)
    if nm is None:
        return nz
    n, m = nm
    if wt.shape[-1] % m:
        raise ValueError(f"{name}: input width {wt.shape[-1]} is not a multiple of M={m}")
    keep = nm_mask(nz.astype(jnp.float32), n, m)
    if not bool(jnp.all(keep | ~nz)):
        raise ValueError(f"{name}: the weight is not {n}:{m} sparse (a group of {m} inputs "
                         f"holds more than {n} nonzeros); prune it first")
    return keep
