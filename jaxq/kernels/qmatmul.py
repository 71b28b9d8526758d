"""``qmatmul``: ``y = x @ dequant(W)ᵀ`` dispatched to the best implementation for the platform.

* GPU: the Pallas Triton kernel (:mod:`jaxq.kernels.pallas_gpu`) or, for large M where the
  GEMM is compute bound, a one-pass dequantize + vendor GEMM; the autotuner decides.
* TPU: the Pallas Mosaic kernel (:mod:`jaxq.kernels.pallas_tpu`).
* ``backend="mosaic_gpu"`` (Hopper, asked for, or a weight ``prepare``-d for it): the Mosaic
  GPU wgmma kernel (:mod:`jaxq.kernels.pallas_mosaic_gpu`), XLA where it does not apply.
* Anything else (CPU by default): :func:`qmatmul_xla`, which dequantizes at the point of use.

``interpret=True`` runs the Pallas kernels in interpret mode on any backend (tests).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core.leaf import register_matmul
from jaxq.core.nf4 import nf4_lookup
from jaxq.core.qarray import QArray
from jaxq.kernels import autotune
from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.repack import (
    PackedForKernel,
    cached_repack,
    layout_for,
    unpack_kernel_codes,
    unsupported_reason,
)

BACKENDS = ("xla", "triton", "mosaic", "mosaic_gpu")
Weight = QArray | PackedForKernel


def default_backend() -> str:
    platform = jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}.get(
        platform, "xla")


def qmatmul(x: jax.Array, w: Weight, *, backend: str | None = None,
            block: KernelConfig | dict | None = None, interpret: bool = False,
            poison: bool = False) -> jax.Array:
    """``x[..., K] @ dequant(w)ᵀ -> [..., N]`` in ``x.dtype`` with f32 accumulation.

    ``w`` is a 2-D QArray ``(N, K)`` (or a flax-style ``(K, N)`` kernel with ``axis=-2``) or,
    to skip the repack on every traced call, the :class:`PackedForKernel` from
    :func:`jaxq.kernels.repack.repack`. ``backend``: ``"xla"``, ``"triton"``, ``"mosaic"`` or
    ``"mosaic_gpu"`` (default: by platform). ``block`` overrides the autotuner. Formats the
    kernels cannot take fall back to XLA.
    """
    from jaxq.kernels.pallas_mosaic_gpu import MosaicGPUWeight

    if isinstance(w, MosaicGPUWeight):  # prepared for it: that kernel, whatever the default
        backend = "mosaic_gpu"
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if isinstance(w, QArray) and w.ndim != 2:
        raise ValueError(f"qmatmul takes a 2-D weight, got a QArray of shape {w.shape} "
                         "(jaxq.apply runs stacked weights slice by slice)")
    k = w.size
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={k}")
    if w.perm is not None or w.input_scale is not None:
        x, w = move_input_transforms(x, w)
    if backend == "xla":
        return qmatmul_xla(x, w)
    if backend == "mosaic_gpu":
        return _run_mosaic_gpu(x, w, interpret=interpret)
    layout = layout_for(backend)
    if isinstance(w, QArray):
        if unsupported_reason(w, layout):
            return qmatmul_xla(x, w)
        w = cached_repack(w, layout)
    elif w.layout != layout:
        raise ValueError(f"weight repacked for {w.layout!r}, backend {backend!r} needs {layout!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    cfg = _resolve_config(x2, w, backend, block, interpret)
    y = _run(x2, w, cfg, backend, interpret=interpret, poison=poison)
    return y.reshape(*lead, w.n)


def _run_mosaic_gpu(x: jax.Array, w: Any, *, interpret: bool) -> jax.Array:
    """The Mosaic GPU kernel where it takes ``w`` and ``x``'s dtype, XLA otherwise."""
    from jaxq.kernels import pallas_mosaic_gpu as mg

    if isinstance(w, QArray):
        if unsupported_reason(w, "mosaic_gpu"):
            return qmatmul_xla(x, w)
        w = cached_repack(w, "mosaic_gpu")
    if jnp.dtype(x.dtype) not in mg.DTYPES:  # f32 activations: XLA on the dequantized weight
        return qmatmul_xla(x, w)
    lead = x.shape[:-1]
    y = mg.qmatmul_mosaic_gpu(x.reshape(-1, w.k), w, interpret=interpret)
    return y.reshape(*lead, w.n)


def move_input_transforms(x: jax.Array, w: Any) -> tuple[jax.Array, Any]:
    """Apply a weight's input scale and permutation to ``x`` instead of the weight (a QArray
    or a kernel-layout weight, which carries them from its QArray).

    ``x @ W.T == ((x * input_scale)[..., perm]) @ stored.T``, so act-order GPTQ and unfolded
    AWQ weights run through the same kernels as plain ones.
    """
    if w.input_scale is not None:
        x = (x.astype(jnp.float32) * w.input_scale.astype(jnp.float32)).astype(x.dtype)
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)
    return x, dataclasses.replace(w, perm=None, input_scale=None)


def _run(x2: jax.Array, p: PackedForKernel, cfg: KernelConfig, backend: str, *,
         interpret: bool, poison: bool = False) -> jax.Array:
    if cfg.impl == "xla":
        return qmatmul_xla(x2, p)
    if cfg.impl == "dequant":
        return dequant_matmul(x2, p, backend, cfg if backend == "triton" else None,
                              interpret=interpret)
    if cfg.impl == "gemv":
        from jaxq.kernels.pallas_gemv import qmatmul_gemv

        return qmatmul_gemv(x2, p, cfg, interpret=interpret, poison=poison)
    if backend == "mosaic":
        from jaxq.kernels.pallas_tpu import qmatmul_mosaic

        return qmatmul_mosaic(x2, p, cfg, interpret=interpret, poison=poison)
    from jaxq.kernels.pallas_gpu import qmatmul_triton

    return qmatmul_triton(x2, p, cfg, interpret=interpret, poison=poison)


# --- configuration -----------------------------------------------------------------------------

def _resolve_config(x2: jax.Array, p: PackedForKernel, backend: str,
                    block: KernelConfig | dict | None, interpret: bool) -> KernelConfig:
    if isinstance(block, dict):
        fields = KernelConfig().to_json()
        unknown = sorted(set(block) - set(fields))
        if unknown:
            raise ValueError(f"block: unknown KernelConfig field(s) {unknown}; fields: "
                             f"{sorted(fields)}")
        block = KernelConfig.from_json({**fields, **block})
    if block is not None:
        return block
    m = x2.shape[0]
    if backend == "mosaic":
        return KernelConfig(bm=min(256, max(8, autotune.m_bucket(m))), bn=128)
    if is_tiny(m, p) and not interpret:
        return tiny_config(p)
    mode = env_choice("JAXQ_AUTOTUNE", ("1", "0", "cache"))
    if interpret or mode == "0":
        return heuristic_config(m, p)
    key = autotune.make_key(m=m, k=p.k, n=p.n, bits=p.bits, group_size=p.group_size,
                            fmt=p.fmt, dtype=x2.dtype, backend=backend)
    cfg = autotune.lookup(key)
    if cfg is None and mode == "cache":  # persisted choices only, never time anything
        return heuristic_config(m, p)
    if cfg is None:
        cfg = _outside_trace(lambda: _tune(key, x2.shape, x2.dtype, p, backend))
    return cfg


def _tune(key: str, x_shape: tuple[int, ...], dtype: Any, p: PackedForKernel,
          backend: str) -> KernelConfig:
    x_r, copies = _bench_inputs(x_shape, dtype, p)
    want = qmatmul_xla(x_r, copies[0])
    return autotune.tune(key, candidate_configs(x_shape[0], p),
                         lambda c: _bench_config(c, x_r, copies, backend, want))


#: Relative (Frobenius) error allowed between a candidate's output and XLA's, per output
#: dtype: a few roundings of that dtype, so that a dropped group term (a few percent) fails.
CHECK_TOL = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 1e-4}


def check_config_output(cfg: KernelConfig, got: jax.Array, want: jax.Array, *,
                        tol: float | None = None) -> None:
    """Raise unless ``cfg``'s output ``got`` agrees with XLA's dequantize + dot (``want``): the
    tuner checks each candidate before timing it, so a config this device's compiler gets
    wrong (or a race in a kernel) is never chosen, however fast."""
    tol = tol if tol is not None else CHECK_TOL.get(jnp.dtype(want.dtype).name, 1e-2)
    got, ref = got.astype(jnp.float32), want.astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))
    if not err < tol:  # NaN fails too
        raise ValueError(f"{cfg} disagrees with the XLA path: relative error {err:.2e}")


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name`` (default: the first choice); anything else
    is an error rather than a silent fallback."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _outside_trace(fn):
    """Run ``fn`` in a fresh thread: trace state is thread-local, so jitted calls made while
    an outer ``jit`` is tracing (where tuning usually happens) execute instead of staging."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def heuristic_config(m: int, p: PackedForKernel) -> KernelConfig:
    """A reasonable untuned choice: the GEMV kernel for decode, GEMM tiles for mid-size M,
    dequantize + vendor GEMM for large M."""
    for cfg in candidate_configs(m, p):
        if cfg.impl in ("pallas", "gemv", "dequant"):
            return cfg
    raise ValueError(f"no kernel config fits {p.meta}")


def _split_for(n_tiles: int, n_chunks: int, target: int) -> int:
    """Smallest power-of-two split of K giving ``target`` programs (and dividing the chunks)."""
    best = 1
    for sk in (1, 2, 4, 8, 16, 32):
        if n_chunks % sk:
            break
        best = sk
        if n_tiles * sk >= target:
            break
    return best


#: K * N at or under which a decode-size call is launch bound: SmolLM2's layers, fused
#: gate+up (576 x 3072) included, but not the smallest Llama-3-8B layer (k/v, 4096 x 1024).
TINY_WEIGHT = 1 << 21


def is_tiny(m: int, p: PackedForKernel) -> bool:
    """A decode-size call on a small weight (SmolLM2's layers): launch overhead dominates, so
    it takes a single-launch path instead of the tuned kernels."""
    from jaxq.kernels.pallas_gemv import MAX_GEMV_M

    return m <= MAX_GEMV_M and p.k * p.n <= TINY_WEIGHT


def tiny_config(p: PackedForKernel) -> KernelConfig:
    """``JAXQ_TINY`` = ``xla`` (default: XLA's dequantize + dot, which XLA fuses with its
    neighbours) or ``gemv`` (one GEMV launch: group sums of x in-kernel, K split so the grid
    fills the SMs, the split partials summed in-kernel). On the H100, SmolLM2's W4 decode ran
    at 790 tokens/s with ``xla`` and 432 with ``gemv`` when that GEMV could not split K (18
    programs for a 576-wide layer); the split one is not measured yet."""
    from jaxq.kernels.pallas_gemv import check_gemv_config

    if env_choice("JAXQ_TINY", ("xla", "gemv")) == "xla":
        return KernelConfig(impl="xla")
    n_chunks = p.k_padded // p.chunk
    splits = [s for s in range(1, n_chunks + 1) if n_chunks % s == 0]
    for bn in (32, 64, 16):
        sk = next((s for s in splits if p.n_padded // bn * s >= autotune.sm_count()), splits[-1])
        cfg = KernelConfig(impl="gemv", bn=bn, split_k=sk, num_warps=2 if bn <= 32 else 4,
                           num_stages=3, xsum_inside=True, reduce_inside=sk > 1)
        if check_gemv_config(p, cfg) is None:
            return cfg
    return KernelConfig(impl="xla")


def gemv_candidates(m: int, p: PackedForKernel) -> list[KernelConfig]:
    """GEMV-kernel configs for ``m <= MAX_GEMV_M`` rows: 64-wide N tiles (wider ones make
    Triton shuffle the x slabs through shared memory), K split to fill the SMs, the split
    partials summed by XLA or in-kernel, one to four chunks per loop step."""
    from jaxq.kernels.pallas_gemv import MAX_GEMV_M, check_gemv_config

    if m > MAX_GEMV_M:
        return []
    n_chunks = p.k_padded // p.chunk
    out = []

    def add(bn: int, warps: int, split: int, **kw) -> None:
        out.append(KernelConfig(impl="gemv", bn=bn, split_k=split, num_warps=warps,
                                num_stages=3, xsum_inside=kw.pop("xsum_inside", split == 1),
                                **kw))

    for bn, warps in ((64, 4), (32, 2)):
        if p.n_padded % bn:
            continue
        sk = _split_for(p.n_padded // bn, n_chunks, 8 * autotune.sm_count())
        for s in dict.fromkeys((sk, sk // 2, sk * 2)):
            if s >= 1:
                add(bn, warps, s)
        if sk > 1:  # the partials summed in-kernel: one launch (two with Σx from XLA)
            for inside in (True, False):
                add(bn, warps, sk, xsum_inside=inside, reduce_inside=True)
        if bn == 64:
            for unroll in (2, 4):  # more word tiles in flight per loop step
                add(bn, warps, sk if n_chunks % (unroll * sk) == 0 else max(1, sk // 2),
                    unroll=unroll)
    return [c for c in out if check_gemv_config(p, c, m) is None]


def candidate_configs(m: int, p: PackedForKernel) -> list[KernelConfig]:
    """The small search space the autotuner times (valid configs only, best guess first)."""
    from jaxq.kernels.pallas_dequant import check_dequant_config
    from jaxq.kernels.pallas_gpu import check_config

    gemv = gemv_candidates(m, p)
    if m <= 16:
        dots = ((64, 4, 1, 4, 3), (32, 1, 1, 2, 3), (64, 1, 1, 4, 3))  # the old decode winners
        if m > 8 or not gemv:  # no GEMV at this M: wider tensor-core tiles too
            dots += ((128, 2, 1, 4, 3), (128, 4, 1, 4, 4), (256, 2, 1, 8, 3))
            # Unpipelined: vector loads of the word tile (a pipelined copy into the K-major
            # shared tile goes word by word), 21 and 19 instructions per word against 25 and
            # 21 (sm_90, offline); latency left to occupancy (8 KB of shared memory).
            dots += ((64, 4, 1, 4, 1), (128, 2, 1, 4, 1))
        raw = [KernelConfig(bm=16, bn=bn, split_k=ks, unroll=u, num_warps=w, num_stages=st)
               for bn, ks, u, w, st in dots]
        raw += [dataclasses.replace(c, reduce_inside=True) for c in raw if c.split_k > 1]
        raw.append(dataclasses.replace(raw[0], pairs=False))  # the decode before pairing
    elif m <= 64:
        # 64x64 on 2 stages (scale_first) or unpipelined: two or three programs per SM, one
        # on 3 stages (offline, sm_90: 80.5, 24 and 128 KiB of shared memory)
        raw = [KernelConfig(bm=bm, bn=bn, num_warps=w, num_stages=st)
               for bm, bn, w, st in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                                     (32, 128, 4, 4), (64, 64, 4, 1))]
        raw.append(KernelConfig(bm=64, bn=64, num_stages=2, scale_first=True))
    else:
        raw = [KernelConfig(impl="dequant", bn=bn, num_warps=w, num_stages=1)
               for bn, w in ((128, 8), (128, 4), (64, 4))]
        raw = [c for c in raw if check_dequant_config(p, c) is None] or [
            KernelConfig(impl="dequant", bn=16, num_warps=4, num_stages=1)]
        if m <= 1024:
            wide = KernelConfig(bm=128, bn=128, num_warps=8, num_stages=2)
            raw += [wide, dataclasses.replace(wide, scale_first=True)]
        if m > 128:
            # scale_first keeps one accumulator, so the widest tile does not spill (offline,
            # sm_90: 193 local loads per step without it, none with it; 192 KiB of shared memory)
            raw.append(KernelConfig(bm=128, bn=256, num_warps=8, num_stages=2, scale_first=True))
        if m <= 256:
            raw.append(KernelConfig(bm=64, bn=128, num_warps=4, num_stages=3))
    fits = gemv + [c for c in raw if c.impl != "pallas" or check_config(p, c) is None]
    if not fits:  # tiny N: fall back to the narrowest tile that divides it
        fits = [c for c in (KernelConfig(bm=16, bn=16), KernelConfig(bm=16, bn=32))
                if check_config(p, c) is None]
    return fits


def _bench_inputs(x_shape: tuple[int, ...], dtype: Any,
                  p: PackedForKernel) -> tuple[jax.Array, list[PackedForKernel]]:
    """Synthetic operands of the real shapes, made once per tuning (tracers cannot be timed).

    Several weight copies are cycled, as in a model whose weights stream from HBM, not L2.
    """
    x = jax.random.normal(jax.random.key(0), x_shape, jnp.float32).astype(dtype)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), p)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(spec))
    return x, [_random_like(spec, i) for i in range(max(2, min(16, -(-2**28 // nbytes))))]


def _bench_config(cfg: KernelConfig, x: jax.Array, copies: list[PackedForKernel],
                  backend: str, want: jax.Array) -> float:
    """Device µs per call of ``cfg``: one program runs every copy, so host cost is amortised.
    Its output on the first copy is checked against ``want`` first (same compiled program)."""
    fn = jax.jit(lambda x, ps: [_run(x, q, cfg, backend, interpret=False) for q in ps])
    check_config_output(cfg, fn(x, copies)[0], want)
    launches = max(2, -(-32 // len(copies)))
    return autotune.time_call(lambda: fn(x, copies), launches=launches) / len(copies)


def _random_like(p: PackedForKernel, seed: int) -> PackedForKernel:
    """Concrete random arrays with the structure of ``p`` (tracers cannot be timed)."""
    key = jax.random.key(seed)

    def make(a):
        if a.dtype == jnp.uint32:
            return jax.random.bits(key, a.shape, jnp.uint32)
        return (jax.random.uniform(key, a.shape, jnp.float32) * 0.01).astype(a.dtype)

    return jax.tree.map(make, p)


# --- XLA paths ---------------------------------------------------------------------------------

def dequant_weight(w: Weight, dtype: Any) -> jax.Array:
    """The ``(N, K)`` float weight in ``dtype`` (decode in f32, one rounding at the end)."""
    if not isinstance(w, QArray):  # a kernel-layout weight: its logical tensor
        wd = w.dequantize(dtype)
        return wd if w.axis == -1 else wd.T
    if w.perm is not None or w.input_scale is not None:  # the QArray applies them itself
        wd = jnp.moveaxis(w.dequantize(jnp.float32), w.axis, -1)
        return wd.reshape(-1, w.size).astype(dtype)
    codes = w.codes()
    n = codes.shape[0]
    grouped = codes.reshape(n, w.n_groups, w.group_size)
    if w.fmt == "nf4":
        vals = nf4_lookup(grouped) * w.scales[..., None].astype(jnp.float32)
    elif w.fmt == "affine":
        vals = (grouped.astype(jnp.float32) * w.scales[..., None].astype(jnp.float32)
                + w.biases[..., None].astype(jnp.float32))
    else:
        from jaxq.core.formats import decode

        vals = decode(w, grouped).astype(jnp.float32)
    return vals.reshape(n, w.size).astype(dtype)


def dequant_kernel_layout(p: PackedForKernel, dtype: Any) -> jax.Array:
    """``(K, N)`` float weight straight from the kernel layout (no transpose in the fusion)."""
    codes = unpack_kernel_codes(p)  # [Kp, Np]
    reps = lambda a: jnp.repeat(a.astype(jnp.float32), p.group_size, axis=0)[: p.k_padded]
    if p.fmt == "nf4":
        vals = nf4_lookup(codes) * reps(p.scales)
    else:
        vals = codes.astype(jnp.float32) * reps(p.scales) + reps(p.biases)
    return vals[: p.k, : p.n].astype(dtype)


def qmatmul_xla(x: jax.Array, w: Weight) -> jax.Array:
    """Reference-quality fallback: dequantize (group-wise, fused by XLA) and contract K."""
    wd = dequant_weight(w, x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.einsum("...k,nk->...n", x, wd, preferred_element_type=jnp.float32,
                   precision=precision)
    return y.astype(x.dtype)


def dequant_matmul(x2: jax.Array, p: PackedForKernel, backend: str = "xla",
                   cfg: KernelConfig | None = None, *, interpret: bool = False) -> jax.Array:
    """Large-M path: materialise the weight once, then the vendor GEMM at full tensor-core rate.

    On the Triton backend the weight is decoded by the Pallas kernel of
    :mod:`jaxq.kernels.pallas_dequant` (one pass near copy bandwidth); elsewhere by XLA, with a
    fusion barrier so XLA does not re-decode it inside the GEMM.
    """
    precision = jax.lax.Precision.HIGHEST if x2.dtype == jnp.float32 else None
    if backend == "triton":
        from jaxq.kernels.pallas_dequant import dequantize_pallas

        wd = dequantize_pallas(p, x2.dtype, cfg, interpret=interpret)  # [Kp, Np]
        xp = x2 if p.k_padded == p.k else jnp.pad(x2, ((0, 0), (0, p.k_padded - p.k)))
        # The GEMM writes x.dtype itself (it accumulates in float32 internally for bf16/f16): an
        # f32 result converted afterwards costs a further pass over [M, N] at large M.
        out = jnp.float32 if x2.dtype == jnp.float32 else x2.dtype
        y = jnp.dot(xp, wd, preferred_element_type=out, precision=precision)
        return y[:, : p.n].astype(x2.dtype)
    wd = jax.lax.optimization_barrier(dequant_kernel_layout(p, x2.dtype))
    y = jnp.dot(x2, wd, preferred_element_type=jnp.float32, precision=precision)
    return y.astype(x2.dtype)


def _qarray_site(w: QArray, x: jax.Array) -> jax.Array:
    """The site op of a QArray of any rank: ``qmatmul`` on its ``(N, K)`` view."""
    return qmatmul(x, w.as_matrix()).reshape(*x.shape[:-1], *w.rest_shape)


register_matmul(QArray, _qarray_site)
