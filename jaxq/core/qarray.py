"""QArray: a quantized tensor as a pytree node in the canonical MLX-affine layout.

``w = scale * q + bias`` per group of ``group_size`` consecutive elements along the *input axis*
(the axis a matmul contracts). The input axis is moved last for storage, so a torch/MLX-style
``(out, in)`` weight is stored exactly as MLX stores it, and a flax-style ``(in, out)`` kernel is
stored transposed. ``axis`` is kept negative so that leading dimensions added by ``vmap`` or a
``scan`` over stacked layers slice the children consistently.

Children (traced): ``packed`` uint32 codes, ``scales``, ``biases``, and two optional input-axis
transforms: ``perm`` (GPTQ act-order without static groups stores columns in quantization
order) and ``input_scale`` (AWQ scales that could not be folded into a preceding op). With
both, ``y = x @ W.T`` is computed as ``((x * input_scale)[..., perm]) @ stored.T``. Everything
else is static.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import packing
from jaxq.core.leaf import Leaf, register_leaf


@register_leaf("qarray")
@dataclasses.dataclass(frozen=True, eq=False)
class QArray(Leaf):
    """Quantized tensor.

    Attributes:
      packed: uint32 ``[*rest, words]`` where ``rest`` is the logical shape without ``axis``.
      scales: ``[*rest, n_groups]`` (all ones-sized leading dims for per-tensor scales).
      biases: same shape as ``scales``, or ``None`` for formats without an offset.
      bits: code width, 1 to 8.
      group_size: elements per group along ``axis`` (equal to the axis length per channel).
      size: length of the logical input axis.
      axis: the input axis, as a negative index into the logical shape.
      dtype: logical (dequantized) dtype.
      fmt: code format: ``"affine"`` or one registered in :mod:`jaxq.core.formats`.
      perm: optional int32 ``[size]``: stored column ``j`` is logical input column ``perm[j]``.
      input_scale: optional ``[size]`` (logical order): the logical weight is the stored one
        times ``input_scale`` along the input axis.

    >>> import jax.numpy as jnp, jaxq
    >>> w = jnp.linspace(-1, 1, 256).reshape(4, 64)
    >>> q = jaxq.quantize(w, bits=4, group_size=32)
    >>> q.shape, q.nbytes < w.nbytes
    ((4, 64), True)
    """

    packed: jax.Array
    scales: jax.Array
    biases: jax.Array | None
    bits: int
    group_size: int
    size: int
    axis: int = -1
    dtype: Any = jnp.float32
    fmt: str = "affine"
    perm: jax.Array | None = None
    input_scale: jax.Array | None = None

    _CHILDREN = ("packed", "scales", "biases", "perm", "input_scale")
    kind = "quantized"

    # --- array-like metadata ---------------------------------------------------------------
    @property
    def rest_shape(self) -> tuple[int, ...]:
        """Logical shape with the input axis removed (the storage order of rows)."""
        return tuple(self.packed.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.rest_shape, self.size, self.axis)

    @property
    def n_groups(self) -> int:
        return self.size // self.group_size

    @property
    def granularity(self) -> str:
        if self.group_size < self.size:
            return "group"
        return "tensor" if all(d == 1 for d in self.scales.shape[:-1]) else "channel"

    def codes(self) -> jax.Array:
        """The unsigned codes ``[*rest, size]`` (uint32)."""
        return packing.unpack(self.packed, self.bits, self.size)

    def materialize(self, dtype: Any = None) -> jax.Array:
        """The float tensor this QArray stands for, in its logical shape."""
        from jaxq.core.formats import decode

        q = self.codes()
        rest = self.rest_shape
        grouped = q.reshape(*rest, self.n_groups, self.group_size)
        w = decode(self, grouped)
        w = undo_input_transforms(w.reshape(*rest, self.size), self.perm, self.input_scale)
        w = jnp.moveaxis(w, -1, self.axis)
        return w.astype(dtype or self.dtype)

    dequantize = materialize

    def as_matrix(self) -> QArray:
        """The same codes seen as an ``(N, K)`` QArray, N = the other axes in storage order."""
        words, groups = self.packed.shape[-1], self.scales.shape[-1]
        biases = None if self.biases is None else self.biases.reshape(-1, groups)
        return dataclasses.replace(self, packed=self.packed.reshape(-1, words),
                                   scales=self.scales.reshape(-1, groups), biases=biases,
                                   axis=-1)

    def describe(self) -> str:
        gs = {"group": f"g{self.group_size}", "channel": "per-channel",
              "tensor": "per-tensor"}[self.granularity]
        extra = "".join([" act-order" if self.perm is not None else "",
                         " input-scale" if self.input_scale is not None else ""])
        return (f"{self.fmt} {self.bits}-bit {gs} "
                f"({jnp.dtype(self.scales.dtype).name} scales){extra}")

    def __repr__(self) -> str:
        if not hasattr(self.packed, "shape"):  # one side of jaxq.partition, or a mask
            return f"QArray(<partitioned>, scales={self.scales!r}, biases={self.biases!r})"
        return (f"QArray(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, fmt={self.fmt}, "
                f"bits={self.bits}, group_size={self.group_size}, axis={self.axis}, "
                f"scale_dtype={jnp.dtype(self.scales.dtype).name})")


def logical_shape(rest_shape: tuple[int, ...], size: int, axis: int) -> tuple[int, ...]:
    """The shape of a tensor stored as ``[*rest_shape, size]`` with its input axis at ``axis``."""
    rest = list(rest_shape)
    pos = len(rest) + 1 + axis
    return tuple(rest[:pos] + [size] + rest[pos:])


def undo_input_transforms(w: jax.Array, perm: jax.Array | None,
                          input_scale: jax.Array | None) -> jax.Array:
    """``[*rest, size]`` weights in stored column order -> the logical weight's columns: the
    permutation undone, then the input scale applied (kernel-layout weights share this)."""
    if perm is not None:
        inv = _align(jnp.argsort(perm, axis=-1), w.ndim)
        w = jnp.take_along_axis(w, jnp.broadcast_to(inv, w.shape), axis=-1)
    if input_scale is not None:
        w = w * _align(input_scale.astype(jnp.float32), w.ndim)
    return w


def _align(per_input: jax.Array, ndim: int) -> jax.Array:
    """Give a ``[*lead, size]`` per-input-column array the rank of ``[*lead, *rows, size]``."""
    lead = per_input.shape[:-1]
    return per_input.reshape(*lead, *(1,) * (ndim - len(lead) - 1), per_input.shape[-1])


def dequantize(x: Any, dtype: Any = None) -> Any:
    """The dense tensor of any compressed leaf (any other value passes through unchanged)."""
    return x.materialize(dtype) if getattr(type(x), "_jaxq_leaf", False) else x
