"""Issue 16's low-rank rows on SmolLM2-135M-Instruct under ``docs/eval-protocol.md``.

* plain truncated SVD vs SVD-LLM (Cholesky-whitened) vs ASVD (mean|x|^0.5 scaled) keeping 80%
  and 60% of each linear layer's parameters (per-layer ranks), and SVD-LLM with ranks allocated
  under a whole-model 80% budget;
* GPTQ W3 g64 + an activation-aware low-rank correction of its error against AWQ+GPTQ W3 g64,
  with whole-model bits/weight, and W3 g128 + correction (+0.25 bpw: meant as W3 g64's
  bits, but 576-wide inputs fall back to groups of 64, so it stores more).

Calibration: the first **32** PTB-train windows of 512 (``jaxq.eval.data.calibration_windows``),
one pass of float-model statistics (``gram``, ``mean_abs``; cached on disk) shared by every row;
evaluation: the protocol's 32 PTB-test windows of 512. The embedding (tied with the LM head) is
never factored: float32 in the low-rank rows, 8-bit g64 RTN in the W3 rows.

Rows are cached in ``$JAXQ_LOWRANK_CACHE`` (default ``~/.cache/jaxq/lowrank``) as they finish;
``--redo REGEX`` recomputes rows, ``--rows REGEX`` selects them. The table goes to
BENCHMARKS.md (section ``lowrank``).

    nice -n 10 python scripts/bench_lowrank.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

CACHE = Path(os.environ.get("JAXQ_LOWRANK_CACHE", "~/.cache/jaxq/lowrank")).expanduser()
WINDOWS = 32
FLOAT_PPL = 56.66


model = benchlib.default_model


eval_set = benchlib.protocol_eval_windows


@functools.cache
def float_stats() -> tuple[dict, dict, float]:
    """``gram`` and ``mean_abs`` of every linear site on the float model (cached on disk)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxq.calib import collect_stats, discover_sites
    from jaxq.eval.data import calibration_windows, window_batches
    from jaxq.lowrank import LowRankSVD
    from jaxq.models.llama import make_apply_fn

    params, config, tok = model()
    apply_fn = make_apply_fn(config)
    batches = window_batches(calibration_windows(tok, n=WINDOWS, length=512), 8)
    path, meta = CACHE / f"float-stats-{WINDOWS}w.npz", CACHE / f"float-stats-{WINDOWS}w.json"
    if path.is_file() and meta.is_file():
        axes = {p: s.axis for p, s in discover_sites(apply_fn, params, *batches[0]).items()}
        out: dict = {}
        with np.load(path) as z:
            for key in z.files:
                p, _, k = key.rpartition("|")
                out.setdefault(p, {})[k] = jnp.asarray(z[key])
        return out, axes, json.loads(meta.read_text())["seconds"]
    print(f"   collecting statistics on the float model ({WINDOWS} windows)", flush=True)
    t0 = time.perf_counter()
    stats, axes = collect_stats(apply_fn, params, batches,
                                [LowRankSVD(variant="svd-llm"), LowRankSVD(variant="asvd")],
                                progress=False)
    seconds = time.perf_counter() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"{p}|{k}": np.asarray(v) for p, kv in stats.items() for k, v in kv.items()})
    tmp.replace(path)
    meta.write_text(json.dumps({"seconds": seconds}))
    return stats, axes, seconds


def evaluate(q: object, seconds: float) -> dict:
    import jax

    import jaxq
    from jaxq.eval.perplexity import perplexity
    from jaxq.eval.size import size_report
    from jaxq.models.llama import make_apply_fn

    jax.block_until_ready(jax.tree.leaves(q))
    s = size_report(q)
    r = perplexity(jaxq.apply(make_apply_fn(model()[1])), q, eval_set(), progress=False)
    kept = linear_kept(q)
    return {"bpw": s.bits_per_weight, "linear_bpw": s.linear_bits_per_weight,
            "kept": kept, "seconds": seconds, "stats_seconds": float_stats()[2],
            "perplexity": r.ppl}


def linear_kept(q: object) -> float | None:
    """Stored values of the linear layers over their dense parameters (factors count r·(o+i));
    None for a model with no factored layer."""
    from jaxq.core.leaf import is_leaf
    from jaxq.core.tree import default_rule, flatten_with_paths
    from jaxq.lowrank import LowRank

    stored = dense = 0
    factored = False
    for path, leaf in flatten_with_paths(q)[0]:
        if isinstance(leaf, LowRank):
            stored += leaf.rank * sum(leaf.shape)
            dense += leaf.size_params
            factored = True
        elif not is_leaf(leaf) and default_rule(path, leaf):
            stored += leaf.size
            dense += leaf.size
    return stored / dense if factored else None


def transform_row(build: Callable[[object], object]) -> Callable[[], dict]:
    def run() -> dict:
        from jaxq.calib.groups import bind_groups, scale_groups
        from jaxq.eval.data import calibration_windows, window_batches
        from jaxq.models.llama import make_apply_fn

        params, config, tok = model()
        stats, axes, _ = float_stats()
        # AWQ folds its scales along the groups found from the trace, as jaxq.calibrate does.
        probe = window_batches(calibration_windows(tok, n=1, length=512), 1)[0]
        t = bind_groups(build(config), scale_groups(make_apply_fn(config), params, *probe))
        t0 = time.perf_counter()
        q = t(params, stats=stats, axes=axes)
        import jax

        jax.block_until_ready(jax.tree.leaves(q))
        return evaluate(q, time.perf_counter() - t0)
    return run


def svd(method: str, ratio: float, budget: bool = False) -> Callable[[], dict]:
    from jaxq.lowrank import LowRankSVD

    kw = {"budget": ratio} if budget else {"ratio": ratio}
    return transform_row(lambda _: LowRankSVD(variant=method, **kw))


def recipe(name: str) -> Callable[[], dict]:
    from jaxq.recipes import load_recipe

    return transform_row(lambda config: load_recipe(name).build(head_dim=config.head_dim))


def recipe_embedding_bits(name: str, bits: int) -> Callable[[], dict]:
    """A shipped recipe with its embedding quantized to ``bits`` instead (a control row)."""
    import dataclasses

    from jaxq.recipes import load_recipe

    def build(config):
        r = load_recipe(name)
        specs = tuple({**t, "bits": bits} if t.get("where") == "embed_tokens" else t
                      for t in r.transforms)
        return dataclasses.replace(r, transforms=specs).build(head_dim=config.head_dim)
    return transform_row(build)


ROWS: dict[str, tuple[str, Callable[[], Callable[[], dict]]]] = {
    "svd-llm-80": ("SVD-LLM (whitened), 80% per layer", lambda: svd("svd-llm", 0.8)),
    "plain-80": ("plain SVD, 80% per layer", lambda: svd("plain", 0.8)),
    "w3-g128-lrc": ("GPTQ W3 g128 + low-rank correction (+0.25 bpw)",
                    lambda: recipe("w3-g128-lrc")),
    "asvd-80": ("ASVD (α=0.5), 80% per layer", lambda: svd("asvd", 0.8)),
    "svd-llm-60": ("SVD-LLM (whitened), 60% per layer", lambda: svd("svd-llm", 0.6)),
    "plain-60": ("plain SVD, 60% per layer", lambda: svd("plain", 0.6)),
    "asvd-60": ("ASVD (α=0.5), 60% per layer", lambda: svd("asvd", 0.6)),
    "gptq-w3-g64": ("GPTQ W3 g64", lambda: recipe("gptq-w3-g64")),
    "w3-g64-lrc": ("GPTQ W3 g64 + low-rank correction (+0.25 bpw)",
                   lambda: recipe("w3-g64-lrc")),
    "svd-llm-budget-80": ("SVD-LLM, 80% whole-model budget (ranks by spectra)",
                          lambda: svd("svd-llm", 0.8, budget=True)),
    "awq-gptq-w3-g64": ("AWQ+GPTQ W3 g64", lambda: recipe("awq-gptq-w3-g64")),
    "awq-gptq-w3-g128-lrc": ("AWQ+GPTQ W3 g128 + low-rank correction (+0.25 bpw)",
                             lambda: recipe("awq-gptq-w3-g128-lrc")),
    "awq-gptq-w3-g64-e6": ("AWQ+GPTQ W3 g64, 6-bit embedding (control)",
                           lambda: recipe_embedding_bits("awq-gptq-w3-g64", 6)),
    "awq-gptq-w3-g64-lrc-e6": ("AWQ+GPTQ W3 g64 + low-rank correction (+0.5 bpw), 6-bit "
                               "embedding: W3 g64's whole-model bits",
                               lambda: recipe("awq-gptq-w3-g64-lrc-e6")),
    "awq-gptq-w3-g192-lrc": ("AWQ+GPTQ W3 g192 + low-rank correction (+1/3 bpw: W3 g64's bits)",
                             lambda: recipe("awq-gptq-w3-g192-lrc")),
}


def load_cache() -> dict:
    f = CACHE / "rows.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def store(key: str, result: dict) -> None:
    cache = load_cache()
    cache[key] = result
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "rows.json.tmp"
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(CACHE / "rows.json")


def write_table(keys: list[str], cache: dict) -> None:
    rows = []
    for k in keys:
        if k not in cache:
            rows.append([ROWS[k][0], "not measured yet", "", "", "", ""])
            continue
        r = cache[k]
        rows.append([ROWS[k][0], f"{100 * r['kept']:.1f}%" if r["kept"] else "—", f"{r['bpw']:.3f}",
                     f"{r['linear_bpw']:.3f}", f"{r['perplexity']:.2f}" if r["perplexity"] < 1e5
                     else f"{r['perplexity']:.3g}", f"{r['seconds']:.1f}"])
    stats_s = next((cache[k]["stats_seconds"] for k in keys if k in cache), float("nan"))
    body = (benchlib.header("nice -n 10 python scripts/bench_lowrank.py") + "\n"
            f"SmolLM2-135M-Instruct, PTB test (32 windows of 512), float {FLOAT_PPL}. Calibration: "
            f"{WINDOWS} PTB-train windows of 512, one pass of float statistics shared by every "
            f"row ({stats_s:.0f} s, not in the times). The embedding is never factored: float32 "
            "in the low-rank rows (so their bits/weight are float), 8-bit g64 in the W3 rows "
            "unless the row says 6-bit. 'kept' = stored linear values over dense linear "
            "parameters. Times are wall seconds of the transform on the 2-core machine, one "
            "row at a time (the SVD-LLM 80% and the g192/6-bit rows ran beside other jobs: "
            "their times are inflated). For reference (issue 16): plain SVD at 80% per layer "
            "gave 2.6e7, AWQ+GPTQ W3 g64 85.72 at 4.56 bits/weight (128 windows).\n\n"
            "W3 + low-rank correction at equal bits: the correction's bits must come from "
            "somewhere. Groups of 128 do not divide SmolLM2's 576-wide inputs (they fall back "
            "to 64, so g128 + correction stores more than W3 g64); groups of 192 divide every "
            "width but lose more than a 1/3-bit correction wins back (106.93). Paying for it "
            "with the tied embedding at 6 bits instead of 8 (what llama.cpp's K-quant mixes do "
            "for the output head) frees 0.53 bits per linear weight: AWQ+GPTQ W3 g64 + a "
            "+0.5 bpw correction gives 80.99 at 4.529 whole-model bits/weight, below "
            "AWQ+GPTQ W3 g64's 87.80 (85.72 in the issue) at 4.560; the 6-bit embedding alone "
            "(control row) gives 89.11, so the correction, not the embedding, makes the gain "
            "(recipe `awq-gptq-w3-g64-lrc-e6`).\n\n"
            + benchlib.table(["method", "linear kept", "bits/weight", "linear bits/weight",
                              "perplexity", "time (s)"], rows))
    benchlib.write_section("lowrank", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", help="regex over row keys")
    ap.add_argument("--redo", help="regex of cached rows to recompute")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table-only", action="store_true",
                    help="write the table from the cached rows (missing ones marked), run none")
    args = ap.parse_args()
    keys = [k for k in ROWS if not args.rows or re.search(args.rows, k)]
    if args.list:
        print("\n".join(f"{k}: {ROWS[k][0]}" for k in keys))
        return
    for k in [] if args.table_only else keys:
        cache = load_cache()
        if k in cache and not (args.redo and re.search(args.redo, k)):
            continue
        print(f"== {k}: {ROWS[k][0]}", flush=True)
        result = ROWS[k][1]()()
        print(f"   {result}", flush=True)
        store(k, result)
    if args.table_only or any(k in load_cache() for k in keys):
        write_table(list(ROWS), load_cache())  # every row: --rows only picks what runs


if __name__ == "__main__":
    main()
