#!/usr/bin/env python3
"""End-to-end greedy decode tokens/s: float (bf16 weights) against W4 g128 (jaxq kernels).

Models (random weights, ``llama.init_params``, bf16): the SmolLM2-135M architecture and a
Llama-3-8B-shaped model. W4: ``jaxq.RTN(bits=4, group_size=128)`` on every linear layer
(g64 where 128 does not divide the input size: SmolLM2's hidden 576)
(``lm_head`` included where untied; the embedding, and so a tied head, stays bf16), quantized
layer by layer under ``jit``, then :func:`jaxq.kernels.prepare` repacks the weights once, and
``llama.generate(..., apply=jaxq.apply)`` decodes through ``qmatmul``. W4 runs twice by
default: as is, and with each layer's q/k/v and gate/up fused (:func:`jaxq.fuse_siblings`:
4 matmuls per layer instead of 7).

Timing: batch 1, ``--prompt`` tokens then ``--new`` greedy tokens (one compiled program:
prefill + ``while_loop`` of decode steps), a warm-up call (compile excluded), then the median
of ``--reps`` timed calls, the variants of a model timed in turn round after round (all of
them built and compiled first), so drift on a noisy machine lands on each alike. Time per
token = total / new tokens (the prefill is included). The floor per token is the weight bytes
a decode step reads (every linear weight plus the head; the embedding row and the KV cache
are negligible here and not counted) over the copy bandwidth measured in the same run.

    python3 scripts/bench_decode.py --out decode.md [--models smol,8b]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
# Kernel configs: persisted autotune choices (e.g. from bench_kernels.py in the same run) and
# the heuristic elsewhere; JAXQ_AUTOTUNE=1 tunes every new shape (slower start-up). Tiny
# layers (SmolLM2's) take XLA's path at decode unless JAXQ_TINY=gemv (jaxq.kernels.qmatmul).
os.environ.setdefault("JAXQ_AUTOTUNE", "cache")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxq  # noqa: E402
from jaxq.core.leaf import nbytes as leaf_bytes  # noqa: E402
from jaxq.core.tree import is_leaf  # noqa: E402
from jaxq.kernels import prepare  # noqa: E402
from jaxq.models import llama  # noqa: E402

MODELS = {
    "smol": ("SmolLM2-135M architecture, random weights", llama.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000)),
    "8b": ("Llama-3-8B shape, random weights", llama.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
        rope_theta=500000)),
    "tiny": ("tiny smoke-test model, random weights", llama.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, tie_word_embeddings=True)),
    "tiny576": ("tiny smoke-test model, hidden 576", llama.LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=256, num_layers=1, num_heads=9,
        num_kv_heads=3, head_dim=64, tie_word_embeddings=True)),
}


def log(*a) -> None:
    print(*a, flush=True)


def weight_bytes(params, config: llama.LlamaConfig) -> int:
    """Bytes one decode step reads from the weights: linear layers and the head (a fused
    member counts its share of its group's weight)."""
    head = params["model"]["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    leaves = jax.tree.leaves([params["model"]["layers"], head], is_leaf=is_leaf)
    return sum(leaf_bytes(leaf) for leaf in leaves)


def quantize_w4(params, config: llama.LlamaConfig, prompt, *, fuse: bool):
    """RTN W4 g128 of the linear layers, one jitted call per layer (the layers share shapes),
    with q/k/v and gate/up fused (:func:`jaxq.fuse_siblings`) when ``fuse``, then repacked.

    Where 128 does not divide a layer's input size (SmolLM2's hidden 576) that layer uses 64.
    """
    rtn = jaxq.RTN(bits=4, group_size=128, group_fallback=(64, 32))
    q = jax.jit(lambda tree: rtn(tree))
    out = dict(params)
    out["model"] = dict(params["model"])
    out["model"]["layers"] = [q(layer) for layer in params["model"]["layers"]]
    if not config.tie_word_embeddings:
        out["lm_head"] = q(params["lm_head"])
    if fuse:
        out = jaxq.fuse_siblings(llama.make_apply_fn(config), out, prompt)
    out = prepare(out)
    jax.block_until_ready(out)
    return out


def generator(params, config, prompt, new: int):
    """A no-argument call of one whole generate (prefill + ``new`` decode steps), and its
    compile + first call in seconds."""
    def call():
        return jax.block_until_ready(llama.generate(
            params, config, prompt, new, apply=jaxq.apply, cache_dtype=jnp.bfloat16,
            stop_at_eos=False))

    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


def interleaved_medians(calls: list, reps: int) -> list[float]:
    """Median seconds per call of each of ``calls``, timed in turn round after round, so that
    the machine's drift lands on every variant alike."""
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for call, out in zip(calls, samples, strict=True):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)
    return [statistics.median(x) for x in samples]


def write(path: str, rows: list[dict], header: dict) -> None:
    lines = [
        "### End-to-end greedy decode (batch 1, bf16 activations)",
        "",
        f"- command: `{header['command']}`",
        f"- device: {header['device']}; date: {header['date']}; jax {jax.__version__}",
        f"- prompt {header['prompt']} tokens, {header['new']} new tokens, median of "
        f"{header['reps']} after a warm-up (compile excluded; the variants timed in turn, "
        "round after round); ms/token = generate time / new "
        "tokens (prefill included)",
        f"- floor = weight bytes read per token / copy bandwidth {header['bw'] / 1e12:.2f} TB/s "
        "(linear layers + head; W4 = packed codes + bf16 scales and biases)",
        f"- kernel configs: JAXQ_AUTOTUNE={os.environ.get('JAXQ_AUTOTUNE')}, "
        f"JAXQ_TINY={os.environ.get('JAXQ_TINY', 'xla')}",
        "",
        "| model | weights | tokens/s | ms/token | weight MB/token | floor ms/token | "
        "ms/token ÷ floor | speedup vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in rows:
        if r["weights"].startswith("bf16"):
            base[r["model"]] = r["tps"]
        sp = base.get(r["model"])
        speed = "-" if sp is None or r["weights"].startswith("bf16") else f"{r['tps'] / sp:.2f}x"
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['tps']:.1f} | {r['ms']:.2f} | "
            f"{r['mb']:.0f} | {r['floor']:.2f} | {r['ms'] / r['floor']:.2f} | "
            f"{speed} |")
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smol,8b")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-float", action="store_true")
    ap.add_argument("--fuse", choices=("off", "on", "both"), default="both",
                    help="W4 rows without and/or with sibling fusion (jaxq.fuse_siblings)")
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("jaxq").setLevel(logging.INFO)  # the autotuner's progress

    from bench_kernels import copy_bandwidth

    bw = copy_bandwidth()
    header = {"command": "python3 scripts/bench_decode.py " + " ".join(sys.argv[1:]),
              "device": jax.devices()[0].device_kind, "bw": bw, "prompt": args.prompt,
              "new": args.new, "reps": args.reps, "date": datetime.date.today().isoformat()}
    log(f"device {header['device']}, copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for name in args.models.split(","):
        label, config = MODELS[name]
        t0 = time.perf_counter()
        params = llama.init_params(jax.random.key(0), config, dtype=jnp.bfloat16)
        jax.block_until_ready(params)
        prompt = jax.random.randint(jax.random.key(1), (1, args.prompt), 0, config.vocab_size)
        log(f"{name}: init {time.perf_counter() - t0:.1f}s")
        variants = [] if args.skip_float else [("bf16", lambda params=params: params)]
        wlabel = "W4 g128 (RTN, jaxq kernels)"
        if config.hidden_size % 128:
            wlabel = "W4 g128, g64 where K=576 (RTN, jaxq kernels)"
        for fuse in {"off": [False], "on": [True], "both": [False, True]}[args.fuse]:
            variants.append((wlabel + (", q/k/v and gate/up fused" if fuse else ""),
                             functools.partial(quantize_w4, params, config, prompt, fuse=fuse)))
        ready = []  # (name, params, call): every variant built and compiled, then timed
        for wname, make in variants:
            try:
                t0 = time.perf_counter()
                p = make()
                tq = time.perf_counter() - t0
                call, first = generator(p, config, prompt, args.new)
            except Exception as e:  # noqa: BLE001 - keep going, show the failure
                log(f"{name} {wname}: failed: {type(e).__name__}: {str(e)[:400]}")
                continue
            log(f"{name} {wname}: prepare {tq:.1f}s, compile+first {first:.1f}s")
            ready.append((wname, p, call))
        medians = interleaved_medians([c for _, _, c in ready], args.reps)
        for (wname, p, _), t in zip(ready, medians, strict=True):
            nbytes = weight_bytes(p, config)
            row = {"model": label, "weights": wname, "tps": args.new / t,
                   "ms": t / args.new * 1e3, "mb": nbytes / 1e6, "floor": nbytes / bw * 1e3}
            rows.append(row)
            log(f"{name} {wname}: {row['tps']:.1f} tok/s, {row['ms']:.2f} ms/token "
                f"(floor {row['floor']:.2f})")
        write(args.out, rows, header)
        del ready
        del params
    return 0


if __name__ == "__main__":
    sys.exit(main())
