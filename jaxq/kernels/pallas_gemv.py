"""Pallas (Triton backend) GEMV kernel for decode-sized M: no tensor cores, no shared memory.

For M of a few rows the matmul is a weight stream, and on an H100 the kernel is bound by the
instructions it issues per weight word, so everything is arranged to keep that count low
(measured on the SASS of the main loop: 67 instructions per 32-bit word of int4 codes in the
first version, 29.5 now). One program owns a tile of ``bn`` output columns and a slice of K
(``split_k`` slices, summed by XLA afterwards or in-kernel). Per chunk of the repacked layout
(:mod:`jaxq.kernels.repack`) it loads the ``[R, bn]`` uint32 word tile (coalesced along N);
bit-slot ``j`` of it is the contiguous K-slab ``[c*C + σ(j)*R, +R)``, multiplied element-wise
by the matching ``x`` slab broadcast along N.

* Codes become floats without a conversion: the code is masked into a float32 mantissa and
  OR-ed with the bits of 1.0, one LOP3 (1.0 comes from memory, so it is a register operand
  and AND + OR fuse). For int4 with bf16/f16 activations (:func:`slot_plan`) the codes go to
  mantissa bits 12 and 16, so one shift serves two slots (4 shifts per word, not 8); the
  16x larger offset of position 12 is compensated in ``x``.
* The ``[R, bn]`` products accumulate element-wise over the slabs of one scale group and
  are folded into the running tile with the group scale once per group; the cross-thread
  reduction over R runs once, at the end. The affine offsets go through group sums of
  ``x``: ``y = Σ_g L s_g Σ_k c_k x_k f_k + Σ_g (b_g Σ_k x_k - L s_g Σ_k c_k x_k)``.
* ``x`` slabs are loaded 1-D (``[R]``, then broadcast): a ``[R, 1]`` load takes the weight
  tile's layout and Triton repeats it for every column a thread holds. ``bn = 64`` keeps
  the layouts of the word tile and of the x slab compatible (wider tiles make Triton move
  the x slabs through shared memory with barriers).
* With ``xsum_inside`` (used without split-K) the group sums of ``x`` are formed in-kernel
  (two more FMAs per element and group) and ``x`` is read as given: one launch per call.
  Otherwise an XLA reduction forms them once per call, and the kernel reads ``x`` as float32
  already multiplied by the per-slot factors ``c_s``.

The M rows are a static loop sharing each decoded weight tile; beyond a handful of rows the
FMA count (M per weight) makes the tensor-core kernel of :mod:`jaxq.kernels.pallas_gpu`
faster, and the autotuner decides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxq.core.nf4 import nf4_decode
from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.repack import KernelMeta, PackedForKernel
from jaxq.kernels.splitk import finish, outputs, sum_splits

MAX_GEMV_M = 8  # rows of x one GEMV program handles (accumulators live in registers)
_ONE_F32 = 0x3F800000


def _group_unit(p: KernelMeta) -> int:
    """K elements sharing one scale row inside a chunk."""
    return p.chunk if p.per_channel or p.group_size >= p.chunk else p.group_size


def slot_plan(bits: int, fast: bool) -> tuple[list[tuple[int, int]], float, list[float]]:
    """Where each bit-slot's code goes in a float32 mantissa: ``[(shift, position)]``, the
    lift ``L`` and the per-slot activation multipliers ``c_s``.

    The float ``1 + q * 2**(p - 23)`` times ``c_s * x`` is ``c_s x + x q / L`` for every slot.
    Exact mode puts every code at the top of the mantissa (``c_s = 1``). The fast int4 mode
    (bf16/f16 activations) uses positions 12 and 16, so one shift serves two slots (four shifts
    per word instead of eight); the 16x offset of position 12 is taken out through ``c_s``.
    """
    if fast and bits == 4:
        plan = [(12, 12), (8, 12), (8, 16), (0, 12), (0, 16), (-8, 12), (-8, 16), (-12, 16)]
    else:
        top = 23 - bits
        plan = [(top - s * bits, top) for s in range(32 // bits)]
    pmax = max(pos for _, pos in plan)
    return plan, float(1 << (23 - pmax)), [float(1 << (pmax - pos)) for _, pos in plan]


def _shifted(w: jax.Array, d: int) -> jax.Array:
    if d > 0:
        return w << jnp.uint32(d)
    if d < 0:
        return w >> jnp.uint32(-d)
    return w


def _slot_code(w: jax.Array, s: int, bits: int) -> jax.Array:
    mask = jnp.uint32((1 << bits) - 1)
    return (w >> jnp.uint32(s * bits)) & mask if s else w & mask


def _gemv_kernel(*refs, p: KernelMeta, m: int, cfg: KernelConfig, chunks_per_split: int,
                 has_bias: bool, nf4: bool, xsum_inside: bool, fast: bool, reduce_inside: bool,
                 interpret: bool):
    it = iter(refs)
    x_ref, w_ref, s_ref = next(it), next(it), next(it)
    b_ref = next(it) if has_bias else None
    xsc_ref = xs_ref = None
    plan, lift, cs = slot_plan(p.bits, fast)
    scaled = any(c != 1.0 for c in cs)  # Σ c x differs from Σ x
    if not nf4 and not xsum_inside:
        xsc_ref = next(it)
        xs_ref = next(it) if (scaled and has_bias) else xsc_ref
    one_ref = next(it)
    if reduce_inside:
        o_ref, part_ref, ticket_ref = refs[-3:]
    else:
        o_ref = refs[-1]
    j, kk = pl.program_id(0), pl.program_id(1)
    bn, rows, bits = cfg.bn, p.rows, p.bits
    unit = _group_unit(p)
    slabs = unit // rows
    units_per_chunk = p.chunk // unit
    prescaled = not nf4 and not xsum_inside  # x comes float32, padded, times c_s
    ragged = p.k_padded != p.k and not prescaled  # x is not padded: mask its loads past K
    kx = x_ref.shape[0] // m  # row stride of the flattened x (K rounded up to whole slabs)
    one = one_ref[...]  # 1.0f as a register, not an immediate: (t & mask) | one is one LOP3
    code_mask = (1 << bits) - 1

    def x_slab(k0, r):
        """x[row r, k0:k0+R] as float32 ``[R, 1]``. Loaded 1-D from the flattened ``x`` so
        Triton keeps one register per row of R; a ``[R, 1]`` load would take the weight tile's
        layout and be repeated for every column a thread holds."""
        ref = x_ref.at[pl.ds(r * kx + k0, rows)]
        if ragged:  # x is padded to whole slabs: a slab is all inside K or all past it
            xk = plgpu.load(ref, mask=jnp.full((rows,), k0 < p.k), other=0)
        else:
            xk = ref[...]
        return xk.astype(jnp.float32)[:, None]

    def decode(shifted, s):
        if nf4:
            return nf4_decode(_slot_code(shifted[0], s, bits), jnp.float32)
        d, pos = plan[s]
        t = shifted[d] & jnp.uint32(code_mask << pos)
        return lax.bitcast_convert_type(t | one, jnp.float32)

    def unit_update(shifted, c, u, accs, sums):
        """Fold one scale group (``slabs`` slabs of the word tile) into the accumulators."""
        g = (c * p.chunk + u * unit) // p.group_size
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        slots = [p.slab_slots[u * slabs + t] for t in range(slabs)]
        vals = [decode(shifted, slot) for slot in slots]
        bias = b_ref[pl.ds(g, 1), :].astype(jnp.float32) if has_bias else None
        off = None if nf4 else -lift * scale  # coefficient of Σ c x
        mult = scale if nf4 else scale * lift
        new_accs, new_sums = [], []
        for r in range(m):
            part = xu = xb = None
            for t, (slot, f) in enumerate(zip(slots, vals, strict=True)):
                xk = x_slab(c * p.chunk + (u * slabs + t) * rows, r)
                xc = xk if nf4 or prescaled or cs[slot] == 1.0 else xk * cs[slot]
                part = xc * f if part is None else part + xc * f
                if xsum_inside and not nf4:
                    xu = xc if xu is None else xu + xc
                    if scaled and has_bias:
                        xb = xk if xb is None else xb + xk  # Σ x for the biases
            acc = accs[r] + part * mult
            total = sums[r]
            if nf4:
                pass
            elif xsum_inside:  # group sums of x stay per row of R: FMAs on the [R, bn] tile
                if scaled and has_bias:
                    acc = acc + xu * off + xb * bias
                else:
                    acc = acc + xu * (off + bias if has_bias else off)
            else:
                col = c * units_per_chunk + u
                xsc = xsc_ref[pl.ds(r, 1), pl.ds(col, 1)]  # [1, 1]
                if has_bias and xs_ref is not xsc_ref:
                    total = total + xsc * off + xs_ref[pl.ds(r, 1), pl.ds(col, 1)] * bias
                else:
                    total = total + xsc * (off + bias if has_bias else off)
            new_accs.append(acc)
            new_sums.append(total)
        return new_accs, new_sums

    def body(i, carry):
        accs, sums = carry
        for v in range(cfg.unroll):  # unroll > 1: the word tiles of several chunks in flight
            c = kk * chunks_per_split + i * cfg.unroll + v
            w = w_ref[pl.ds(c * rows, rows), :]  # [R, bn] uint32, coalesced along N
            shifted = {0: w} if nf4 else {d: _shifted(w, d) for d in {d for d, _ in plan}}
            for u in range(units_per_chunk):
                accs, sums = unit_update(shifted, c, u, accs, sums)
        return accs, sums

    init = ([jnp.zeros((rows, bn), jnp.float32) for _ in range(m)],
            [jnp.zeros((1, bn), jnp.float32) for _ in range(m)])
    accs, sums = lax.fori_loop(0, chunks_per_split // cfg.unroll, body, init)
    col_ok = (j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < p.n
    ys = [jnp.sum(accs[r], axis=0, keepdims=True) + sums[r] for r in range(m)]  # [1, bn] each
    if reduce_inside:
        sum_splits(list(enumerate(ys)), kk, j, cfg.split_k, o_ref, part_ref, ticket_ref,
                   col_ok, barrier=not interpret)
        return
    for r, y in enumerate(ys):
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

    With ``cfg.xsum_inside`` ``x`` goes in as given (unpadded: loads past K are masked; in its
    own dtype) and the group sums of ``x`` are formed inside; otherwise ``Σx`` per group is one
    small XLA reduction before the kernel. Split-K partials are summed by XLA afterwards, or,
    with ``cfg.reduce_inside``, by the last program of each column tile
    (:mod:`jaxq.kernels.splitk`).
    ``xsum_inside`` with ``split_k == 1`` or ``reduce_inside`` is one kernel launch (beside the
    zeroing of the ticket counters).

    ``poison`` pre-fills the output with NaN through an input/output alias (tests).
    """
    m, k = x.shape
    reason = check_gemv_config(p, cfg, m)
    if reason:
        raise ValueError(reason)
    if k != p.k:
        raise ValueError(f"x has K={k}, weight has K={p.k}")
    if k % p.rows:  # keep every [R, 1] slab load either whole or fully past K
        x = jnp.pad(x, ((0, 0), (0, -k % p.rows)))
    ks = cfg.split_k
    chunks_per_split = p.k_padded // p.chunk // ks
    grid = (p.n_padded // cfg.bn, ks)
    has_bias = p.biases is not None and p.fmt != "nf4"
    nf4 = p.fmt == "nf4"
    xsum_inside = bool(cfg.xsum_inside)
    groups = p.scales.shape[0]
    w_spec = pl.BlockSpec((p.packed.shape[0], cfg.bn), lambda j, kk: (0, j))
    in_specs = [
        pl.BlockSpec((x.size,), lambda j, kk: (0,)),
        w_spec,
        pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j)),
    ]
    args = [x.reshape(-1), p.packed, p.scales]
    if has_bias:
        in_specs.append(pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j)))
        args.append(p.biases)
    fast = jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    plan, _, cs = slot_plan(p.bits, fast)
    if not nf4 and not xsum_inside:  # group sums Σ c x (and Σ x if they differ), [M, units]
        unit = _group_unit(p.meta)
        x32 = x.astype(jnp.float32)
        if p.k_padded != x32.shape[1]:
            x32 = jnp.pad(x32, ((0, 0), (0, p.k_padded - x32.shape[1])))
        sums = [x32]
        if any(c != 1.0 for c in cs):
            per_slab = [cs[slot] for slot in p.meta.slab_slots]
            cvec = jnp.repeat(jnp.asarray(per_slab, jnp.float32), p.rows)  # one chunk
            xc = (x32.reshape(m, -1, p.chunk) * cvec).reshape(m, p.k_padded)
            sums = [xc, x32] if has_bias else [xc]
        # The kernel reads this x: float32, padded, the c_s already applied (no per-slab work).
        in_specs[0] = pl.BlockSpec((sums[0].size,), lambda j, kk: (0,))
        args[0] = sums[0].reshape(-1)
        for a in sums:
            xs = jnp.sum(a.reshape(m, p.k_padded // unit, unit), axis=-1)
            in_specs.append(pl.BlockSpec((m, xs.shape[1]), lambda j, kk: (0, 0)))
            args.append(xs)
    in_specs.append(pl.BlockSpec((1,), lambda j, kk: (0,)))
    args.append(jnp.full((1,), _ONE_F32, jnp.uint32))
    reduce_inside = ks > 1 and cfg.reduce_inside
    out_shape, out_specs, aliases = outputs(
        m=m, n=p.n, n_padded=p.n_padded, dtype=x.dtype, block=(m, cfg.bn),
        tile_index=lambda j, kk: (0, j), splits=ks, reduce_inside=reduce_inside, poison=poison,
        in_specs=in_specs, args=args)
    kernel = functools.partial(_gemv_kernel, p=p.meta, m=m, cfg=cfg,
                               chunks_per_split=chunks_per_split, has_bias=has_bias, nf4=nf4,
                               xsum_inside=xsum_inside, fast=fast, reduce_inside=reduce_inside,
                               interpret=interpret)
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        name=f"jaxq_gemv_{p.fmt}{p.bits}_g{p.group_size}",
    )(*args)
    return finish(y, x.dtype, summed=ks == 1 or reduce_inside)
