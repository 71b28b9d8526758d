"""Pallas Mosaic GPU (Hopper) kernel for ``y = x @ dequant(W)ᵀ``: TMA pipeline and wgmma.

Hopper's warpgroup MMA takes its M side in units of 64 rows, so the kernel computes the
transposed product ``yᵀ = dequant(W) · xᵀ``: a warpgroup owns 64 output channels (weight rows)
and ``bm`` rows of ``x``. Per step of K (``tk`` = the scale group, or 128 per channel) the TMA
engine copies the weight codes ``[64, tk]``, that step's scale and bias rows and the tile
``[tk, bm]`` of ``xᵀ`` into shared memory, ``max_concurrent_steps`` steps ahead
(``emit_pipeline``). XLA transposes ``x`` once per call: GPU interpret mode cannot run a
transposed shared-memory view, and the tests must run what the device runs. The warpgroup
loads the codes, dequantizes them with one FMA per element in float32 (``v * s + b``), stores
the bf16/f16 operand into a swizzled shared tile and issues ``wgmma(acc, w_tile, x_tile)``.
The accumulator stays in registers for the whole of K.

Layout (:func:`repack_mosaic_gpu`, once per weight): the canonical codes are already K-major
per output channel, eight 4-bit codes per word in ascending nibbles, which is exactly how
XLA stores an ``int4 [N, K]`` array; flipping the top bit of every code makes it the signed
``v = q - 2^(bits-1)``, so the weight is ``s * v + (b + 2^(bits-1) s)``: the kernel folds the
shift into the bias once per row and step (64 values, not 64 x ``tk``). Nothing else moves: the
repack is an XOR, a bitcast and a transpose of the scales, which keep their dtype.

Register layouts are given explicitly (the codes in the wgmma layout, scale and bias as its
row vectors): Mosaic GPU's layout inference does not settle this kernel on its own. GPU
interpret mode cannot run explicit-layout loads, so under ``interpret`` the same code reads the
refs plainly (layouts do not change values).

Scope: affine 4- and 8-bit codes, groups of 64 or 128 or per channel, bf16/f16 activations.
Whether it beats the Triton kernels is for the device to say (``bench_kernels.py``); until it
has, the dispatch sends nothing here unless asked (``backend="mosaic_gpu"``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxq.core.qarray import QArray, undo_input_transforms
from jaxq.kernels.repack import KernelMatrix

ROWS = 64  # weight rows per warpgroup: the M side of one wgmma
BITS = (4, 8)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, eq=False)
class MosaicGPUWeight(KernelMatrix):
    """A 2-D affine QArray ``(N, K)`` as the Mosaic GPU kernel reads it.

    Attributes:
      codes: signed ``int4``/``int8`` ``[Np, Kp]``: the codes minus ``2^(bits-1)``, N padded to
        64 rows and K to whole steps.
      scales, biases: ``[G, Np]`` in the QArray's scale dtype (transposed: one TMA row per
        step). The signed codes need ``b + 2^(bits-1) s``; the kernel forms it per row in
        float32, so bf16 scales stay bf16 in memory (a quarter of a bit per weight at g128,
        against half a bit as float32).
      bits, group_size, k, n, dtype, axis: as in the source QArray.
    """

    codes: jax.Array
    scales: jax.Array
    biases: jax.Array
    bits: int
    group_size: int
    k: int
    n: int
    dtype: Any = jnp.float32
    axis: int = -1
    perm: jax.Array | None = None
    input_scale: jax.Array | None = None

    _CHILDREN: ClassVar[tuple[str, ...]] = ("codes", "scales", "biases", "perm", "input_scale")

    @property
    def step(self) -> int:
        """K elements per pipeline step (one scale row)."""
        return step_for(self.group_size, self.k)

    @property
    def half(self) -> int:
        """``2^(bits-1)``: the shift between the signed codes and the QArray's codes."""
        return 1 << (self.bits - 1)

    @property
    def nbytes(self) -> int:
        """Storage in bytes, padding and input transforms included (codes at their width)."""
        return (self.codes.size * self.bits // 8 + self.scales.nbytes + self.biases.nbytes
                + self._transform_bytes())

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The logical float tensor (shape :attr:`shape`)."""
        g = self.scales.shape[0]
        v = self.codes.astype(jnp.float32).reshape(self.codes.shape[0], g, -1)
        s = self.scales.T.astype(jnp.float32)[:, :, None]
        w = v * s + (self.biases.T.astype(jnp.float32)[:, :, None] + self.half * s)
        w = undo_input_transforms(w.reshape(self.codes.shape)[:self.n, :self.k], self.perm,
                                  self.input_scale)
        w = w.astype(dtype or self.dtype)
        return w if self.axis == -1 else w.T


def step_for(group_size: int, k: int) -> int:
    """K elements per pipeline step: one scale group, or 128 per channel."""
    return group_size if group_size < k else 128


def unsupported_reason(w: QArray) -> str | None:
    """Why the Mosaic GPU kernel cannot take ``w`` (None when it can)."""
    if w.fmt != "affine" or w.bits not in BITS:
        return f"Mosaic GPU kernel takes affine {BITS}-bit codes, got {w.fmt} {w.bits}-bit"
    if w.ndim != 2:
        return "Mosaic GPU kernel takes 2-D weights"
    if w.group_size < w.size and w.group_size not in (64, 128):
        return f"Mosaic GPU kernel takes groups of 64, 128 or per channel, got {w.group_size}"
    return None


def repack_mosaic_gpu(w: QArray) -> MosaicGPUWeight:
    """The kernel's layout of ``w`` (jittable): an XOR, a bitcast, padding, transposed scales."""
    reason = unsupported_reason(w)
    if reason:
        raise ValueError(f"cannot repack {w!r}: {reason}")
    n, k, bits = w.rest_shape[0], w.size, w.bits
    step = step_for(w.group_size, k)
    np_, kp = -(-n // ROWS) * ROWS, -(-k // step) * step
    flip = jnp.uint32(sum(1 << (i * bits + bits - 1) for i in range(32 // bits)))
    signed = jnp.int4 if bits == 4 else jnp.int8
    codes = lax.bitcast_convert_type(w.packed.reshape(n, -1) ^ flip, signed)
    codes = codes.reshape(n, -1)[:, :k]  # the last word's unused codes, where K*bits % 32
    codes = jnp.pad(codes, ((0, np_ - n), (0, kp - k)))
    groups = w.scales.shape[-1]
    scales, biases = (jnp.broadcast_to(a, (n, groups))
                      for a in (w.scales, w.biases))  # per-tensor scales: one per row
    steps = kp // step
    if scales.shape[1] == 1:  # per channel (or tensor): the one row serves every step
        scales, biases = (jnp.broadcast_to(a, (n, steps)) for a in (scales, biases))
    pad = ((0, 0), (0, np_ - n))
    return MosaicGPUWeight(codes=codes, scales=jnp.pad(scales.T, pad),
                           biases=jnp.pad(biases.T, pad), bits=bits, group_size=w.group_size,
                           k=k, n=n, dtype=jnp.dtype(w.dtype),
                           axis=-1 if w.axis in (-1, 1) else -2)


def _tile_transforms(cols: int, dtype: Any) -> tuple:
    """Tiling and swizzle of a shared-memory operand tile whose minor dim holds ``cols``."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def m_tile(m: int) -> int:
    """Rows of x per program (the wgmma N side): 64 or 128. Narrower tiles do not lower (no
    register layout fits them), so decode-sized M is padded to 64 rows; the weight stream, not
    the tensor cores, sets the time there."""
    return 64 if m <= 64 else 128


def qmatmul_mosaic_gpu(x: jax.Array, w: MosaicGPUWeight, *, bm: int | None = None,
                       max_concurrent_steps: int = 3, interpret: bool = False) -> jax.Array:
    """``x[M, K] @ dequant(w)ᵀ -> [M, N]`` in ``x.dtype`` (f32 accumulation) on Hopper.

    ``bm`` (64, 128 or 256): rows of x per program (default :func:`m_tile`);
    ``max_concurrent_steps``: K steps the TMA copies run ahead.
    """
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has K={k}, weight has K={w.k}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"Mosaic GPU kernel takes bf16/f16 activations, got {x.dtype}")
    bm = bm or m_tile(m)
    if bm not in (64, 128, 256):
        raise ValueError(f"bm must be 64, 128 or 256, got {bm}")
    np_, kp = w.codes.shape
    mp = -(-m // bm) * bm
    x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    step = w.step
    kernel = functools.partial(_kernel, step=step, bm=bm, steps=kp // step, dtype=x.dtype,
                               half=w.half, depth=max_concurrent_steps, interpret=interpret)
    params = {"interpret": _interpret_params()} if interpret else {}
    yt = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((np_, mp), jnp.float32),
        grid=(np_ // ROWS, mp // bm), grid_names=("n", "m"),
        scratch_types=[plgpu.SMEM((ROWS, step), x.dtype,
                                  transforms=_tile_transforms(step, x.dtype))],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **params,
    )(w.codes, w.scales, w.biases, x.T)  # x as [K, M]: the wgmma B operand, K-major
    return yt[:w.n, :m].T.astype(x.dtype)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    # Buffers start as NaN: an output tile the grid never writes shows up in the result.
    return InterpretGPUParams(uninitialized_memory="nan")


def _kernel(w_gmem, s_gmem, b_gmem, x_gmem, o_gmem, w_tile, *, step: int, bm: int, steps: int,
            dtype: Any, half: int, depth: int, interpret: bool):
    n0, m0 = lax.axis_index("n"), lax.axis_index("m")
    row = plgpu.Layout.WGMMA.reduce(1)  # one value per weight row, as the wgmma layout holds it

    def load(ref, layout):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    def body(acc):
        def step_fn(_, codes, s, b, xt):
            v = load(codes, plgpu.Layout.WGMMA).astype(jnp.float32)
            s_row = load(s.at[0], row).astype(jnp.float32)
            b_row = load(b.at[0], row).astype(jnp.float32) + half * s_row  # signed codes
            scale = lax.broadcast_in_dim(s_row, (ROWS, step), (0,))
            bias = lax.broadcast_in_dim(b_row, (ROWS, step), (0,))
            w_tile[...] = (v * scale + bias).astype(dtype)
            plgpu.commit_smem()
            plgpu.wgmma(acc, w_tile, xt)
            plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            step_fn, grid=(steps,), max_concurrent_steps=min(depth, steps),
            in_specs=[
                plgpu.BlockSpec((ROWS, step), lambda kk: (n0, kk)),
                plgpu.BlockSpec((1, ROWS), lambda kk: (kk, n0)),
                plgpu.BlockSpec((1, ROWS), lambda kk: (kk, n0)),
                plgpu.BlockSpec((step, bm), lambda kk: (kk, m0),
                                transforms=_tile_transforms(bm, dtype)),
            ])(w_gmem, s_gmem, b_gmem, x_gmem)
        o_gmem[pl.ds(n0 * ROWS, ROWS), pl.ds(m0 * bm, bm)] = acc[...]

    pl.run_scoped(body, plgpu.ACC((ROWS, bm), jnp.float32))
