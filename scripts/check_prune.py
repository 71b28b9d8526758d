"""Quality and time of jaxq's pruning on SmolLM2 (issue 16), one run per method.

Each row calibrates the float model on 32 PTB-train windows of 512 (batches of 8, sequential:
every layer sees the pruned earlier ones), keeps the tied embedding / output head unpruned, and
is evaluated under the eval protocol (32 PTB-test windows of 512). GPTQ W4 g64 runs in the same
script for the time comparison. Results go to stdout and, one JSON line per row, to --out.

    nice -n 10 python scripts/check_prune.py --rows sparsegpt-50,wanda-50,sparsegpt-2of4,gptq
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

import jaxq  # noqa: E402
from jaxq.eval.data import calibration_windows, eval_windows, window_batches  # noqa: E402
from jaxq.eval.perplexity import perplexity  # noqa: E402
from jaxq.eval.size import size_report  # noqa: E402
from jaxq.models.default import load_default  # noqa: E402
from jaxq.models.llama import make_apply_fn  # noqa: E402
from jaxq.prune import OWL, Magnitude, SparseGPT, Wanda, plan  # noqa: E402

ROWS = {
    "gptq": lambda: jaxq.GPTQ(bits=4, group_size=64),
    "sparsegpt-50": lambda: SparseGPT(sparsity=0.5),
    "wanda-50": lambda: Wanda(sparsity=0.5),
    "sparsegpt-2of4": lambda: SparseGPT(pattern="2:4"),
    "sparsegpt-4of8": lambda: SparseGPT(pattern="4:8"),
    "magnitude-50": lambda: Magnitude(sparsity=0.5),
    "sparsegpt-2of4-w4": lambda: SparseGPT(pattern="2:4", bits=4, group_size=64),
    "sparsegpt-70": lambda: SparseGPT(sparsity=0.7),
    "owl-sparsegpt-50": lambda: OWL(SparseGPT(sparsity=0.5), group=r"layers/\d+/"),
    "owl-sparsegpt-70": lambda: OWL(SparseGPT(sparsity=0.7), group=r"layers/\d+/"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="gptq,sparsegpt-50,wanda-50,sparsegpt-2of4")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="prune_check.jsonl")
    args = ap.parse_args()
    params, config, tok = load_default()
    apply_fn = make_apply_fn(config)
    batches = window_batches(calibration_windows(tok, n=args.windows, length=512), 8)
    ev = eval_windows(tok)
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        transform = plan(ROWS[name](), apply_fn, params, batches, progress=False)
        qp, _ = jaxq.calibrate(apply_fn, params, batches, transform, progress=False)
        jax.block_until_ready(jax.tree.leaves(qp))
        seconds = time.perf_counter() - t0
        r = perplexity(jaxq.apply(apply_fn), qp, ev, progress=False)
        rep = size_report(qp)
        row = {"row": name, "windows": args.windows, "seconds": round(seconds, 1),
               "perplexity": round(r.ppl, 2),
               "bits_per_weight": round(rep.bits_per_weight, 3)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
