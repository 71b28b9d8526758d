"""Pallas (Triton backend) one-pass dequantization of the kernel layout into a float ``[Kp, Np]``.

For large M the matmul is compute bound and the vendor GEMM on a float weight runs at full
tensor-core rate, so the best plan is to decode the weight once (one read of the packed codes,
one write of the float weight) and hand it to ``jnp.dot``. XLA's own fusion of the decode
(``dequant_kernel_layout``) runs well below copy bandwidth; this kernel writes each ``[R, bn]``
K-slab of a chunk with one shift, one LOP3, one FADD and one FMA per element.

Codes become floats exactly by OR-ing them into the mantissa of ``2**23`` and subtracting it.
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

_F32_MAGIC = 0x4B000000  # float32 2**23


def _dequant_kernel(w_ref, s_ref, *rest, p: KernelMeta, cpp: int, has_bias: bool, nf4: bool):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    kk = pl.program_id(1)
    rows, bits = p.rows, p.bits
    mask = jnp.uint32((1 << bits) - 1)
    for v in range(cpp):
        c = kk * cpp + v
        w = w_ref[pl.ds(v * rows, rows), :]  # [R, bn] uint32
        for s, slab in enumerate(p.slot_slabs):
            q = (w >> jnp.uint32(s * bits)) & mask if s else w & mask
            g = (c * p.chunk + slab * rows) // p.group_size
            scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
            if nf4:
                val = nf4_decode(q, jnp.float32) * scale
            else:
                f = lax.bitcast_convert_type(q | jnp.uint32(_F32_MAGIC), jnp.float32)
                f = f - jnp.float32(2.0**23)
                val = f * scale
                if has_bias:
                    val = val + b_ref[pl.ds(g, 1), :].astype(jnp.float32)
            o_ref[pl.ds(v * p.chunk + slab * rows, rows), :] = val.astype(o_ref.dtype)


def check_dequant_config(p: PackedForKernel, cfg: KernelConfig) -> str | None:
    n_chunks = p.k_padded // p.chunk
    if p.n_padded % cfg.bn:
        return f"bn={cfg.bn} does not divide padded N={p.n_padded}"
    if n_chunks % cfg.unroll:
        return f"{n_chunks} chunks are not a multiple of {cfg.unroll} per program"
    return None


def dequantize_pallas(p: PackedForKernel, dtype: Any, cfg: KernelConfig | None = None, *,
                      interpret: bool = False) -> jax.Array:
    """The float weight ``[Kp, Np]`` (K-major, zero codes in the padding) in ``dtype``.

    ``cfg.bn`` columns and ``cfg.unroll`` chunks of K per program.
    """
    if cfg is None:
        cfg = KernelConfig(impl="dequant", bn=128 if p.n_padded % 128 == 0 else 16,
                           num_warps=4, num_stages=1)
    reason = check_dequant_config(p, cfg)
    if reason:
        raise ValueError(reason)
    cpp = cfg.unroll
    rows = p.rows
    groups = p.scales.shape[0]
    has_bias = p.biases is not None and p.fmt != "nf4"
    grid = (p.n_padded // cfg.bn, p.k_padded // (p.chunk * cpp))
    w_spec = pl.BlockSpec((cpp * rows, cfg.bn), lambda j, kk: (kk, j))
    in_specs = [w_spec, pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j))]
    args = [p.packed, p.scales]
    if has_bias:
        in_specs.append(pl.BlockSpec((groups, cfg.bn), lambda j, kk: (0, j)))
        args.append(p.biases)
    kernel = functools.partial(_dequant_kernel, p=p.meta, cpp=cpp, has_bias=has_bias,
                               nf4=p.fmt == "nf4")
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((p.k_padded, p.n_padded), dtype), grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((cpp * p.chunk, cfg.bn), lambda j, kk: (kk, j)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        name=f"jaxq_dequant_{p.fmt}{p.bits}_g{p.group_size}",
    )(*args)
