"""Pallas (Triton backend) kernel for ``y = x @ dequant(W)ᵀ`` on the repacked layout.

One program owns a ``[bm, bn]`` output tile (and, with split-K, a slice of K). Per chunk it loads
a ``[R, bn]`` uint32 word tile once; bit-slot ``j`` of that tile is the contiguous K-slab
``σ(j)`` of the chunk (see :mod:`jaxq.kernels.repack`), so each slab is one
``dot(x[:, slab], codes_slab)`` on tensor cores with f32 accumulation.

Three tricks keep the dequantization off the critical path:

* codes become floats by bit-OR into a magic exponent (``0x4300|q`` is the bf16 ``128 + q``,
  ``0x6400|q`` the f16 ``1024 + q``): no int->float conversion, exact for the code range;
* two codes per operation (:func:`paired`): the tensor-core operand holds two 16-bit values of
  neighbouring K per 32-bit register, and the layout keeps neighbouring slabs 16 bits apart in
  a word, so ``(w >> j*bits) & (m | m << 16) | magic2`` is a finished register for slabs
  ``2j`` and ``2j + 1`` (``x`` is interleaved to match, once per call). Decoding slab by slab
  cost a shift and a mask per code plus a PRMT per pair to pack the halves: 37 instructions
  per word of the main loop at M = 16 (sm_90, ``scripts/kernel_sass.py``), 25 now;
* the affine map is applied per group *after* the dot,
  ``y += s_g * x_g·(off+q_g) + (b_g - off·s_g)·Σx_g``, so per weight element the only work is
  a shift, a mask and an OR; scales/biases cost O(bm·bn) per group, not O(bn·group). The
  ``Σx_g`` are reduced once per call outside the kernel rather than once per N tile.

With ``scale_first`` the operand itself is dequantized instead (``(v - off) * s_g + b_g`` in
the activation dtype, two more half-precision ops per register of two codes) and every dot
adds into the one accumulator: no group sums of ``x``, and the wide tiles of large M no longer
hold a second ``[bm, bn]`` f32 tile per group, which made them spill (offline, sm_90: 128x128
on 4 warps from 629 local loads per loop step to 209). Whether that pays is the tuner's call.

Decode-sized M (1..16) uses ``bm = 16`` (rows masked, nothing padded) with narrow ``bn`` and
optional split-K so every SM streams weights; large M uses wide tiles.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxq.core.nf4 import nf4_decode
from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.repack import KernelMeta, PackedForKernel
from jaxq.kernels.splitk import finish, outputs, sum_splits

_F32_MAGIC = 0x4B000000  # float32 2**23: OR-ing a code < 2**23 into the mantissa gives 2**23 + q


# 16-bit float exponent patterns whose mantissa holds a code exactly: 0x4300|q is the bf16
# 128 + q (q < 2**7), 0x6400|q the f16 1024 + q (q < 2**10); (pattern, offset, largest bits).
_MAGIC16 = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0, 7),
            jnp.dtype(jnp.float16): (0x6400, 1024.0, 10)}


def magic16(fmt: str, bits: int, dtype: Any) -> tuple[int, float] | None:
    """The 16-bit pattern OR-ed into a code and the offset it adds, when a code fits the
    mantissa of ``dtype`` (so two of them can also be decoded in one 32-bit register)."""
    entry = _MAGIC16.get(jnp.dtype(dtype))
    if fmt != "affine" or entry is None or bits > entry[2]:
        return None
    return entry[0], entry[1]


def decode_codes(q: jax.Array, fmt: str, bits: int, dtype: Any) -> tuple[jax.Array, float]:
    """Codes (uint32) -> MMA operand in ``dtype`` and the constant offset it carries.

    The offset is removed after the dot (``off * Σx``) so the per-element cost is one OR.
    """
    dtype = jnp.dtype(dtype)
    if fmt == "nf4":
        return nf4_decode(q, dtype), 0.0
    magic = magic16(fmt, bits, dtype)
    if magic is not None:
        return lax.bitcast_convert_type((q | magic[0]).astype(jnp.uint16), dtype), magic[1]
    f = lax.bitcast_convert_type(q | _F32_MAGIC, jnp.float32) - jnp.float32(2.0**23)
    return f.astype(dtype), 0.0


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _group_unit(p: KernelMeta) -> int:
    """K elements sharing one scale row inside a chunk (the scale is applied once per unit)."""
    return p.chunk if p.per_channel or p.group_size >= p.chunk else p.group_size


def offset_for(fmt: str, bits: int, dtype: Any) -> float:
    """The constant :func:`decode_codes` leaves in its operand (removed via ``off * Σx``)."""
    return decode_codes(jnp.zeros((1,), jnp.uint32), fmt, bits, dtype)[1]


def paired(p: KernelMeta, dtype: Any) -> bool:
    """Whether the kernel decodes two neighbouring slabs per word operation: 16-bit operands,
    and an even number of slabs per scale group, so a pair never spans two groups."""
    return (magic16(p.fmt, p.bits, dtype) is not None and p.layout == "triton"
            and (_group_unit(p) // p.rows) % 2 == 0)


def pair_interleave(x: jax.Array, rows: int) -> jax.Array:
    """``x[M, K]`` reordered so each slab pair ``[2a*R, (2a+2)*R)`` reads ``x[2a*R + i]``,
    ``x[(2a+1)*R + i]`` for ``i = 0..R-1``: the K order of the paired weight operand."""
    m, k = x.shape
    return jnp.swapaxes(x.reshape(m, k // (2 * rows), 2, rows), -1, -2).reshape(m, k)


def _kernel(*refs, p: KernelMeta, m: int, cfg: KernelConfig, chunks_per_split: int,
            has_bias: bool, off: float, pairs: bool, reduce_inside: bool, interpret: bool):
    it = iter(refs)
    x_ref, w_ref, s_ref = next(it), next(it), next(it)
    pair_mask = next(it)[...] if pairs else None  # a register operand, not an immediate
    b_ref = next(it) if has_bias else None
    xs_ref = next(it) if needs_xsum(cfg, has_bias, off) else None
    if reduce_inside:
        o_ref, part_ref, ticket_ref = refs[-3:]
    else:
        o_ref = refs[-1]
    j, i, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, rows, bits = cfg.bm, cfg.bn, p.rows, p.bits
    row_ok = (i * bm + lax.broadcasted_iota(jnp.int32, (bm,), 0)) < m
    unit = _group_unit(p)
    slabs = unit // rows
    units_per_chunk = p.chunk // unit
    mask = jnp.uint32((1 << bits) - 1)
    dtype = x_ref.dtype

    def x_slabs(c, slab, count):
        return plgpu.load(x_ref.at[:, pl.ds(c * p.chunk + slab * rows, count * rows)],
                          mask=row_ok[:, None], other=0)

    def pair_operand(w, slot):
        """Slabs ``2a`` and ``2a+1`` (slots ``slot`` and ``slot + P/2``) as one ``[2R, bn]``
        operand, K order ``2i + e``: a shift and a LOP3 per 32-bit register of two codes."""
        magic = magic16(p.fmt, bits, dtype)[0]
        v = ((w >> jnp.uint32(slot * bits)) if slot else w) & pair_mask
        v = v | jnp.uint32(magic | magic << 16)
        halves = jnp.stack([v.astype(jnp.uint16), (v >> jnp.uint32(16)).astype(jnp.uint16)],
                           axis=-1)  # [R, bn, 2]
        pair = lax.bitcast_convert_type(halves, dtype)
        return jnp.swapaxes(pair, 1, 2).reshape(2 * rows, bn)

    def operands(w, u):
        """This scale group's ``(first slab, slab count, decoded operand)`` triples: codes plus
        ``off``, by pairs of slabs or one slab at a time."""
        if pairs:
            return [(u * slabs + 2 * t, 2, pair_operand(w, p.slab_slots[u * slabs + 2 * t]))
                    for t in range(slabs // 2)]
        out = []
        for t in range(slabs):
            s = p.slab_slots[u * slabs + t]
            q = (w >> jnp.uint32(s * bits)) & mask if s else w & mask
            out.append((u * slabs + t, 1, decode_codes(q, p.fmt, bits, dtype)[0]))
        return out

    def unit_update(acc, w, c, u):
        """acc + this scale group's share: the dots, scaled, plus the offset terms (FMAs)."""
        g = (c * p.chunk + u * unit) // p.group_size
        if cfg.scale_first:  # the operand becomes the weights; the dots accumulate into acc
            scale = s_ref[pl.ds(g, 1), :].astype(dtype)
            bias = b_ref[pl.ds(g, 1), :].astype(dtype) if has_bias else None
            for slab, count, v in operands(w, u):
                q = v - jnp.asarray(off, dtype) if off else v  # exact: integers below 2**8
                wv = q * scale + bias if has_bias else q * scale
                acc = _dot(x_slabs(c, slab, count), wv) + acc
            return acc
        dots = [_dot(x_slabs(c, slab, count), v) for slab, count, v in operands(w, u)]
        d = functools.reduce(jnp.add, dots)  # no zero tile to add the first dot to
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
        acc = acc + d * scale
        if xs_ref is not None:
            # Σx over this unit, precomputed once per call instead of once per N tile.
            xsum = plgpu.load(xs_ref.at[:, pl.ds(c * units_per_chunk + u, 1)],
                              mask=row_ok[:, None], other=0.0)
            shift = -off * scale
            if has_bias:
                shift += b_ref[pl.ds(g, 1), :].astype(jnp.float32)
            acc = acc + xsum * shift
        return acc

    def body(it, acc):
        for v in range(cfg.unroll):
            c = kk * chunks_per_split + it * cfg.unroll + v
            w = w_ref[pl.ds(c * rows, rows), :]
            for u in range(units_per_chunk):
                acc = unit_update(acc, w, c, u)
        return acc

    acc = lax.fori_loop(0, chunks_per_split // cfg.unroll, body,
                        jnp.zeros((bm, bn), jnp.float32))
    col_ok = (j * bn + lax.broadcasted_iota(jnp.int32, (bn,), 0)) < p.n
    ok = row_ok[:, None] & col_ok[None, :]
    if reduce_inside:
        sum_splits([(0, acc)], kk, j * pl.num_programs(1) + i, cfg.split_k, o_ref, part_ref,
                   ticket_ref, ok, barrier=not interpret)
    else:
        plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=ok)


def needs_xsum(cfg: KernelConfig, has_bias: bool, off: float) -> bool:
    """Whether the kernel reads the group sums of x: the offset and bias terms are applied
    after the dots, unless ``scale_first`` puts them into the operand."""
    return not cfg.scale_first and (has_bias or bool(off))


def check_config(p: PackedForKernel, cfg: KernelConfig) -> str | None:
    """Why ``cfg`` cannot run ``p`` (None if it can)."""
    n_chunks = p.k_padded // p.chunk
    if p.n_padded % cfg.bn:
        return f"bn={cfg.bn} does not divide padded N={p.n_padded}"
    if n_chunks % (cfg.split_k * cfg.unroll):
        return f"{n_chunks} chunks do not split into {cfg.split_k}x{cfg.unroll}"
    if cfg.bm < 16 or cfg.bn < 16:
        return "tensor-core dots need bm, bn >= 16"
    return None


def qmatmul_triton(x: jax.Array, p: PackedForKernel, cfg: KernelConfig, *,
                   interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x[M, K] @ dequant(p)ᵀ -> [M, N]`` in ``x.dtype`` (f32 accumulation).

    Split-K partials are summed by XLA afterwards, or in-kernel with ``cfg.reduce_inside``
    (:mod:`jaxq.kernels.splitk`). ``poison`` pre-fills the output with NaN through an
    input/output alias, so a tile the grid never writes shows up in tests instead of silently
    holding stale memory.
    """
    reason = check_config(p, cfg)
    if reason:
        raise ValueError(reason)
    m, k = x.shape
    if k != p.k:
        raise ValueError(f"x has K={k}, weight has K={p.k}")
    if p.k_padded != k:
        x = jnp.pad(x, ((0, 0), (0, p.k_padded - k)))
    ks = cfg.split_k
    chunks_per_split = p.k_padded // p.chunk // ks
    grid = (p.n_padded // cfg.bn, pl.cdiv(m, cfg.bm), ks)
    has_bias = p.biases is not None
    groups = p.scales.shape[0]
    in_specs = [
        pl.BlockSpec((cfg.bm, p.k_padded), lambda j, i, kk: (i, 0)),
        pl.BlockSpec((p.packed.shape[0], cfg.bn), lambda j, i, kk: (0, j)),
        pl.BlockSpec((groups, cfg.bn), lambda j, i, kk: (0, j)),
    ]
    pairs = cfg.pairs and paired(p.meta, x.dtype)
    args = [pair_interleave(x, p.rows) if pairs else x, p.packed, p.scales]
    if pairs:
        in_specs.append(pl.BlockSpec((1,), lambda j, i, kk: (0,)))
        code_mask = (1 << p.bits) - 1
        args.append(jnp.full((1,), code_mask | code_mask << 16, jnp.uint32))
    if has_bias:
        in_specs.append(pl.BlockSpec((groups, cfg.bn), lambda j, i, kk: (0, j)))
        args.append(p.biases)
    off = offset_for(p.fmt, p.bits, x.dtype)
    if needs_xsum(cfg, has_bias, off):
        unit = _group_unit(p.meta)
        # From the interleaved x (pairs stay inside a group): XLA can make both in one pass.
        xs = jnp.sum(args[0].astype(jnp.float32).reshape(m, p.k_padded // unit, unit), axis=-1)
        in_specs.append(pl.BlockSpec((cfg.bm, xs.shape[1]), lambda j, i, kk: (i, 0)))
        args.append(xs)
    reduce_inside = ks > 1 and cfg.reduce_inside
    out_shape, out_specs, aliases = outputs(
        m=m, n=p.n, n_padded=p.n_padded, dtype=x.dtype, block=(cfg.bm, cfg.bn),
        tile_index=lambda j, i, kk: (i, j), splits=ks, reduce_inside=reduce_inside, poison=poison,
        in_specs=in_specs, args=args)
    kernel = functools.partial(_kernel, p=p.meta, m=m, cfg=cfg, chunks_per_split=chunks_per_split,
                               has_bias=has_bias, off=off, pairs=pairs,
                               reduce_inside=reduce_inside, interpret=interpret)
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        name=f"jaxq_qmatmul_{p.fmt}{p.bits}_g{p.group_size}",
    )(*args)
    return finish(y, x.dtype, summed=ks == 1 or reduce_inside)
