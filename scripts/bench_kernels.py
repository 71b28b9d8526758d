#!/usr/bin/env python3
"""Benchmark ``jaxq.kernels.qmatmul`` (int4 g128) against XLA bf16, XLA int4 and PyTorch int4.

Timing: every measurement jits ``B`` calls on ``B`` distinct weight buffers (together larger
than L2, so weights stream from HBM as in a real decode step) and issues that program several
times back to back before one synchronisation; µs per call = elapsed / (calls * B), median of
``--reps`` repetitions after a warm-up. PyTorch runs inside a CUDA graph for the same reason.
The memory floor is (packed weights + scales + biases + x + y bytes) / copy bandwidth, the
copy bandwidth measured in the same run.

    python3 scripts/bench_kernels.py --out bench.md [--check] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave room for PyTorch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxq.kernels import KernelConfig, PackedForKernel, qmatmul  # noqa: E402

MS = (1, 16, 64, 256, 1024, 4096)
SHAPES = ((4096, 4096), (4096, 14336), (8192, 28672))
GROUP = 128
ROTATE_BYTES = 256 * 2**20  # weights cycled per program: several times a 50 MB L2


def log(*a) -> None:
    print(*a, flush=True)


# --- timing ------------------------------------------------------------------------------------

def time_jax(fn: Callable, args: tuple, calls_per_program: int, reps: int) -> float:
    """Median µs per matmul of a jitted program doing ``calls_per_program`` matmuls."""
    jax.block_until_ready(fn(*args))
    launches = max(2, math.ceil(48 / calls_per_program))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(launches):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / (launches * calls_per_program) * 1e6)
    return statistics.median(samples)


def n_buffers(nbytes: int) -> int:
    return int(min(64, max(3, math.ceil(ROTATE_BYTES / nbytes))))


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device elementwise copy (read + write)."""
    a = jnp.zeros((2**28 if jax.default_backend() != "cpu" else 2**22,), jnp.uint32)
    fn = jax.jit(lambda a: a ^ jnp.uint32(0x5A5A5A5A))
    t = time_jax(lambda a: fn(a), (a,), 1, 5)
    return 2 * a.nbytes / (t * 1e-6)


# --- weights -----------------------------------------------------------------------------------

def random_packed(key, k: int, n: int, bits: int = 4, group: int = GROUP) -> PackedForKernel:
    """A kernel-layout int4 weight with random codes (timing does not depend on the values)."""
    kp, kg = jax.random.split(key)
    packed = jax.random.bits(kp, (k * bits // 32, n), jnp.uint32)
    scales = (jax.random.uniform(kg, (k // group, n)) * 0.01 + 1e-3).astype(jnp.bfloat16)
    biases = (-8 * scales.astype(jnp.float32)).astype(jnp.bfloat16)
    return PackedForKernel(packed=packed, scales=scales, biases=biases, bits=bits,
                           group_size=group, k=k, n=n, rows=32, fmt="affine",
                           dtype=jnp.bfloat16, layout="triton")


def packed_bytes(p: PackedForKernel) -> int:
    return sum(a.nbytes for a in (p.packed, p.scales, p.biases) if a is not None)


# --- the contenders ----------------------------------------------------------------------------

def bench_jaxq(x, k: int, n: int, reps: int) -> tuple[float, str, int]:
    w0 = random_packed(jax.random.key(0), k, n)
    nb = n_buffers(packed_bytes(w0))
    ws = [w0] + [random_packed(jax.random.key(i), k, n) for i in range(1, nb)]
    chosen = {}

    def prog(x, ws):
        outs = [qmatmul(x, w, backend="triton") for w in ws]
        from jaxq.kernels import autotune

        key = autotune.make_key(m=x.shape[0], k=k, n=n, bits=4, group_size=GROUP, fmt="affine",
                                dtype=x.dtype, backend="triton")
        chosen["cfg"] = autotune.lookup(key)
        return outs

    t = time_jax(jax.jit(prog), (x, ws), nb, reps)
    return t, describe(chosen.get("cfg")), packed_bytes(w0)


def random_mosaic_gpu(key, k: int, n: int):
    """An int4 g128 weight in the Mosaic GPU kernel's layout, random codes."""
    from jaxq.kernels.pallas_mosaic_gpu import MosaicGPUWeight

    kc, ks = jax.random.split(key)
    codes = jax.random.randint(kc, (n, k), -8, 8, jnp.int8).astype(jnp.int4)
    scales = jax.random.uniform(ks, (k // GROUP, n)) * 0.01 + 1e-3
    return MosaicGPUWeight(codes=codes, scales=scales, biases=scales * 0.5, bits=4,
                           group_size=GROUP, k=k, n=n, dtype=jnp.bfloat16)


def bench_mosaic_gpu(x, k: int, n: int, reps: int) -> float:
    """The Mosaic GPU (Hopper wgmma) kernel, outside the dispatch (not a tuner candidate yet)."""
    from jaxq.kernels.pallas_mosaic_gpu import qmatmul_mosaic_gpu

    w0 = random_mosaic_gpu(jax.random.key(0), k, n)
    nb = n_buffers(w0.nbytes)
    ws = [w0] + [random_mosaic_gpu(jax.random.key(i), k, n) for i in range(1, nb)]
    fn = jax.jit(lambda x, ws: [qmatmul_mosaic_gpu(x, w) for w in ws])
    return time_jax(fn, (x, ws), nb, reps)


def tuner_best(m: int, k: int, n: int) -> dict[str, tuple[float, str]]:
    """Best autotuner timing per kernel family ("gemv", "tensor-core", "dequant") for a shape."""
    import json

    from jaxq.kernels import autotune

    key = autotune.make_key(m=m, k=k, n=n, bits=4, group_size=GROUP, fmt="affine",
                            dtype=jnp.bfloat16, backend="triton")
    entry = autotune._load_disk().get(key, {})
    best: dict[str, tuple[float, str]] = {}
    for cfg_json, t in entry.get("timings_us", {}).items():
        cfg = KernelConfig.from_json(json.loads(cfg_json))
        fam = {"gemv": "gemv", "pallas": "tensor-core"}.get(cfg.impl, cfg.impl)
        if fam not in best or t < best[fam][0]:
            best[fam] = (t, describe(cfg))
    return best


def describe(cfg: KernelConfig | None) -> str:
    return "?" if cfg is None else cfg.label()


def bench_xla_bf16(x, k: int, n: int, reps: int) -> float:
    nb = n_buffers(k * n * 2)
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(nb)]
    fn = jax.jit(lambda x, ws: [x @ w for w in ws])
    return time_jax(fn, (x, ws), nb, reps)


def bench_xla_int4(x, k: int, n: int, reps: int) -> float:
    """jnp.int4 codes dequantized per group (scale and zero) and multiplied, fused by XLA."""
    nb = n_buffers(k * n // 2)

    def weight(i):
        q = jax.random.randint(jax.random.key(i), (k // GROUP, GROUP, n), -8, 8, jnp.int8)
        s = jax.random.uniform(jax.random.key(i + 999), (k // GROUP, 1, n)) * 0.01
        return q.astype(jnp.int4), s.astype(jnp.bfloat16), (s * 0.5).astype(jnp.bfloat16)

    ws = [weight(i) for i in range(nb)]

    def matmul(x, w):
        q, s, z = w
        wd = (q.astype(jnp.bfloat16) * s + z).reshape(k, n)
        return x @ wd

    fn = jax.jit(lambda x, ws: [matmul(x, w) for w in ws])
    return time_jax(fn, (x, ws), nb, reps)


def bench_torch_int4(m: int, k: int, n: int, reps: int) -> float | None:
    """torch._weight_int4pack_mm (tinygemm) under a CUDA graph; None when unavailable."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = "cuda"
    nb = n_buffers(k * n // 2)
    ws = []
    for _ in range(nb):
        raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        packed = torch._convert_weight_to_int4pack(raw, 8)
        sz = torch.rand(k // GROUP, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
        ws.append((packed, sz))
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

    def run():
        return [torch._weight_int4pack_mm(x, p, GROUP, sz) for p, sz in ws]

    run()
    torch.cuda.synchronize()
    launches = max(2, math.ceil(48 / nb))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
        with torch.cuda.graph(graph):
            outs = [run() for _ in range(launches)]
    del outs
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / (launches * nb) * 1e6)
    del graph
    torch.cuda.empty_cache()
    return statistics.median(samples)


# --- correctness on the device -----------------------------------------------------------------

def run_checks(gemv_only: bool = False) -> bool:
    """Every candidate config of the compiled kernel vs a float64 reference (poisoned output).

    ``gemv_only``: just the GEMV kernel's configs (every one on int4 g128, the first on the
    other formats) at M in {1, 3, 8}: a quick check of a new kernel."""
    from jaxq.core.formats import quantize
    from jaxq.core.qarray import QArray
    from jaxq.kernels.pallas_gemv import qmatmul_gemv
    from jaxq.kernels.pallas_gpu import qmatmul_triton
    from jaxq.kernels.qmatmul import candidate_configs, dequant_weight, qmatmul_xla
    from jaxq.kernels.repack import repack

    rng = np.random.default_rng(0)
    ok = True
    cases = [(4, 128, "affine"), (4, 32, "affine"), (4, "channel", "affine"), (8, 64, "affine"),
             (2, 128, "affine"), (4, 64, "nf4")]
    k, n = 1280, 200
    w = rng.standard_normal((n, k)).astype(np.float32)
    for bits, g, fmt in cases:
        if fmt == "nf4":
            codes = rng.integers(0, 16, (n, k)).astype(np.uint32)
            from jaxq.core.packing import pack_numpy

            qa = QArray(packed=jnp.asarray(pack_numpy(codes, 4)),
                        scales=jnp.asarray(rng.uniform(0.5, 2, (n, k // g)), jnp.bfloat16),
                        biases=None, bits=4, group_size=g, size=k, dtype=jnp.bfloat16,
                        fmt="nf4")
        else:
            qa = quantize(jnp.asarray(w, jnp.bfloat16), bits=bits, group_size=g)
        wd = np.asarray(dequant_weight(qa, jnp.float32), np.float64)
        p = repack(qa)
        for m in ((1, 3, 8) if gemv_only else (1, 3, 17, 100)):
            for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
                if dt != jnp.bfloat16 and m != 3:
                    continue
                x = jnp.asarray(rng.standard_normal((m, k)), dt)
                ref = np.asarray(x.astype(jnp.float32), np.float64) @ wd.T
                scale = np.abs(ref).max()
                cfgs = candidate_configs(m, p)
                if gemv_only:
                    cfgs = [c for c in cfgs if c.impl == "gemv"]
                    if not cfgs:
                        continue
                if (bits, g, dt) != (4, 128, jnp.bfloat16):
                    cfgs = cfgs[:1]  # every config once on the main format, compile time else
                for cfg in cfgs:
                    try:
                        if cfg.impl in ("pallas", "gemv"):
                            kern = qmatmul_gemv if cfg.impl == "gemv" else qmatmul_triton
                            run = jax.jit(lambda x, p, c=cfg, f=kern: f(x, p, c, poison=True))
                            y = run(x, p)
                        else:
                            y = qmatmul(x, p, block=cfg)
                    except Exception as e:  # noqa: BLE001 - e.g. too much shared memory
                        log(f"check {describe(cfg)} m={m}: skipped ({type(e).__name__}: "
                            f"{str(e)[:80]})")
                        continue
                    err = float(np.abs(np.asarray(y.astype(jnp.float32), np.float64) - ref).max()
                                / scale)
                    bad = not err < 1e-2
                    ok &= not bad
                    if bad or cfg is cfgs[0]:
                        log(f"check {fmt}{bits} g{g} m={m} {jnp.dtype(dt).name} "
                            f"{describe(cfg)}: rel err {err:.2e}{'  FAIL' if bad else ''}")
        y = qmatmul_xla(jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16), qa)
    ok &= check_mosaic_gpu(rng, w, k, n)
    log("checks", "passed" if ok else "FAILED")
    return ok


def check_mosaic_gpu(rng, w: np.ndarray, k: int, n: int) -> bool:
    """The compiled Mosaic GPU kernel vs float64, for each format it takes."""
    from jaxq.core.formats import quantize
    from jaxq.kernels.pallas_mosaic_gpu import qmatmul_mosaic_gpu, repack_mosaic_gpu
    from jaxq.kernels.qmatmul import dequant_weight

    ok = True
    for bits, g in ((4, 128), (4, 64), (4, "channel"), (8, 64)):
        qa = quantize(jnp.asarray(w, jnp.bfloat16), bits=bits, group_size=g)
        wd = np.asarray(dequant_weight(qa, jnp.float32), np.float64)
        p = repack_mosaic_gpu(qa)
        for m, dt in ((1, jnp.bfloat16), (17, jnp.float16), (100, jnp.bfloat16),
                      (300, jnp.bfloat16)):
            x = jnp.asarray(rng.standard_normal((m, k)), dt)
            ref = np.asarray(x.astype(jnp.float32), np.float64) @ wd.T
            try:
                y = jax.jit(qmatmul_mosaic_gpu)(x, p)
            except Exception as e:  # noqa: BLE001 - report, keep checking the rest
                log(f"check mosaic-gpu {bits}-bit g{g} m={m}: FAIL ({type(e).__name__}: "
                    f"{str(e)[:200]})")
                ok = False
                continue
            y64 = np.asarray(y.astype(jnp.float32), np.float64)
            err = float(np.abs(y64 - ref).max() / np.abs(ref).max())
            bad = not err < 1e-2
            ok &= not bad
            log(f"check mosaic-gpu {bits}-bit g{g} m={m} {jnp.dtype(dt).name}: rel err "
                f"{err:.2e}{'  FAIL' if bad else ''}")
    return ok


# --- report ------------------------------------------------------------------------------------

def fmt_ratio(base: float | None, ours: float) -> str:
    return "n/a" if base is None else f"{base / ours:.2f}x"


def fmt_us(t: float | None) -> str:
    return "n/a" if t is None else f"{t:.1f}"


def write_table(path: str, rows: list[dict], header: dict) -> None:
    lines = [
        f"### Quantized matmul, int4 g{GROUP} (y = x @ dequant(W)ᵀ, bf16 activations)",
        "",
        f"- command: `{header['command']}`",
        f"- device: {header['device']}; date: {header['date']}; jax {jax.__version__}"
        f"{'; torch ' + header['torch'] if header['torch'] else ''}",
        f"- copy bandwidth {header['bw'] / 1e12:.2f} TB/s; floor = (packed + scales + biases + "
        "x + y bytes) / copy bandwidth",
        "- speedup columns: baseline time / jaxq time (>1 means jaxq is faster)",
        "",
        "- config: `gemv BN` (the decode GEMV, BN columns per program, no MMA) or `BMxBN` "
        "(a tensor-core tile); `skS` K split S ways (`sum-in`: the partials summed in-kernel, "
        "`x-in`: the group sums of x too); `uU` U chunks per loop step; `scale-first` (one "
        "accumulator); `wWsS` warps and pipeline stages; `dequant` = Pallas dequantize + XLA "
        "GEMM",
        "",
        "- tuner columns: the autotuner's best time per kernel family for this shape "
        "(GEMV = the decode kernel, no MMA; tensor-core = the MMA kernel)",
        "",
        "- Mosaic GPU µs: the Hopper wgmma kernel (`jaxq/kernels/pallas_mosaic_gpu.py`, f32 "
        "scales), timed beside the dispatch, not part of it",
        "",
        "| K | N | M | jaxq µs | config | floor µs | jaxq/floor | jaxq GB/s | XLA bf16 µs |"
        " vs bf16 | XLA int4 µs | vs XLA int4 | torch int4 µs | vs torch |"
        " tuner: GEMV µs | tuner: tensor-core µs | Mosaic GPU µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    na = "n/a"
    for r in rows:
        torch_us = "n/a" if r["torch"] is None else f"{r['torch']:.1f}"
        tb = r.get("tuner", {})
        fam = {f: (f"{tb[f][0]:.1f} ({tb[f][1]})" if f in tb else na)
               for f in ("gemv", "tensor-core")}
        lines.append(
            f"| {r['k']} | {r['n']} | {r['m']} | {r['ours']:.1f} | {r['cfg']} | "
            f"{r['floor']:.1f} | {r['ours'] / r['floor']:.2f} | {r['gbs']:.0f} | "
            f"{fmt_us(r['bf16'])} | {fmt_ratio(r['bf16'], r['ours'])} | {fmt_us(r['int4'])} | "
            f"{fmt_ratio(r['int4'], r['ours'])} | {torch_us} | "
            f"{fmt_ratio(r['torch'], r['ours'])} | {fam['gemv']} | {fam['tensor-core']} | "
            f"{fmt_us(r.get('mosaic_gpu'))} |")
    Path(path).write_text("\n".join(lines) + "\n")


def optional(name: str, run):
    """``run()``, or None (logged) when that contender fails: the sweep goes on."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - report, do not abort the sweep
        log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--check", action="store_true", help="device correctness checks first")
    ap.add_argument("--quick", action="store_true", help="only the largest shape, M in {1,16}")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672 (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-xla", action="store_true", help="skip the XLA bf16/int4 baselines")
    ap.add_argument("--no-mosaic-gpu", action="store_true",
                    help="skip the Mosaic GPU (Hopper) kernel's column")
    ap.add_argument("--check-gemv", action="store_true", help="quick device checks, GEMV only")
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("jaxq").setLevel(logging.INFO)  # the autotuner's progress

    if args.check_gemv and not run_checks(gemv_only=True):
        log("device checks failed; benchmarking anyway")
    if args.check and not run_checks():
        log("device checks failed; benchmarking anyway")
    shapes = SHAPES[-1:] if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    ms = (1, 16) if args.quick else MS
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = ""
    bw = copy_bandwidth()
    header = {"command": "python3 scripts/bench_kernels.py " + " ".join(sys.argv[1:]),
              "device": jax.devices()[0].device_kind, "torch": torch_version, "bw": bw,
              "date": datetime.date.today().isoformat()}
    log(f"device {header['device']}, copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for k, n in shapes:
        for m in ms:
            t0 = time.perf_counter()
            x = jax.random.normal(jax.random.key(7), (m, k), jnp.bfloat16)
            try:
                ours, cfg, wbytes = bench_jaxq(x, k, n, args.reps)
            except Exception as e:  # noqa: BLE001 - keep the sweep going, show the failure
                log(f"K={k} N={n} M={m}: jaxq failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            io = wbytes + 2 * m * (k + n)
            bf16 = None if args.no_xla else bench_xla_bf16(x, k, n, args.reps)
            int4 = None if args.no_xla else bench_xla_int4(x, k, n, args.reps)
            tq = None if args.no_torch else optional(
                "torch int4", lambda: bench_torch_int4(m, k, n, args.reps))
            mgpu = None if args.no_mosaic_gpu else optional(
                "mosaic-gpu", lambda: bench_mosaic_gpu(x, k, n, args.reps))
            row = {"k": k, "n": n, "m": m, "ours": ours, "cfg": cfg, "floor": io / bw * 1e6,
                   "mosaic_gpu": mgpu,
                   "gbs": io / (ours * 1e-6) / 1e9, "bf16": bf16, "int4": int4, "torch": tq,
                   "tuner": tuner_best(m, k, n)}
            rows.append(row)
            log(f"K={k} N={n} M={m}: jaxq {ours:.1f} µs ({cfg}), floor {row['floor']:.1f}, "
                f"bf16 {bf16}, xla-int4 {int4}, torch {tq}, mosaic-gpu {mgpu}, "
                f"tuner {row['tuner']} [{time.perf_counter() - t0:.0f}s]")
            write_table(args.out, rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
