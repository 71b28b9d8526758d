#!/usr/bin/env python3
"""Count the SASS instructions of the GPU kernels' main loops, on a machine without a GPU.

The decode kernels are bound by the instructions they issue per weight word (see
``jaxq/kernels/pallas_gemv.py``), so that count is the first thing to watch when changing them.
This script needs no GPU: it lowers each kernel for CUDA (Pallas emits Triton IR on any host),
compiles that IR for ``sm_90`` with the ``triton`` package (``pip install triton``; it bundles
``ptxas`` and ``cuobjdump``), finds the innermost loop of the SASS (its backward branch) and
divides its length by the 32-bit weight words one thread handles per iteration.

It is a proxy, not a timing: the pip Triton is not the Triton inside XLA (the GEMV's loop came
to 30.0 instructions per word here and 29.5 in the cubin XLA built on an H100).

    python3 scripts/kernel_sass.py [--kernels gemv,tiled,...] [--shape 8192x28672]
        [--dump DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_kernels import random_packed  # noqa: E402

from jaxq.kernels import KernelConfig  # noqa: E402
from jaxq.kernels.pallas_gemv import qmatmul_gemv  # noqa: E402
from jaxq.kernels.pallas_gpu import qmatmul_triton  # noqa: E402

# name -> (rows of x, config, runner): the configs the H100 autotuner chose at (8192, 28672)
KERNELS = {
    "gemv": (1, KernelConfig(impl="gemv", bn=64, split_k=8, num_warps=4, num_stages=3),
             qmatmul_gemv),
    "gemv-u2": (1, KernelConfig(impl="gemv", bn=64, split_k=4, unroll=2, num_warps=4,
                                num_stages=3), qmatmul_gemv),
    "gemv-2warps": (1, KernelConfig(impl="gemv", bn=64, split_k=8, num_warps=2, num_stages=3),
                    qmatmul_gemv),
    "gemv-sum-in": (1, KernelConfig(impl="gemv", bn=64, split_k=8, num_warps=4, num_stages=3,
                                    reduce_inside=True), qmatmul_gemv),
    "gemv-1launch": (1, KernelConfig(impl="gemv", bn=64, split_k=8, num_warps=4, num_stages=3,
                                     xsum_inside=True, reduce_inside=True), qmatmul_gemv),
    "tiled": (16, KernelConfig(bm=16, bn=64, split_k=4, num_warps=4, num_stages=3),
              qmatmul_triton),
    "tiled-sum-in": (16, KernelConfig(bm=16, bn=64, split_k=4, num_warps=4, num_stages=3,
                                      reduce_inside=True), qmatmul_triton),
    "tiled-32x64": (64, KernelConfig(bm=32, bn=64, num_warps=4, num_stages=3), qmatmul_triton),
}
# Tensor-core tiles beyond the decode ones (the tuner's, and two that cannot launch on an
# H100, for comparison), each with its scale_first twin.
for _m, _cfg in ((16, KernelConfig(bm=16, bn=64, split_k=4, num_stages=1)),
                 (16, KernelConfig(bm=16, bn=128, split_k=2, num_stages=1)),
                 (64, KernelConfig(bm=64, bn=64, num_stages=3)),
                 (64, KernelConfig(bm=64, bn=64, num_stages=2)),
                 (64, KernelConfig(bm=64, bn=64, num_stages=1)),
                 (64, KernelConfig(bm=64, bn=128, num_stages=3)),
                 (256, KernelConfig(bm=128, bn=128, num_warps=8, num_stages=2)),
                 (256, KernelConfig(bm=128, bn=128, num_warps=4, num_stages=3)),
                 (1024, KernelConfig(bm=128, bn=256, num_warps=8, num_stages=2))):
    _name = (f"tiled-{_cfg.bm}x{_cfg.bn}" + (f"-sk{_cfg.split_k}" if _cfg.split_k > 1 else "")
             + f"-w{_cfg.num_warps}s{_cfg.num_stages}")
    KERNELS[_name] = (_m, _cfg, qmatmul_triton)
    KERNELS[_name + "-sf"] = (_m, dataclasses.replace(_cfg, scale_first=True), qmatmul_triton)
KERNELS["tiled-16x64-sk4-sf"] = (16, dataclasses.replace(KERNELS["tiled"][1], scale_first=True),
                                 qmatmul_triton)
KERNELS["tiled-32x64-sf"] = (64, dataclasses.replace(KERNELS["tiled-32x64"][1], scale_first=True),
                             qmatmul_triton)


@dataclasses.dataclass
class LoopCount:
    kernel: str
    instructions: int
    words_per_iteration: float
    shared_bytes: int
    registers: int
    warps: int
    opcodes: dict[str, int]

    @property
    def per_word(self) -> float:
        return self.instructions / self.words_per_iteration

    @property
    def blocks_per_sm(self) -> int:
        """Resident programs per sm_90 SM, by registers (allocated per warp in units of 256),
        shared memory (228 KiB, 1 KiB reserved per block, at most 227 KiB per block) and the
        64-warp limit; 0 when the program cannot launch at all."""
        if self.shared_bytes > 227 * 1024:
            return 0
        warp_regs = -(-self.registers * 32 // 256) * 256
        by_regs = 65536 // warp_regs // self.warps
        by_smem = 228 * 1024 // (self.shared_bytes + 1024)
        return min(by_regs, by_smem, 64 // self.warps, 32)


def triton_ir(fn, *args) -> str:
    """The Triton IR (text) of the last ``pallas_call`` in ``fn``, lowered for CUDA on this host."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    if not captured:
        raise RuntimeError("no pallas_call was lowered")
    return captured[-1]


def ttir_passes(src: Path, target, options: dict) -> str:
    """The TTIR stage of Triton's pipeline (``make_ttir``) applied to the IR in ``src``."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import IRSource, make_backend

    backend = make_backend(target)
    context = ir.context()
    source = IRSource(str(src), context, backend)
    opts = backend.parse_options(options)
    module = source.make_ir(target, opts, backend.get_codegen_implementation(opts),
                            backend.get_module_map(), context)
    return str(backend.make_ttir(module, {}, opts, target.arch))


def compile_sass(ttir: str, cfg: KernelConfig, workdir: Path) -> tuple[str, int, int]:
    """Compile Triton IR for sm_90; returns (SASS text, shared memory bytes, registers)."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what XLA's Triton does
    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    src = workdir / "kernel.ttir"
    src.write_text(ttir)
    # triton.compile skips the TTIR passes for IR input; XLA runs them (canonicalize, combine
    # ops, CSE, ...), so run them here first, or dot + add chains stay unfolded.
    src.write_text(ttir_passes(src, target, options))
    compiled = triton.compile(str(src), target=target, options=options)
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], check=True,
                           capture_output=True, text=True).stdout
    return sass, compiled.metadata.shared, int(re.search(r"REG:(\d+)", usage).group(1))


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a backward branch and what lies between)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?);", sass)]
    best: list[str] = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if len(body) > len(best):
                best = body
    return best


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def count(name: str, k: int, n: int, dump: Path | None = None) -> LoopCount:
    m, cfg, run = KERNELS[name]
    p = random_packed(jax.random.key(0), k, n)
    x = jnp.ones((m, k), jnp.bfloat16)
    ttir = triton_ir(lambda x, p: run(x, p, cfg), x, p)
    with tempfile.TemporaryDirectory() as tmp:
        sass, shared, registers = compile_sass(ttir, cfg, Path(tmp))
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ttir").write_text(ttir)
        (dump / f"{name}.sass").write_text(sass)
    loop = main_loop(sass)
    words = p.rows * cfg.bn * cfg.unroll / (32 * cfg.num_warps)
    ops = collections.Counter(opcode(t) for t in loop)
    return LoopCount(name, len(loop), words, shared, registers, cfg.num_warps,
                     dict(ops.most_common()))


def table(rows: list[LoopCount], k: int, n: int) -> str:
    out = [f"Main-loop SASS per 32-bit word of int4 g128 codes, (K, N) = ({k}, {n}), bf16 x, "
           "sm_90 via pip triton " + __import__("triton").__version__, "",
           "(BAR: barriers per loop step. A GEMV loop with them moves its x slabs through "
           "shared memory; such a GEMV ran slower on the H100 despite fewer instructions)", "",
           "| kernel | M | instructions / word | words / thread / loop step | local loads / step "
           "| smem KiB | registers | programs / SM | top opcodes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{op} {c}" for op, c in list(r.opcodes.items())[:8])
        if "BAR" in r.opcodes and "BAR" not in top:
            top += f", BAR {r.opcodes['BAR']}"
        out.append(f"| {r.kernel} | {KERNELS[r.kernel][0]} | {r.per_word:.2f} | "
                   f"{r.words_per_iteration:g} | {r.opcodes.get('LDL', 0)} | "
                   f"{r.shared_bytes / 1024:g} | {r.registers} | {r.blocks_per_sm} | {top} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--shape", default="8192x28672")
    ap.add_argument("--dump", type=Path, help="write each kernel's Triton IR and SASS here")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    k, n = (int(v) for v in args.shape.split("x"))
    rows = [count(name, k, n, args.dump) for name in args.kernels.split(",")]
    text = table(rows, k, n)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
