"""Pallas Mosaic (TPU) kernel for ``y = x @ dequant(W)ᵀ`` on the repacked layout.

The classic TPU matmul pipeline: grid ``(N tiles, M tiles, K chunks)`` with K innermost and
"arbitrary", an f32 VMEM accumulator, and Pallas double-buffering the HBM->VMEM copies of the
``x`` chunk and ``[R, bn]`` word tile. The repack uses ``R = 128`` word rows so every slab slice
of ``x`` is lane aligned; codes are converted with plain VPU casts (Mosaic has no 16-bit
bitcast trick to exploit) and the affine map is applied per group after the MXU dot, as on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxq.core.nf4 import nf4_decode
from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.repack import KernelMeta, PackedForKernel


def _decode(q: jax.Array, fmt: str, dtype) -> jax.Array:
    if fmt == "nf4":
        return nf4_decode(q, jnp.float32).astype(dtype)
    return q.astype(jnp.int32).astype(jnp.float32).astype(dtype)


def _kernel(x_ref, w_ref, s_ref, *rest, p: KernelMeta, has_bias: bool, n_k: int):
    b_ref = rest[0] if has_bias else None
    o_ref, acc_ref = rest[-2], rest[-1]
    c = pl.program_id(2)
    unit = p.chunk if p.per_channel or p.group_size >= p.chunk else p.group_size
    slabs = unit // p.rows
    mask = jnp.uint32((1 << p.bits) - 1)

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    w = w_ref[...]
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    for u in range(p.chunk // unit):
        d = jnp.zeros(acc_ref.shape, jnp.float32)
        xsum = jnp.zeros((acc_ref.shape[0], 1), jnp.float32)
        for t in range(slabs):
            s = u * slabs + t
            wv = _decode((w >> jnp.uint32(s * p.bits)) & mask, p.fmt, x_ref.dtype)
            xk = x_ref[:, s * p.rows:(s + 1) * p.rows]
            d += jnp.dot(xk, wv, preferred_element_type=jnp.float32, precision=precision)
            if has_bias:
                xsum += jnp.sum(xk.astype(jnp.float32), axis=1, keepdims=True)
        g = (c * p.chunk + u * unit) // p.group_size
        term = d * s_ref[pl.ds(g, 1), :]
        if has_bias:
            term += xsum * b_ref[pl.ds(g, 1), :]
        acc_ref[...] += term

    @pl.when(c == n_k - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def qmatmul_mosaic(x: jax.Array, p: PackedForKernel, cfg: KernelConfig, *,
                   interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x[M, K] @ dequant(p)ᵀ -> [M, N]``; ``p`` must come from ``repack(w, "mosaic")``."""
    if p.layout != "mosaic":
        raise ValueError("the Mosaic kernel needs a weight repacked with layout='mosaic'")
    m, k = x.shape
    if p.k_padded != k:
        x = jnp.pad(x, ((0, 0), (0, p.k_padded - k)))
    n_k = p.k_padded // p.chunk
    bm, bn = cfg.bm, cfg.bn
    groups = p.scales.shape[0]
    has_bias = p.biases is not None
    in_specs = [
        pl.BlockSpec((bm, p.chunk), lambda j, i, c: (i, c)),
        pl.BlockSpec((p.rows, bn), lambda j, i, c: (c, j)),
        pl.BlockSpec((groups, bn), lambda j, i, c: (0, j)),
    ]
    args = [x, p.packed, p.scales.astype(jnp.float32)]
    if has_bias:
        in_specs.append(pl.BlockSpec((groups, bn), lambda j, i, c: (0, j)))
        args.append(p.biases.astype(jnp.float32))
    out_shape = jax.ShapeDtypeStruct((m, p.n), x.dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda j, i, c: (i, j))
    aliases = {}
    if poison:
        in_specs.append(out_spec)
        args.append(jnp.full(out_shape.shape, jnp.nan, x.dtype))
        aliases = {len(args) - 1: 0}
    # With ``poison`` the aliased NaN buffer is an extra, never read, ref before ``o_ref``.
    kernel = functools.partial(_kernel, p=p.meta, has_bias=has_bias, n_k=n_k)
    return pl.pallas_call(
        kernel, out_shape=out_shape, in_specs=in_specs, out_specs=out_spec,
        grid=(p.n_padded // bn, pl.cdiv(m, bm), n_k),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        name=f"jaxq_qmatmul_mosaic_{p.fmt}{p.bits}_g{p.group_size}",
    )(*args)

