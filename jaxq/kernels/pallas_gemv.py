"""Pallas (Triton backend) GEMV kernel for decode-sized M: no tensor cores, no shared memory.

For M of a few rows the matmul is a weight stream, so what matters is having many weight
loads in flight, not MMA throughput. One program owns a wide tile of ``bn`` output columns
and a slice of K (``split_k`` slices, summed afterwards). Per chunk of the repacked layout
(:mod:`jaxq.kernels.repack`) it loads the ``[R, bn]`` uint32 word tile (a coalesced 2-D load:
N is the contiguous axis), and each bit-slot ``s`` of it is the contiguous K-slab
``[c*C + s*R, +R)``, multiplied element-wise by the matching ``x`` slab broadcast along N.

Per weight element the work is a shift, an AND/OR (one LOP3) and one FMA:

* a code ``q`` (``b`` bits) is placed at the top of a float32 mantissa with the exponent of
  1.0, giving ``f = 1 + q / 2**b`` exactly (no int->float conversion, whose throughput is a
  quarter of the FMA rate);
* the ``[R, bn]`` products accumulate element-wise over the slabs of one scale group into a
  register tile, which is folded into the running tile with ``2**b * s_g`` once per group
  (an extra 1/(slabs per group) FMA per element); the cross-thread reduction over ``R`` runs
  once, at the end;
* the affine map (and the ``-1`` of ``f``) goes through the group sums of ``x``:
  ``y = Σ_g 2**b s_g Σ_k x_k f_k + (b_g - 2**b s_g) Σ_k x_k``, the ``Σ x`` per group being
  reduced once per call outside the kernel.

``x`` is passed transposed (``[Kp, M]``) in float32 so an ``[R, 1]`` column is a plain load
that broadcasts against the weight tile; the M rows are a static loop sharing each decoded
weight tile (for M beyond a handful the FMA count, M per weight, makes the tensor-core
kernel in :mod:`jaxq.kernels.pallas_gpu` faster; the autotuner decides).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.nf4 import nf4_decode
from jaxq.kernels.repack import KernelMeta, PackedForKernel

MAX_GEMV_M = 8  # rows of x one GEMV program handles (accumulators live in registers)
_ONE_F32 = 0x3F800000


def _group_unit(p: KernelMeta) -> int:
    """K elements sharing one scale row inside a chunk."""
    return p.chunk if p.per_channel or p.group_size >= p.chunk else p.group_size


def _slot_float(w: jax.Array, s: int, bits: int) -> jax.Array:
    """Slot ``s`` of the words as ``1 + q / 2**bits`` (float32, exact)."""
    top = 23 - bits  # the code's lowest bit lands here
    mask = jnp.uint32(((1 << bits) - 1) << top)
    sh = s * bits
    if sh < top:
        t = w << jnp.uint32(top - sh)
    elif sh > top:
        t = w >> jnp.uint32(sh - top)
    else:
        t = w
    return lax.bitcast_convert_type((t & mask) | jnp.uint32(_ONE_F32), jnp.float32)


def _slot_code(w: jax.Array, s: int, bits: int) -> jax.Array:
    mask = jnp.uint32((1 << bits) - 1)
    return (w >> jnp.uint32(s * bits)) & mask if s else w & mask


def _gemv_kernel(xt_ref, w_ref, s_ref, *rest, p: KernelMeta, m: int, cfg: KernelConfig,
                 chunks_per_split: int, has_bias: bool, nf4: bool):
    b_ref = rest[0] if has_bias else None
    xs_ref = None if nf4 else rest[int(has_bias)]
    o_ref = rest[-1]
    j, kk = pl.program_id(0), pl.program_id(1)
    bn, rows, bits = cfg.bn, p.rows, p.bits
    unit = _group_unit(p)
    slabs = unit // rows
    units_per_chunk = p.chunk // unit
    lift = float(1 << bits)  # f = 1 + q / lift

    def unit_update(w, c, u, accs, sums):
        """Fold one scale group (``slabs`` slabs of the word tile ``w``) into the accumulators."""
        g = (c * p.chunk + u * unit) // p.group_size
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        if nf4:
            vals = [nf4_decode(_slot_code(w, u * slabs + t, bits), jnp.float32)
                    for t in range(slabs)]
        else:
            vals = [_slot_float(w, u * slabs + t, bits) for t in range(slabs)]
            shift = -lift * scale
            if has_bias:
                shift += b_ref[pl.ds(g, 1), :].astype(jnp.float32)
            scale = scale * lift
        new_accs, new_sums = [], []
        for r in range(m):
            part = None
            for t, f in enumerate(vals):
                k0 = c * p.chunk + (u * slabs + t) * rows
                xk = xt_ref[pl.ds(k0, rows), pl.ds(r, 1)]  # [R, 1] float32
                part = xk * f if part is None else part + xk * f
            new_accs.append(accs[r] + part * scale)
            if nf4:
                new_sums.append(sums[r])
            else:
                xsum = xs_ref[pl.ds(r, 1), pl.ds(c * units_per_chunk + u, 1)]  # [1, 1]
                new_sums.append(sums[r] + xsum * shift)
        return new_accs, new_sums

    def body(it, carry):
        accs, sums = carry
        for v in range(cfg.unroll):
            c = kk * chunks_per_split + it * cfg.unroll + v
            w = w_ref[pl.ds(c * rows, rows), :]  # [R, bn] uint32, coalesced along N
            for u in range(units_per_chunk):
                accs, sums = unit_update(w, c, u, accs, sums)
        return accs, sums

    init = ([jnp.zeros((rows, bn), jnp.float32) for _ in range(m)],
            [jnp.zeros((1, bn), jnp.float32) for _ in range(m)])
    accs, sums = lax.fori_loop(0, chunks_per_split // cfg.unroll, body, init)
    col_ok = (j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < p.n
    for r in range(m):
        y = jnp.sum(accs[r], axis=0, keepdims=True) + sums[r]  # [1, bn]
        plgpu.store(o_ref.at[pl.ds(r, 1), :], y.astype(o_ref.dtype), mask=col_ok)


def check_gemv_config(p: PackedForKernel, cfg: KernelConfig, m: int | None = None) -> str | None:
    """Why the GEMV kernel cannot run ``p`` with ``cfg`` (None if it can)."""
    n_chunks = p.k_padded // p.chunk
    if m is not None and m > MAX_GEMV_M:
        return f"GEMV takes at most {MAX_GEMV_M} rows, got {m}"
    if p.n_padded % cfg.bn:
        return f"bn={cfg.bn} does not divide padded N={p.n_padded}"
    if n_chunks % (cfg.split_k * cfg.unroll):
        return f"{n_chunks} chunks do not split into {cfg.split_k}x{cfg.unroll}"
    if cfg.bn < 16 or cfg.bn & (cfg.bn - 1):
        return "bn must be a power of two >= 16"
    if p.fmt not in ("affine", "nf4"):
        return f"format {p.fmt!r} has no GEMV kernel"
    return None


def qmatmul_gemv(x: jax.Array, p: PackedForKernel, cfg: KernelConfig, *,
                 interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x[M, K] @ dequant(p)ᵀ -> [M, N]`` in ``x.dtype`` (f32 accumulation), M ≤ MAX_GEMV_M.

    ``poison`` pre-fills the output with NaN through an input/output alias (tests).
    """
    m, k = x.shape
    reason = check_gemv_config(p, cfg, m)
    if reason:
        raise ValueError(reason)
    if k != p.k:
        raise ValueError(f"x has K={k}, weight has K={p.k}")
    x32 = x.astype(jnp.float32)
    if p.k_padded != k:
        x32 = jnp.pad(x32, ((0, 0), (0, p.k_padded - k)))
    ks = cfg.split_k
    chunks_per_split = p.k_padded // p.chunk // ks
    grid = (p.n_padded // cfg.bn, ks)
    has_bias = p.biases is not None and p.fmt != "nf4"
    nf4 = p.fmt == "nf4"
    groups = p.scales.shape[0]
    in_specs = [
        pl.BlockSpec((p.k_padded, m), lambda j, kk: (0, 0)),
        pl.BlockSpec((p.packed.shape[0], cfg.bn), lambda j, kk: (0, j)),
        pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j)),
    ]
    args = [x32.T, p.packed, p.scales]
    if has_bias:
        in_specs.append(pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j)))
        args.append(p.biases)
    if not nf4:
        unit = _group_unit(p.meta)
        xs = jnp.sum(x32.reshape(m, p.k_padded // unit, unit), axis=-1)
        in_specs.append(pl.BlockSpec((m, xs.shape[1]), lambda j, kk: (0, 0)))
        args.append(xs)
    if ks == 1:
        out_shape = jax.ShapeDtypeStruct((m, p.n), x.dtype)
        out_spec = pl.BlockSpec((m, cfg.bn), lambda j, kk: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((ks, m, p.n), jnp.float32)
        out_spec = pl.BlockSpec((None, m, cfg.bn), lambda j, kk: (kk, 0, j))
    aliases = {}
    if poison:
        in_specs.append(out_spec)
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {len(args) - 1: 0}
    kernel = functools.partial(_gemv_kernel, p=p.meta, m=m, cfg=cfg,
                               chunks_per_split=chunks_per_split, has_bias=has_bias, nf4=nf4)
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        name=f"jaxq_gemv_{p.fmt}{p.bits}_g{p.group_size}",
    )(*args)
    if ks > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)
    return y
