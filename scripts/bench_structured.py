"""Issue 16's structured-pruning rows: SmolLM2 with heads and neurons removed, or whole blocks.

Every row is SmolLM2-135M-Instruct (float32) measured under ``docs/eval-protocol.md`` (32
PTB-test windows of 512 tokens): parameters, whole-model bits per *original* weight (stored
bits over the unpruned model's 134,515,008 parameters, so a float32 model that lost a fifth of
its parameters shows 25.6: the figure compares with quantized models), perplexity, seconds.

* ``heads-mlp-F``: F of the decoder layers' parameters removed as query heads (evenly per KV
  head) and MLP neurons (multiples of 64), the same counts in every layer, chosen by output
  contribution (the shipped ``heads-mlp-*`` recipes at other fractions), with and without the
  least-squares refit of o_proj/down_proj.
* ``drop-blocks-N``: N consecutive blocks at the minimum angular distance of the residual
  stream (Gromov et al.); ``-any`` rows drop the N blocks that each change it least.

Calibration: the first ``--windows`` (default 32, stated in the table) PTB-train windows of 512
for every row; one statistics pass (the Gram matrices of o_proj and down_proj) and one pass of
hidden states serve all rows, their seconds shown apart. Rows are cached in
``$JAXQ_STRUCTURED_CACHE`` (default ``~/.cache/jaxq/structured``); ``--redo REGEX`` recomputes.

    nice -n 10 python scripts/bench_structured.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

N_PARAMS = 134_515_008
CACHE = Path(os.environ.get("JAXQ_STRUCTURED_CACHE", "~/.cache/jaxq/structured")).expanduser()
ROWS = ["float", "heads-mlp-20", "heads-mlp-40", "drop-blocks-2", "drop-blocks-4",
        "heads-mlp-20-norefit", "heads-mlp-40-norefit", "drop-blocks-2-any", "drop-blocks-4-any"]


model = benchlib.default_model


@functools.cache
def calib(windows: int):
    from jaxq.eval.data import calibration_windows, window_batches

    return window_batches(calibration_windows(model()[2], n=windows), 8)


@functools.cache
def stats(windows: int):
    from jaxq.calib import collect_stats
    from jaxq.models.llama import make_apply_fn
    from jaxq.recipes import load_recipe

    params, config, _ = model()
    t = load_recipe("heads-mlp-20").build(head_dim=config.head_dim)
    t0 = time.perf_counter()
    s, _ = collect_stats(make_apply_fn(config), params, calib(windows), [t])
    return s, time.perf_counter() - t0


@functools.cache
def distances(windows: int):
    from jaxq.models.structure import llama_block_distances

    params, config, _ = model()
    t0 = time.perf_counter()
    d = llama_block_distances(params, config, calib(windows))
    return d, time.perf_counter() - t0


def build(name: str, windows: int) -> tuple[dict, float, float, str]:
    """(params, calibration seconds, transform seconds, note) of one row."""
    import dataclasses

    import jax

    from jaxq.models.structure import BLOCKS
    from jaxq.prune.structured import DropBlocks
    from jaxq.recipes import load_recipe

    params, config, _ = model()
    if name == "float":
        return params, 0.0, 0.0, ""
    m = re.fullmatch(r"heads-mlp-(\d+)(-norefit)?", name)
    if m:
        t = load_recipe("heads-mlp-20").build(head_dim=config.head_dim).transforms[0]
        t = dataclasses.replace(t, fraction=int(m.group(1)) / 100, compensate=not m.group(2))
        s, cal = stats(windows)
        t0 = time.perf_counter()
        _, _, keep = t.plan(params, s)
        out = jax.block_until_ready(t(params, stats=s))
        return out, cal, time.perf_counter() - t0, f"{keep['heads']} heads, " \
            f"{keep['neurons']} neurons per layer"
    m = re.fullmatch(r"drop-blocks-(\d+)(-any)?", name)
    d, cal = distances(windows)
    t = DropBlocks(n=int(m.group(1)), blocks=BLOCKS, contiguous=not m.group(2)).chosen(d)
    t0 = time.perf_counter()
    out = t(params)
    return out, cal, time.perf_counter() - t0, f"blocks {list(t.drop)} dropped"


def measure(name: str, windows: int) -> dict:
    from jaxq.eval.data import eval_windows
    from jaxq.eval.perplexity import perplexity
    from jaxq.models.llama import make_apply_fn, param_count
    from jaxq.models.structure import config_for_params

    params, config, tok = model()
    pruned, cal, seconds, note = build(name, windows)
    cfg = config_for_params(pruned, config)
    res = perplexity(make_apply_fn(cfg), pruned, eval_windows(tok), progress=False)
    n = param_count(pruned)
    return {"row": name, "params": n, "bpw": 32.0 * n / N_PARAMS, "ppl": res.ppl,
            "tokens": res.n_tokens, "calib_s": cal, "prune_s": seconds,
            "eval_s": res.seconds, "config": f"{cfg.num_layers} layers, {cfg.num_heads} heads "
            f"({cfg.num_kv_heads} kv), intermediate {cfg.intermediate_size}", "note": note}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--rows", default=".*", help="regex of rows to run")
    parser.add_argument("--redo", default=None, help="regex of cached rows to recompute")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rows-{args.windows}w.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for name in ROWS:
        if not re.search(args.rows, name):
            continue
        if name in rows and not (args.redo and re.search(args.redo, name)):
            continue
        print(f"-- {name}", flush=True)
        rows[name] = measure(name, args.windows)
        print(f"   {rows[name]}", flush=True)
        path.write_text(json.dumps(rows, indent=1))
    if "float" not in rows:
        print("no float row; the table is not written")
        return
    base = rows["float"]["ppl"]
    body = [[r, f"{x['params']:,}", f"{x['bpw']:.2f}", f"{x['ppl']:.2f}",
             f"{x['ppl'] / base:.2f}x", f"{x['calib_s']:.0f} + {x['prune_s']:.1f}",
             x["config"], x["note"]] for r, x in ((r, rows[r]) for r in ROWS if r in rows)]
    body += [[r, "not run"] + [""] * 6 for r in ROWS if r not in rows]
    text = (
        "## Structured pruning (issue 16)\n\n"
        + benchlib.header() + "\n"
        "SmolLM2-135M-Instruct (float32; its packaged Q4_1 weights dequantized), perplexity under "
        f"the protocol ({rows['float']['tokens']:,} predictions). Calibration: the first "
        f"{args.windows} PTB-train windows of 512 tokens (not 128: the Gram pass is the cost on "
        "2 cores). 'bits/orig. weight' is the stored bits (float32) over the unpruned model's "
        "134,515,008 parameters. Time: the shared calibration pass (Gram matrices of o_proj and "
        "down_proj for the heads/neurons rows, the residual stream for the block rows), then "
        "the row's own planning and surgery.\n\n"
        + benchlib.table(["row", "parameters", "bits/orig. weight", "perplexity", "vs float",
                          "time s (calib + prune)", "config", "kept"], body)
        + "\n\nheads-mlp-F removes at least F of the decoder layers' parameters (embedding, "
        "final norm excluded) as query heads, evenly per KV head, and MLP neurons in multiples "
        "of 64, the same counts in every layer (llama.cpp and mlx-lm need one head count and "
        "one intermediate size); units ranked by their output contribution ‖X_u W_uᵀ‖² from the "
        "Gram matrices; '-norefit' skips the least-squares refit of the output projections. "
        "drop-blocks-N removes the N consecutive blocks whose input and output hidden states "
        "are closest in mean angular distance (Gromov et al. 2024); '-any' the N blocks that "
        "each change the residual stream least. No healing (fine-tuning) after pruning. At both "
        "budgets the plan kept all 9 heads: dropping one query head per KV group removes "
        "221,184 parameters a layer but more output contribution than the 128 neurons of the "
        "same size. Times were taken on a machine shared with other jobs (load 15-20 on 2 "
        "cores), so they are inflated.\n")
    benchlib.write_section("structured", text)
    print(text)


if __name__ == "__main__":
    main()
