"""Training figures on SmolLM2-135M (issue 17): QAT+KD, hard-label QAT, KD alone, 2:4 + KD, a
dropped-block student, and the full P-KD-Q pipeline, each run by the pipeline runner
(``jaxq.recipes.pipeline``) from the shipped recipes on PTB train text, evaluated with the
protocol (32 PTB-test windows of 512), against the float teacher and the best PTQ at the same
bits per weight.

Each row's pipeline keeps its stages and checkpoints in ``$JAXQ_TRAIN_CACHE`` (default
``~/.cache/jaxq/train``), and its figures there as it finishes: an interrupted run resumes, a
finished row is not recomputed (``--redo REGEX`` recomputes). The teacher's top-k logits are
cached once and shared by the rows with the same windows.

    python scripts/bench_train.py --rows 'w3-qatkd$'     # one row (then the table)
    python scripts/bench_train.py --steps 200 --table     # every row at 200 steps; the table
    python scripts/bench_train.py --table-only            # the table from cached rows
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import header, table, write_section  # noqa: E402

CACHE = Path(os.environ.get("JAXQ_TRAIN_CACHE", "~/.cache/jaxq/train")).expanduser()
FLOAT_PPL = 56.66  # BENCHMARKS.md quality table: the float teacher
BEST_PTQ = {3: ("AWQ+GPTQ W3 g64", 4.560, 85.72), 2: ("AWQ+GPTQ W2 g64", 3.771, 2034.40)}


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    recipe: str
    edit: dict  # stage index -> option overrides
    bits: int | None  # for the PTQ reference


ROWS = [
    Row("w3-qatkd", "W3 g64 QAT+KD (alpha 1), from AWQ+GPTQ", "qat-kd-w3-g64", {}, 3),
    Row("w2-qatkd", "W2 g64 QAT+KD (alpha 1), from AWQ+GPTQ", "qat-kd-w2-g64", {}, 2),
    Row("w3-qat-hard", "W3 g64 QAT, hard labels only (alpha 0)", "qat-kd-w3-g64",
        {1: {"alpha": 0.0}}, 3),
    Row("w3-kd-alone", "W3 g64 KD alone (alpha 1): codes frozen, scales and norms trained",
        "qat-kd-w3-g64", {1: {"stage": "distill", "replace": True}}, 3),
    Row("w2-qat-hard", "W2 g64 QAT, hard labels only (alpha 0)", "qat-kd-w2-g64",
        {1: {"alpha": 0.0}}, 2),
    Row("w2-kd-alone", "W2 g64 KD alone (alpha 1): codes frozen, scales and norms trained",
        "qat-kd-w2-g64", {1: {"stage": "distill", "replace": True}}, 2),
    Row("sparse-kd", "2:4 SparseGPT + KD (alpha 1)", "pkdq", {"keep": [0, 1]}, None),
    Row("student-kd", "24-block student (6 blocks dropped by angular distance) + KD",
        "student-drop-blocks", {}, None),
    Row("pkdq", "P-KD-Q: 2:4 SparseGPT -> KD -> GPTQ W4 g64 -> QAT+KD", "pkdq", {}, None),
]


def row_recipe(row: Row, steps: int | None, train: dict | None = None,
               cal_windows: int | None = None):
    """The row's recipe: the shipped one with the row's stage edits, ``steps`` for every
    training stage, ``train`` defaults (batch, seq_len) and calibration windows overridden."""
    from jaxq.recipes import load_recipe, recipe_from_dict

    data = copy.deepcopy(load_recipe(row.recipe).to_dict())
    data.pop("transforms", None)
    data["train"] = {**data.get("train", {}), **(train or {})}
    if cal_windows and data.get("calibration"):
        data["calibration"]["windows"] = cal_windows
    stages = data["stages"]
    if "keep" in row.edit:
        stages = [stages[i] for i in row.edit["keep"]]
    for i, edit in row.edit.items():
        if isinstance(i, int):
            if edit.get("replace"):  # a distill stage in place of the qat stage
                keep = {k: v for k, v in stages[i].items()
                        if k in ("steps", "alpha", "temperature", "lr", "batch", "seq_len")}
                stages[i] = {"stage": edit["stage"], **keep}
            else:
                stages[i].update(edit)
    if steps is not None:
        for st in stages:
            if st["stage"] in ("distill", "qat"):
                st["steps"] = steps
    data["stages"] = stages
    data["name"] = row.key
    return recipe_from_dict(data)


def share_stages(recipe, work: Path) -> None:
    """Link each stage's work directory to one keyed by everything it depends on (the train
    defaults and the stages up to it), so rows with a common prefix (the W3 rows' AWQ+GPTQ,
    P-KD-Q's prune and distill) compute it once."""
    import hashlib

    from jaxq.recipes.pipeline import _stage_name

    work.mkdir(parents=True, exist_ok=True)
    for i, st in enumerate(recipe.stages):
        trains = any(s["stage"] in ("distill", "qat") for s in recipe.stages[:i + 1])
        key = json.dumps([recipe.train if trains else None, recipe.calibration,
                          list(recipe.stages[:i + 1])], sort_keys=True, default=str)
        target = CACHE / "stages" / hashlib.sha256(key.encode()).hexdigest()[:16]
        target.mkdir(parents=True, exist_ok=True)
        link = work / _stage_name(i, st)
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()  # a stage of an earlier run with other settings
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


def evaluate(params, config, windows) -> float:
    from jaxq.calib import apply
    from jaxq.core.leaf import is_leaf
    from jaxq.core.tree import flatten_with_paths
    from jaxq.eval.perplexity import perplexity
    from jaxq.models.llama import make_apply_fn

    fn = make_apply_fn(config)
    if any(is_leaf(x) for _, x in flatten_with_paths(params)[0]):
        fn = apply(fn)
    return float(perplexity(fn, params, windows, progress=False).ppl)


def run_row(row: Row, args: argparse.Namespace, model) -> dict:
    import numpy as np

    from jaxq.eval.data import eval_windows
    from jaxq.eval.size import size_report
    from jaxq.recipes.pipeline import Model, _load_stage, run_pipeline

    params, config, tok = model
    train = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq_len),
                               ("lr", args.lr)) if v}
    if args.live_teacher:
        train["teacher_topk"] = None
    recipe = row_recipe(row, args.steps, train, args.cal_windows)
    work = CACHE / row.key / "work"
    windows = eval_windows(tok, n=32)
    t0 = time.time()
    last = [t0]

    def log(step: int, metrics: dict) -> None:
        now = time.time()
        print(f"[{row.key}] step {step + 1} loss {metrics['loss']:.4f} "
              f"{now - last[0]:.1f}s", flush=True)
        last[0] = now

    share_stages(recipe, work)
    res = run_pipeline(recipe, params, config, tok, work, progress=False,
                       teacher_cache=CACHE / "teacher-topk", callback=log,
                       on_stage=lambda i, st: print(f"[{row.key}] stage {i} {st['stage']} "
                                                    f"({time.time() - t0:.0f}s)", flush=True))
    seconds = time.time() - t0
    # the model the training started from: the output of the last stage before the first
    # training stage (the PTQ / pruned / dropped-block model)
    first_train = next(i for i, st in enumerate(recipe.stages)
                       if st["stage"] in ("distill", "qat"))
    start_ppl = None
    if first_train > 0:
        prev = recipe.stages[first_train - 1]
        saved = work / f"{first_train - 1:02d}-{prev.get('name', prev['stage'])}" / "model"
        known = saved.parent / "start_ppl.json"  # shared by rows starting from this stage
        if known.is_file():
            start_ppl = json.loads(known.read_text())
        else:
            m = _load_stage(saved, Model(params, config))
            start_ppl = evaluate(m.params, m.config, windows)
            known.write_text(json.dumps(start_ppl))
    ppl = evaluate(res.params, res.config, windows)
    train = [st for st in res.stages if "steps" in st]
    sr = size_report(res.params)
    opts = {**recipe.train}
    tokens = sum(st["steps"] for st in train) * int(opts["batch"]) * int(opts["seq_len"])
    return {"key": row.key, "label": row.label, "recipe": row.recipe, "bits": row.bits,
            "perplexity": ppl, "start_perplexity": start_ppl,
            "bits_per_weight": sr.bits_per_weight, "params": sr.n_params,
            "steps": [st["steps"] for st in train], "batch": int(opts["batch"]),
            "seq_len": int(opts["seq_len"]), "tokens": tokens, "lr": float(opts["lr"]),
            "first_loss": [st["losses"][0] if st["losses"] else None for st in train],
            "last_loss": [float(np.mean(st["losses"][-10:])) if st["losses"] else None
                          for st in train],
            "calibration_windows": (recipe.calibration or {}).get("windows"),
            "seconds": seconds, "date": time.strftime("%Y-%m-%d")}


def recipe_lr(name: str) -> float:
    """The shipped recipe's peak learning rate (rows cached before ``lr`` was recorded)."""
    from jaxq.recipes import load_recipe

    return float(load_recipe(name).train["lr"])


def render(rows: list[dict], command: str) -> str:
    body = [f"## Training: QAT+KD, distillation, P-KD-Q (issue 17)\n\n{header(command)}\n",
            "SmolLM2-135M-Instruct, trained on PTB train text (windows of `seq_len` tokens from "
            "its start), evaluated with the protocol (32 PTB-test windows of 512). Each row is a "
            "shipped pipeline recipe run by `jaxq.recipes.pipeline` (what `jaxq train` runs), "
            "with the step count shown. The teacher is the float model, run beside the student "
            "(`--live-teacher`) or as top-64 logits cached once. `start` is the model training "
            "began from (the PTQ, pruned or dropped-block model; calibration windows of 512 "
            "tokens in the last column). The token budget is what one run could afford on 2 CPU "
            "cores: far below what QAT usually gets.\n"]
    out = []
    for r in rows:
        ref = "-"
        if r["bits"] in BEST_PTQ:
            name, bpw, ppl = BEST_PTQ[r["bits"]]
            ref = f"{name}: {ppl:.2f} ({bpw:.2f} bpw)"
        start = r["start_perplexity"]
        recovered = "-"
        if start is not None and start > FLOAT_PPL:
            recovered = f"{(start - r['perplexity']) / (start - FLOAT_PPL):.0%}"
        label = next((row.label for row in ROWS if row.key == r["key"]), r["label"])
        out.append([label, f"{r['bits_per_weight']:.3f}",
                    "-" if start is None else f"{start:.2f}", f"{r['perplexity']:.2f}",
                    f"{r['perplexity'] - FLOAT_PPL:+.2f}", recovered, ref,
                    " + ".join(map(str, r["steps"])), f"{r['batch']}x{r['seq_len']}",
                    f"{r.get('lr') or recipe_lr(r['recipe']):g}",
                    f"{r['tokens']:,}", f"{r['seconds'] / 60:.0f}",
                    str(r.get("calibration_windows") or "-")])
    body.append(table(["row", "bits/weight", "start ppl", "perplexity", "vs float (56.66)",
                       "gap recovered", "best PTQ at these bits", "steps", "batch", "peak lr",
                       "train tokens", "minutes", "calibration windows"], out))
    body.append(
        "\n`minutes`: the row's own wall-clock time (a stage shared with an earlier row, e.g. "
        "P-KD-Q's prune and distill, is not counted). Goals (issue 17): W3 g64 QAT+KD (alpha 1) "
        "<= 71: met (STE/LSQ+ with latent weights, 84.84 -> 67.65, 61% of the gap, 154k "
        "tokens); KD alone, which trains the PTQ model's scales, offsets and norms with the "
        "codes frozen, recovers more per token (62.06, 81%). Hard labels only (alpha 0) end "
        "below the float teacher (56.33): PTB train text adapts the model to the test domain, "
        "which distillation from the teacher cannot do. W2 g64 QAT+KD (alpha 1) < 150: met by "
        "the frozen-code variant (learned scales, offsets and norms; 400 steps, 205k tokens: "
        "32,036 -> 121.40, below AWQ+GPTQ W2 g64's 2,034 at 128 windows); with latent weights "
        "(STE/LSQ+) the same 400 steps give 192.99 (50 steps: 3,478), and hard labels 5,018 "
        "after 50 steps. "
        "KD recovers >= 1/3 of 2:4 SparseGPT's gap: met (2:4 with the exact refit 105.99 -> "
        "75.01, 63%). The W2 and student rows started from 8 calibration windows, the others "
        "from 32. The W3 rows share one PTQ start, made while pipeline quantize stages did not "
        "fold AWQ's scales: each linear keeps its input scale, the same function at +0.035 "
        "bits/weight over the folded 4.560 (fixed since; the W2 start folds). P-KD-Q (2:4 "
        "refit, KD, GPTQ W4 g64 symmetric, QAT+KD) ends at 83.75 with every pruned weight "
        "exactly 0, stored as dense W4 (5.35 bits/weight).")
    return "\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=".", help="regex over row keys")
    ap.add_argument("--steps", type=int, help="steps of every training stage (else the recipe's)")
    ap.add_argument("--batch", type=int, help="training batch (else the recipe's)")
    ap.add_argument("--seq-len", type=int, help="training window length (else the recipe's)")
    ap.add_argument("--cal-windows", type=int, help="calibration windows (else the recipe's)")
    ap.add_argument("--lr", type=float, help="peak learning rate (else the recipe's)")
    ap.add_argument("--live-teacher", action="store_true",
                    help="run the teacher beside the student instead of caching its top-k "
                         "(cheaper when few steps: the cache costs a teacher pass per window)")
    ap.add_argument("--redo", help="regex: recompute these rows")
    ap.add_argument("--table", action="store_true", help="write BENCHMARKS.md section 'train'")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    done = CACHE / "rows"
    done.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        from jaxq.models.default import load_default

        model = None
        for row in ROWS:
            if not re.search(args.rows, row.key):
                continue
            path = done / f"{row.key}.json"
            if path.is_file() and not (args.redo and re.search(args.redo, row.key)):
                continue
            model = model or load_default()
            result = run_row(row, args, model)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)
            print(json.dumps(result), flush=True)
    if args.table or args.table_only:
        cached = {p.stem: json.loads(p.read_text()) for p in done.glob("*.json")}
        rows = [cached[r.key] for r in ROWS if r.key in cached]
        write_section("train", render(rows, "python scripts/bench_train.py "
                                            "--rows ROW --steps N --batch B --seq-len T "
                                            "--cal-windows W, then --table-only"))


if __name__ == "__main__":
    main()
