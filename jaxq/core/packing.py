"""Bit packing for the canonical layout: unsigned codes, least-significant-bit first, in uint32.

Element ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of one continuous little-endian
bitstream; word ``j`` holds stream bits ``[32j, 32j+32)``. This is the layout MLX uses for every
bit width (3, 5 and 6 bits cross word boundaries), so a packed row is byte-identical to MLX's.

Widths that divide 32 use shifts over a reshaped view; the others expand codes to single bits and
regroup them, which is loop-free and exact for any width from 1 to 8.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_width(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits (the stream is zero padded)."""
    return -(-n * bits // 32)


def pack(q: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack unsigned codes ``q[..., n]`` (< 2**bits) into uint32 words ``[..., packed_width]``.

    Host codes (numpy, lists) outside ``[0, 2**bits)`` are an error. Device arrays are not
    copied back to check them; they are masked to ``bits``, so a bad code can never spill
    into its neighbour's bits.
    """
    _check_bits(bits)
    if isinstance(q, (np.ndarray, list, tuple)):
        arr = np.asarray(q)
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
            raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, got "
                             f"[{arr.min()}, {arr.max()}]")
    q = jnp.asarray(q).astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    n = q.shape[-1]
    words = packed_width(n, bits)
    if 32 % bits == 0:
        per_word = 32 // bits
        pad = words * per_word - n
        if pad:
            q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
        q = q.reshape(*q.shape[:-1], words, per_word)
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
        return jnp.sum(q << shifts, axis=-1, dtype=jnp.uint32)
    # General width: explode into bits, regroup 32 at a time.
    bit_idx = jnp.arange(bits, dtype=jnp.uint32)
    stream = ((q[..., None] >> bit_idx) & 1).astype(jnp.uint32)
    stream = stream.reshape(*q.shape[:-1], n * bits)
    pad = words * 32 - n * bits
    if pad:
        stream = jnp.pad(stream, [(0, 0)] * (stream.ndim - 1) + [(0, pad)])
    stream = stream.reshape(*q.shape[:-1], words, 32)
    return jnp.sum(stream << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
    """Inverse of :func:`pack`: uint32 words ``[..., w]`` to ``n`` codes ``[..., n]`` (uint32)."""
    _check_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint32:
        raise TypeError(f"packed data must be uint32, got {packed.dtype}")
    words = packed.shape[-1]
    if words != packed_width(n, bits):
        raise ValueError(f"{words} words cannot hold exactly {n} codes of {bits} bits")
    mask = jnp.uint32((1 << bits) - 1)
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
        q = (packed[..., None] >> shifts) & mask
        return q.reshape(*packed.shape[:-1], words * per_word)[..., :n]
    stream = (packed[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    stream = stream.reshape(*packed.shape[:-1], words * 32)[..., : n * bits]
    stream = stream.reshape(*packed.shape[:-1], n, bits)
    return jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def pack_numpy(q: np.ndarray, bits: int) -> np.ndarray:
    """Reference packer in numpy (independent of :func:`pack`): used by tests and exporters."""
    _check_bits(bits)
    q = np.asarray(q, dtype=np.uint64)
    n = q.shape[-1]
    words = packed_width(n, bits)
    bitstream = ((q[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    bitstream = bitstream.reshape(*q.shape[:-1], n * bits)
    padded = np.zeros((*q.shape[:-1], words * 32), dtype=np.uint8)
    padded[..., : n * bits] = bitstream
    as_bytes = np.packbits(padded.reshape(*q.shape[:-1], words * 4, 8), axis=-1, bitorder="little")
    return np.ascontiguousarray(as_bytes[..., 0]).view("<u4").reshape(*q.shape[:-1], words)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:  # True == 1: not a width
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
