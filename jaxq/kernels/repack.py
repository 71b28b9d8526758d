"""One-time repack of a canonical :class:`QArray` into the layout the Pallas kernels stream.

Canonical: ``packed[N, K*bits/32]`` with codes LSB-first along K. Kernel layout (K-major, so a
weight tile ``[rows, bn]`` is a coalesced 2-D load and N is the lane/contiguous axis)::

    packed[c*R + r, n] holds, in its bit-slot j, the code of element k = c*C + σ(j)*R + r

with ``R`` word rows per chunk and ``C = R * 32/bits`` elements per chunk. Extracting slot ``j``
of a ``[R, bn]`` word tile therefore yields a *contiguous* K-slab ``[c*C + σ(j)*R, +R)``, which
is multiplied with a contiguous slice of ``x``: no gather in-kernel. The slot order σ
(:func:`slot_slabs`) of the Triton layout puts slabs ``2i`` and ``2i + 1`` in the slots 16 bits
apart, so one shift and one mask turn a word into a packed pair of 16-bit operands from two
neighbouring slabs (the tensor-core kernel's bf16x2/f16x2 registers); Mosaic keeps σ(j) = j.

Scales and biases move to ``[G, N]`` (one row per group), keeping their stored dtype so the
kernel reads exactly the bytes the canonical layout holds. K and N are zero padded to the chunk
and lane alignment; padded codes meet zero activations (K) or are never stored (N).

Repacking costs one pass over the weights, so do it once and keep the :class:`PackedForKernel`
beside (or instead of) the QArray; :func:`cached_repack` memoises it for concrete weights.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxq.core.fused import FusedSlice
from jaxq.core.leaf import Leaf
from jaxq.core.qarray import QArray, undo_input_transforms

KERNEL_BITS = (2, 4, 8)
KERNEL_FORMATS = ("affine", "nf4")
LAYOUT_ROWS = {"triton": 32, "mosaic": 128}


class KernelMeta(NamedTuple):
    """The static (hashable) description of a :class:`PackedForKernel`, for kernel closures."""

    bits: int
    group_size: int
    k: int
    n: int
    rows: int
    fmt: str
    k_padded: int
    n_padded: int
    layout: str = "triton"

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def slot_slabs(self) -> tuple[int, ...]:
        """The K-slab of a chunk that each bit-slot of a word holds (see :func:`slot_slabs`)."""
        return slot_slabs(self.bits, self.layout)

    @property
    def slab_slots(self) -> tuple[int, ...]:
        """The inverse of :attr:`slot_slabs`: the bit-slot holding each slab."""
        order = self.slot_slabs
        return tuple(order.index(slab) for slab in range(len(order)))

    @property
    def chunk(self) -> int:
        return self.rows * self.per_word

    @property
    def per_channel(self) -> bool:
        return self.group_size >= self.k


class KernelMatrix(Leaf):
    """The array-like shape of a 2-D kernel-layout weight with fields ``n``, ``k``, ``axis``,
    and the input-axis transforms of its QArray (``perm``, ``input_scale``: see
    :class:`~jaxq.core.qarray.QArray`). The kernels never see those: ``qmatmul`` applies them
    to ``x`` first, so act-order GPTQ and unfolded AWQ weights are repacked once too."""

    n: int
    k: int
    axis: int
    perm: jax.Array | None
    input_scale: jax.Array | None

    kind = "quantized"

    def dequantize(self, dtype: Any = None) -> jax.Array:
        raise NotImplementedError

    def materialize(self, dtype: Any = None) -> jax.Array:
        return self.dequantize(dtype)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        from jaxq.kernels.qmatmul import qmatmul

        return qmatmul(x, self)

    @property
    def scannable(self) -> bool:
        return False

    @property
    def has_input_transforms(self) -> bool:
        return self.perm is not None or self.input_scale is not None

    def _transform_bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.perm, self.input_scale)
                   if a is not None)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical float tensor's shape: ``(N, K)``, or ``(K, N)`` when ``axis == -2``."""
        return (self.n, self.k) if self.axis == -1 else (self.k, self.n)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def rest_shape(self) -> tuple[int]:
        return (self.n,)

    @property
    def size(self) -> int:
        """Elements along the input axis (the QArray meaning of ``size``)."""
        return self.k


@dataclasses.dataclass(frozen=True, eq=False)
class PackedForKernel(KernelMatrix):
    """A 2-D quantized weight ``(N, K)`` in the kernels' chunk-interleaved K-major layout.

    Attributes:
      packed: uint32 ``[Kp * bits / 32, Np]``.
      scales: ``[Gp, Np]`` per-group scales (affine) or absmax (nf4), stored dtype.
      biases: ``[Gp, Np]`` or ``None`` (nf4).
      bits, group_size, fmt, dtype: as in the source QArray.
      k, n: logical contraction and output sizes.
      rows: word rows per chunk (``R``); the chunk holds ``rows * 32 // bits`` elements.
      layout: ``"triton"`` or ``"mosaic"``: which kernel family the alignment targets.
      axis: the input axis of the *logical* tensor it stands for (as in the source QArray):
        ``-1`` for an ``(N, K)`` weight, ``-2`` for a flax-style ``(K, N)`` kernel. Only
        :attr:`shape` and :meth:`dequantize` look at it; the kernels always compute
        ``x @ W(N, K)ᵀ``.

    Like a QArray it is a *compressed leaf* for jaxq traversals and compressed execution
    (:func:`jaxq.apply` runs ``qmatmul`` on it at its matmul sites, dequantizes it elsewhere).
    """

    packed: jax.Array
    scales: jax.Array
    biases: jax.Array | None
    bits: int
    group_size: int
    k: int
    n: int
    rows: int
    fmt: str = "affine"
    dtype: Any = jnp.float32
    layout: str = "triton"
    axis: int = -1
    perm: jax.Array | None = None
    input_scale: jax.Array | None = None

    _CHILDREN: ClassVar[tuple[str, ...]] = ("packed", "scales", "biases", "perm", "input_scale")

    @property
    def per_word(self) -> int:
        return self.meta.per_word

    @property
    def chunk(self) -> int:
        """Elements of K per chunk of ``rows`` word rows."""
        return self.meta.chunk

    @property
    def k_padded(self) -> int:
        return self.packed.shape[0] * 32 // self.bits

    @property
    def n_padded(self) -> int:
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        """Storage in bytes, padding and input transforms included."""
        return sum(a.size * a.dtype.itemsize for a in (self.packed, self.scales, self.biases)
                   if a is not None) + self._transform_bytes()

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The logical float tensor (shape :attr:`shape`) in ``dtype`` (default: ``self.dtype``)."""
        from jaxq.kernels.qmatmul import dequant_kernel_layout

        w = dequant_kernel_layout(self, jnp.float32).T  # (N, K), stored column order
        w = undo_input_transforms(w, self.perm, self.input_scale).astype(dtype or self.dtype)
        return w if self.axis == -1 else w.T

    @property
    def per_channel(self) -> bool:
        return self.meta.per_channel

    @property
    def meta(self) -> KernelMeta:
        return KernelMeta(self.bits, self.group_size, self.k, self.n, self.rows, self.fmt,
                          self.k_padded, self.n_padded, self.layout)


def slot_slabs(bits: int, layout: str) -> tuple[int, ...]:
    """The slab held by each bit-slot ``j`` (bits ``[j*bits, (j+1)*bits)``) of a word.

    Triton: slots ``j`` and ``j + P/2`` (``P = 32 / bits``), 16 bits apart, hold slabs ``2j`` and
    ``2j + 1``, so ``(word >> j*bits) & (m | m << 16)`` is a pair of codes from neighbouring
    slabs in the two halves of one register. Mosaic: slot ``j`` holds slab ``j``.

    >>> slot_slabs(4, "triton")
    (0, 2, 4, 6, 1, 3, 5, 7)
    """
    per_word = 32 // bits
    if layout != "triton":
        return tuple(range(per_word))
    half = per_word // 2
    return tuple(2 * j if j < half else 2 * (j - half) + 1 for j in range(per_word))


def unsupported_reason(w: QArray, layout: str = "triton") -> str | None:
    """Why the Pallas kernels cannot take ``w`` (None when they can); callers fall back to XLA."""
    if type(w) is not QArray:
        return f"a {type(w).__name__} runs its own matmul (jaxq.apply), not a kernel's"
    if layout == "mosaic_gpu":
        from jaxq.kernels.pallas_mosaic_gpu import unsupported_reason as mosaic_gpu_reason

        return mosaic_gpu_reason(w)
    if w.fmt not in KERNEL_FORMATS:
        return f"format {w.fmt!r} has no kernel (kernels: {KERNEL_FORMATS})"
    if w.bits not in KERNEL_BITS:
        return f"{w.bits}-bit codes straddle words; kernels take bits in {KERNEL_BITS}"
    if w.fmt == "nf4" and w.bits != 4:
        return "nf4 needs 4-bit codes"
    if len(w.rest_shape) != 1:
        return f"kernels take 2-D weights, got shape {w.shape}"
    if w.scales.shape != (*w.rest_shape, w.n_groups):
        return "per-tensor scales are not supported by the kernels"
    rows = _rows_for(w.group_size, w.size, layout)
    chunk = rows * 32 // w.bits
    g = w.group_size
    if g >= w.size or (g % rows == 0 and (chunk % g == 0 or g % chunk == 0)):
        return None
    return f"group size {g} does not tile chunks of {chunk} ({rows}-row slabs)"


def _rows_for(group_size: int, k: int, layout: str) -> int:
    """Word rows per chunk: the layout default, shrunk so a slab never spans two groups."""
    rows = LAYOUT_ROWS[layout]
    if group_size < k:
        while rows > 32 and group_size % rows:
            rows //= 2
    return rows


def _n_align(n: int, layout: str) -> int:
    """Pad N to a lane-friendly multiple: 128 (any block up to 128 divides it) or a power of 2."""
    if layout == "mosaic" or n >= 128:
        return 128
    return max(16, 1 << (n - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def repack(w: QArray, layout: str = "triton") -> PackedForKernel:
    """Convert a 2-D QArray (any ``axis``) into the kernel layout (jittable, one weight pass).

    Its ``perm`` and ``input_scale`` (act-order GPTQ, unfolded AWQ) travel with the result,
    for ``qmatmul`` to apply to ``x``.

    ``layout="mosaic_gpu"`` gives the Mosaic GPU kernel's weight instead
    (:func:`jaxq.kernels.pallas_mosaic_gpu.repack_mosaic_gpu`).
    """
    if w.perm is not None or w.input_scale is not None:  # kept beside the layout, for x
        plain = repack(dataclasses.replace(w, perm=None, input_scale=None), layout)
        return dataclasses.replace(plain, perm=w.perm, input_scale=w.input_scale)
    if layout == "mosaic_gpu":
        from jaxq.kernels.pallas_mosaic_gpu import repack_mosaic_gpu

        return repack_mosaic_gpu(w)
    reason = unsupported_reason(w, layout)
    if reason:
        raise ValueError(f"cannot repack {w!r}: {reason}")
    rows = _rows_for(w.group_size, w.size, layout)
    return _repack(w, rows=rows, n_align=_n_align(w.rest_shape[0], layout), layout=layout)


def _repack(w: QArray, *, rows: int, n_align: int, layout: str) -> PackedForKernel:
    n, k, bits = w.rest_shape[0], w.size, w.bits
    per_word = 32 // bits
    chunk = rows * per_word
    kp, np_ = _round_up(k, chunk), _round_up(n, n_align)
    codes = w.codes()  # [N, K] uint32
    codes = jnp.pad(codes, ((0, np_ - n), (0, kp - k)))
    slabs = codes.reshape(np_, kp // chunk, per_word, rows)
    slots = slabs[:, :, jnp.asarray(slot_slabs(bits, layout)), :]  # slot j <- slab σ(j)
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits)[None, None, :, None]
    words = jnp.sum(slots << shifts, axis=2, dtype=jnp.uint32)  # [Np, nC, R]
    packed = words.reshape(np_, kp // per_word).T
    groups = -(-kp // w.group_size)
    scales = _pad_groups(w.scales, groups, np_)
    biases = None if w.biases is None or w.fmt == "nf4" else _pad_groups(w.biases, groups, np_)
    return PackedForKernel(packed=packed, scales=scales, biases=biases, bits=bits,
                           group_size=w.group_size, k=k, n=n, rows=rows, fmt=w.fmt,
                           dtype=jnp.dtype(w.dtype), layout=layout,
                           axis=-1 if w.axis in (-1, 1) else -2)


def _pad_groups(p: jax.Array, groups: int, np_: int) -> jax.Array:
    """``[N, G]`` -> zero padded, transposed ``[Gp, Np]``."""
    n, g = p.shape
    return jnp.pad(p, ((0, np_ - n), (0, groups - g))).T


def unpack_kernel_codes(p: PackedForKernel) -> jax.Array:
    """Codes back in logical order ``[Kp, Np]`` (uint32): the inverse of the interleave."""
    slots = jnp.asarray(p.meta.slab_slots, jnp.uint32)  # slab order
    shifts = (slots * p.bits)[None, :, None, None]
    words = p.packed.reshape(p.k_padded // p.chunk, 1, p.rows, p.n_padded)
    codes = (words >> shifts) & jnp.uint32((1 << p.bits) - 1)
    return codes.reshape(p.k_padded, p.n_padded)


_CACHE: dict[tuple, tuple[list[weakref.ref], dict[str, PackedForKernel]]] = {}


def cached_repack(w: QArray, layout: str = "triton") -> PackedForKernel:
    """Repack once per concrete weight: keyed by the identities of all its arrays (codes,
    scales, biases, perm, input scale) and its static fields, so a QArray that shares the
    codes but not the scales (``dataclasses.replace(w, scales=...)``) gets its own repack.

    Traced weights cannot be cached: inside ``jit`` pass a :class:`PackedForKernel` instead,
    or the repack runs (inside the compiled program) on every call.
    """
    if isinstance(w.packed, jax.core.Tracer):
        return repack(w, layout)
    arrays = [getattr(w, name) for name in QArray._CHILDREN]
    key = (*(id(a) for a in arrays), w.bits, w.group_size, w.size, w.axis, w.fmt,
           jnp.dtype(w.dtype).name)
    entry = _CACHE.get(key)
    if entry is None or any(r() is not a for r, a in zip(entry[0], arrays, strict=True)):
        def drop(_, key=key):
            _CACHE.pop(key, None)

        # None children have no weakref: a stand-in that always answers None matches them.
        refs = [weakref.ref(a, drop) if a is not None else (lambda: None) for a in arrays]
        entry = (refs, {})
        _CACHE[key] = entry
    by_layout = entry[1]
    if layout not in by_layout:
        by_layout[layout] = repack(w, layout)
    return by_layout[layout]


def layout_for(backend: str) -> str:
    """The weight layout a kernel backend reads (the Triton kernels share one)."""
    return backend if backend in ("mosaic", "mosaic_gpu") else "triton"


def prepare(params: Any, backend: str | None = None) -> Any:
    """Repack every 2-D QArray leaf the kernels take into its :class:`PackedForKernel`, once.

    Do this eagerly, outside ``jit``, before compressed execution: under
    ``jax.jit(jaxq.apply(fn))`` a QArray is traced, so :func:`cached_repack` cannot memoise
    and the repack would run inside every call. ``PackedForKernel`` leaves are compressed
    leaves to :func:`jaxq.apply` (the model sees the float shape; matmul sites call
    ``qmatmul`` on them directly, other uses dequantize). ``backend`` as in ``qmatmul``
    (default: by platform); with the XLA backend (CPU) the params are returned unchanged.
    QArrays the kernels cannot take (formats, bit widths, stacked or N-D leaves) stay as they
    are. Each repack is one jitted pass per distinct weight structure. The members of a fused
    group (:func:`jaxq.calib.fuse.fuse_siblings`) keep sharing one repacked weight.
    """
    from jaxq.core.tree import is_leaf
    from jaxq.kernels.qmatmul import BACKENDS, default_backend

    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "xla":
        return params
    layout = layout_for(backend)

    shared: dict[int, tuple[QArray, Any]] = {}  # a fused group's weight, repacked once

    def convert(x):
        if isinstance(x, FusedSlice):
            key = id(x.fused)
            if key not in shared:
                shared[key] = (x.fused, convert(x.fused))
            return dataclasses.replace(x, fused=shared[key][1])
        if isinstance(x, QArray) and x.ndim == 2 and unsupported_reason(x, layout) is None:
            return _jit_repack(x, layout)
        return x

    return jax.tree.map(convert, params, is_leaf=is_leaf)


@functools.cache
def _repack_fn(layout: str):
    return jax.jit(functools.partial(repack, layout=layout))


def _jit_repack(w: QArray, layout: str) -> PackedForKernel:
    return _repack_fn(layout)(w)
