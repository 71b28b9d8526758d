#!/usr/bin/env python3
"""Kernel tuning lab for an NVIDIA GPU: times variants of the jaxq.kernels on random int4 g128
weights (rotated across buffers, as in bench_kernels.py) and checks them against float64.

    python3 scripts/kernel_lab.py [all|check|gemv|quick|deq|tiny|mma]   # results in $OUT/lab.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_kernels import copy_bandwidth, n_buffers, packed_bytes, random_packed, time_jax  # noqa

from jaxq.kernels import KernelConfig  # noqa: E402
from jaxq.kernels.qmatmul import _run, dequant_kernel_layout  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
RESULTS = []
T0 = time.time()
BUDGET = float(os.environ.get("LAB_BUDGET", "520"))


def log(*a):
    print(*a, flush=True)


_WEIGHTS = {}


def weights(k, n):
    key = (k, n)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        w0 = random_packed(jax.random.key(0), k, n)
        nb = n_buffers(packed_bytes(w0))
        ws = [w0] + [random_packed(jax.random.key(i), k, n) for i in range(1, nb)]
        jax.block_until_ready(ws)
        _WEIGHTS[key] = ws
    return _WEIGHTS[key]


def floor_us(k, n, m, bw):
    return (k * n // 2 + 2 * 2 * (k // 128) * n + 2 * m * (k + n)) / bw * 1e6


def trial(tag, k, n, m, cfg, bw, reps=5):
    if time.time() - T0 > BUDGET:
        log(f"skip {tag} (budget)")
        return None
    ws = weights(k, n)
    x = jax.random.normal(jax.random.key(7), (m, k), jnp.bfloat16)
    fn = jax.jit(lambda x, ws: [_run(x, w, cfg, "triton", interpret=False) for w in ws])
    t1 = time.time()
    try:
        t = time_jax(fn, (x, ws), len(ws), reps)
    except Exception as e:  # noqa: BLE001
        log(f"{tag:60s} K={k} N={n} M={m}: FAIL {type(e).__name__}: {str(e)[:300]}")
        return None
    fl = floor_us(k, n, m, bw)
    log(f"{tag:60s} K={k} N={n} M={m}: {t:8.1f} us  x{t / fl:5.2f} floor  "
        f"[{time.time() - t1:.0f}s]")
    RESULTS.append({"tag": tag, "k": k, "n": n, "m": m, "us": t, "floor": fl,
                    "cfg": cfg.to_json()})
    Path(OUT, "lab.json").write_text(json.dumps(RESULTS, indent=1))
    return t


def g(bn, sk, w=4, st=3, inside=True, u=1):
    return KernelConfig(impl="gemv", bn=bn, split_k=sk, num_warps=w, num_stages=st,
                        xsum_inside=inside, unroll=u)


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    bw = copy_bandwidth()
    log(f"device {jax.devices()[0].device_kind} jax {jax.__version__} copy bw {bw / 1e12:.2f} TB/s")
    big = (8192, 28672)
    if which in ("all", "check", "quick"):
        check()
    if which in ("all", "gemv", "quick"):
        for k, n in (big, (4096, 14336), (4096, 4096)):
            for cfg in [g(64, 8, inside=False), g(64, 4, inside=False),
                        g(64, 4, inside=False, u=2), g(64, 16, inside=False),
                        g(32, 8, w=2, inside=False), g(64, 1)]:
                trial(f"gemv {cfg.bn} sk{cfg.split_k} u{cfg.unroll} w{cfg.num_warps} "
                      f"in{int(cfg.xsum_inside)}", k, n, 1, cfg, bw)
        trial("gemv m4 64 sk4", *big, 4, g(64, 4, inside=False), bw)
    if which in ("all", "deq"):
        for k, n in ((4096, 4096), (4096, 14336), big):
            ws = weights(k, n)
            f = jax.jit(lambda ws: [jax.lax.optimization_barrier(
                dequant_kernel_layout(w, jnp.bfloat16)) for w in ws])
            t = time_jax(lambda ws: f(ws), (ws,), len(ws), 5)
            byt = packed_bytes(ws[0]) + k * n * 2
            log(f"xla dequant K={k} N={n}: {t:.1f} us ({byt / t / 1e6:.0f} GB/s)")
            from jaxq.kernels.pallas_dequant import dequantize_pallas
            for cfg in [KernelConfig(impl="dequant", bn=128, num_stages=1),
                        KernelConfig(impl="dequant", bn=256, num_warps=8, num_stages=1),
                        KernelConfig(impl="dequant", bn=64, num_stages=1),
                        KernelConfig(impl="dequant", bn=128, unroll=2, num_stages=1),
                        KernelConfig(impl="dequant", bn=128, num_warps=8, num_stages=1)]:
                f2 = jax.jit(lambda ws, c=cfg: [dequantize_pallas(w, jnp.bfloat16, c)
                                                for w in ws])
                try:
                    t = time_jax(lambda ws: f2(ws), (ws,), len(ws), 5)
                    log(f"pallas dequant bn{cfg.bn} u{cfg.unroll} w{cfg.num_warps} K={k} N={n}: "
                        f"{t:.1f} us ({byt / t / 1e6:.0f} GB/s)")
                    RESULTS.append({"tag": f"deq bn{cfg.bn} u{cfg.unroll} w{cfg.num_warps}",
                                    "k": k, "n": n, "us": t})
                except Exception as e:  # noqa: BLE001
                    log(f"pallas dequant {cfg}: FAIL {type(e).__name__}: {str(e)[:300]}")
        for m in (256, 1024, 4096):
            trial("dequant+dot bn128", *big, m, KernelConfig(impl="dequant", bn=128,
                                                             num_stages=1), bw)
    if which in ("all", "tiny"):
        tiny(bw)
    if which in ("all", "mma"):
        for cfg in [KernelConfig(bm=16, bn=64, split_k=4), KernelConfig(bm=16, bn=128, split_k=2),
                    KernelConfig(bm=16, bn=128, split_k=4, num_stages=4),
                    KernelConfig(bm=16, bn=256, split_k=2, num_warps=8),
                    KernelConfig(bm=16, bn=64, split_k=8), KernelConfig(bm=16, bn=32, split_k=8,
                                                                      num_warps=2)]:
            trial(f"mma 16x{cfg.bn} sk{cfg.split_k} w{cfg.num_warps}s{cfg.num_stages}", *big, 16,
                  cfg, bw)
    Path(OUT, "lab.json").write_text(json.dumps(RESULTS, indent=1))


def check():
    """New kernels on the device vs a float64 reference, outputs poisoned."""
    import numpy as np

    from jaxq.core.formats import quantize
    from jaxq.kernels import repack
    from jaxq.kernels.pallas_gemv import check_gemv_config, qmatmul_gemv
    from jaxq.kernels.qmatmul import dequant_matmul, dequant_weight

    rng = np.random.default_rng(0)
    ok = True
    for k, n, bits, gs in ((1280, 200, 4, 128), (576, 200, 4, 64), (4096, 200, 4, 128),
                           (1280, 200, 8, 64),
                           (1280, 200, 2, 128), (1280, 200, 4, 1280)):
        qa = quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16), bits=bits,
                      group_size=gs)
        wd = np.asarray(dequant_weight(qa, jnp.float32), np.float64)
        p = repack(qa)
        for m, dt in ((1, jnp.bfloat16), (3, jnp.bfloat16), (8, jnp.float16), (1, jnp.float32),
                      (100, jnp.bfloat16)):
            x = jnp.asarray(rng.standard_normal((m, k)), dt)
            ref = np.asarray(x.astype(jnp.float32), np.float64) @ wd.T
            cfgs = ([KernelConfig(impl="dequant", bn=128 if p.n_padded % 128 == 0 else 16)]
                    if m > 8 else [g(64, 1), g(64, 2, inside=False), g(32, 1, w=2), g(64, 1, u=2)])
            for cfg in cfgs:
                if cfg.impl == "gemv" and check_gemv_config(p, cfg, m):
                    continue  # this config does not tile this weight
                try:
                    if cfg.impl == "gemv":
                        y = jax.jit(lambda x, p, c=cfg: qmatmul_gemv(x, p, c, poison=True))(x, p)
                    else:
                        y = jax.jit(lambda x, p, c=cfg: dequant_matmul(x, p, "triton", c))(x, p)
                    y = np.asarray(y.astype(jnp.float32), np.float64)
                    err = float(np.abs(y - ref).max() / np.abs(ref).max())
                except Exception as e:  # noqa: BLE001
                    log(f"check {bits}b g{gs} m{m} {cfg}: FAIL {type(e).__name__} {str(e)[:200]}")
                    ok = False
                    continue
                tol = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}[dt]
                bad = not err < tol
                ok &= not bad
                if bad:
                    log(f"check {bits}b g{gs} m{m} {jnp.dtype(dt).name} {cfg}: err {err:.2e} BAD")
    log("device checks", "passed" if ok else "FAILED")


def tiny(bw):
    """SmolLM2's layers at M=1: bf16 matmul, XLA dequant+dot, fused GEMV, unfused GEMV."""
    from jaxq.core.formats import quantize
    from jaxq.kernels import qmatmul_xla, repack
    from jaxq.kernels.pallas_gemv import qmatmul_gemv

    for k, n in ((576, 576), (576, 192), (576, 1536), (1536, 576)):
        g_ = 64 if k % 128 else 128
        ws = [jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(64)]
        qs = [quantize(w, bits=4, group_size=g_) for w in ws]
        ps = [repack(q) for q in qs]
        x = jax.random.normal(jax.random.key(7), (1, k), jnp.bfloat16)
        res = {}
        res["bf16"] = time_jax(jax.jit(lambda x, ws: [x @ w.T for w in ws]), (x, ws), 64, 5)
        res["xla"] = time_jax(jax.jit(lambda x, qs: [qmatmul_xla(x, q) for q in qs]), (x, qs),
                              64, 5)
        for bn in (32, 64, 128):
            for inside in (True, False):
                c = g(bn, 1, inside=inside)
                try:
                    res[f"gemv{bn}{'in' if inside else 'out'}"] = time_jax(
                        jax.jit(lambda x, ps, c=c: [qmatmul_gemv(x, p, c) for p in ps]),
                        (x, ps), 64, 5)
                except Exception as e:  # noqa: BLE001
                    log(f"tiny gemv {bn}: FAIL {e}"[:300])
        log(f"tiny K={k} N={n}: " + ", ".join(f"{a} {b:.1f}" for a, b in res.items()))
        RESULTS.append({"tag": "tiny", "k": k, "n": n, "us": res})


if __name__ == "__main__":
    main()
