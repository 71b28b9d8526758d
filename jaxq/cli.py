"""The ``jaxq`` command: info, eval, compress and generate on a model file or directory.

MODEL is ``default`` (the bundled SmolLM2-135M-Instruct), a GGUF file, a Hugging Face-style
directory, an mlx-lm directory, or a directory written by ``jaxq compress``. Every command takes
``--json`` for machine-readable output on stdout; progress bars and tables go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxq.core import serialize
from jaxq.core.finite import allowing, check_finite, json_safe
from jaxq.core.io import atomic_write_json, claim_output, holds_output
from jaxq.core.leaf import is_leaf, nbytes
from jaxq.core.tree import flatten_with_paths

console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- loading ---------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    params: Any
    config: Any
    tokenizer: Any
    source: str
    metadata: dict

    @property
    def compressed(self) -> bool:
        return any(is_leaf(leaf) for _, leaf in flatten_with_paths(self.params)[0])

    def apply_fn(self):
        from jaxq.calib import apply
        from jaxq.models.llama import make_apply_fn

        fn = make_apply_fn(self.config)
        return apply(fn) if self.compressed else fn


def load_any(model: str) -> LoadedModel:
    """Load ``default``, a GGUF file, an HF directory or a jaxq compressed directory."""
    from jaxq.models.default import load_compressed, load_model

    path = Path(model).expanduser()
    if model != "default" and path.is_dir() and ((path / serialize.MANIFEST).is_file()
                                                 or (path / "arrays").is_dir()):
        params, config, tokenizer, meta = load_compressed(path)  # checked: one line if damaged
        return LoadedModel(params, config, tokenizer, str(path), meta)
    from mlx_backend.load import is_mlx_dir, load_mlx_dir

    if model != "default" and path.is_dir() and is_mlx_dir(path):
        params, config, tokenizer = load_mlx_dir(path)
        return LoadedModel(params, config, tokenizer, str(path), {})
    with console.status(f"loading {model}"):
        params, config, tokenizer = load_model(model)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CLIError(f"{model}: tokenizer mismatch: the tokenizer has {tokenizer.vocab_size} "
                       f"tokens but the model's embedding has {config.vocab_size} rows")
    return LoadedModel(params, config, tokenizer,
                       str(path.resolve() if model != "default" else model), {})


def _require_tokenizer(m: LoadedModel) -> Any:
    if m.tokenizer is None:
        raise CLIError(f"{m.source}: no tokenizer found (GGUF metadata or tokenizer.json)")
    return m.tokenizer


# --- figures ---------------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("JAXQ_CACHE_DIR", Path.home() / ".cache" / "jaxq"))


def _model_key(source: str, windows: int) -> str:
    """The model's files (each path, size and mtime: a directory's own entry does not change
    when a weight file in it is rewritten) and the window count."""
    from jaxq.models.default import default_model_path

    p = default_model_path() if source == "default" else Path(source)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    stats = [(f.resolve(), f.stat()) for f in files]
    stamp = "|".join(f"{f}:{st.st_size}:{st.st_mtime_ns}" for f, st in stats)
    return hashlib.sha256(f"{stamp}|{windows}".encode()).hexdigest()[:24]


def evaluate(m: LoadedModel, windows: int = 32, progress: bool = True) -> dict:
    from jaxq.eval.data import eval_windows
    from jaxq.eval.perplexity import perplexity
    from jaxq.kernels import prepare

    tokens = eval_windows(_require_tokenizer(m), n=windows)
    # On a GPU/TPU the weights are repacked for the kernels once, here, not inside every
    # jitted call (a no-op with the XLA backend on CPU).
    params = prepare(m.params) if m.compressed else m.params
    res = perplexity(m.apply_fn(), params, tokens, progress=progress)
    return {"perplexity": res.ppl, "nll": res.nll, "tokens": res.n_tokens,
            "eval_seconds": res.seconds}


def float_baseline(source: str, windows: int = 32, progress: bool = True,
                   model: LoadedModel | None = None) -> dict:
    """Float perplexity of a source model, cached on disk (keyed by file, size, mtime);
    ``model`` is the source already loaded, if the caller has it."""
    cache = _cache_dir() / "float_ppl.json"
    try:
        key = _model_key(source, windows)
    except OSError:
        key = None
    known = _read_json(cache)
    if key and key in known:
        return known[key]
    result = evaluate(model or load_any(source), windows, progress)
    if key:
        known = _read_json(cache)  # merge with what parallel runs wrote meanwhile
        known[key] = result
        try:
            atomic_write_json(cache, known)
        except OSError:
            pass  # an unwritable cache costs a re-evaluation next time, nothing else
    return result


def _read_json(path: Path) -> dict:
    """A JSON cache file's contents; empty when missing or unreadable (a cache, not data)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def size_figures(params: Any) -> dict:
    from jaxq.eval.size import size_report

    r = size_report(params)
    return {"size_mb": r.mb, "params": r.n_params, "bits_per_weight": r.bits_per_weight,
            "linear_bits_per_weight": r.linear_bits_per_weight}


def describe_leaf(leaf: Any) -> str:
    return leaf.describe() if is_leaf(leaf) else jnp.dtype(jnp.result_type(leaf)).name


# --- commands --------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> dict:
    m = load_any(args.model)
    groups: OrderedDict[tuple[str, str, tuple], list[int]] = OrderedDict()
    for path, leaf in flatten_with_paths(m.params)[0]:
        pattern = re.sub(r"/\d+/", "/*/", path)
        shape = tuple(leaf.shape if is_leaf(leaf) else jnp.shape(leaf))
        groups.setdefault((pattern, describe_leaf(leaf), shape), []).append(nbytes(leaf))
    layers = [{"path": p, "count": len(b), "shape": list(s), "dtype": d, "mb": sum(b) / 1e6}
              for (p, d, s), b in groups.items()]
    out = {"model": m.source, "architecture": "llama",
           "config": dataclasses.asdict(m.config), **size_figures(m.params), "layers": layers}
    if m.metadata:
        out["recipe"] = m.metadata.get("recipe", {}).get("name")
        out["source_model"] = m.metadata.get("source")
    if not args.json:
        c = m.config
        console.print(f"[bold]{m.source}[/]: llama, {c.num_layers} layers, hidden "
                      f"{c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), vocab "
                      f"{c.vocab_size}, tied head: {c.tie_word_embeddings}")
        console.print(f"{out['params']:,} parameters, {out['size_mb']:.1f} MB, "
                      f"{out['bits_per_weight']:.2f} bits per weight")
        t = Table("leaf", "n", "shape", "stored as", "MB")
        for r in layers:
            t.add_row(r["path"], str(r["count"]), "x".join(map(str, r["shape"])), r["dtype"],
                      f"{r['mb']:.2f}")
        console.print(t)
    return out


def cmd_eval(args: argparse.Namespace) -> dict:
    m = load_any(args.model)
    check_finite(m.params, "weight")
    figures = (evaluate(m, args.windows, progress=not args.json) if m.compressed or m.metadata
               # a source model: its figure is the float baseline later compressions compare to
               else float_baseline(m.source, args.windows, not args.json, model=m))
    out = {"model": m.source, **size_figures(m.params), **figures}
    source = m.metadata.get("source") if m.metadata else (None if m.compressed else m.source)
    if source and m.metadata and source != "default" and not Path(source).exists():
        console.print(f"[yellow]float baseline skipped: the source model {source} is not "
                      "there any more[/]")
    elif source and m.metadata:
        base = float_baseline(source, args.windows, progress=not args.json)
        out["float_perplexity"] = base["perplexity"]
        out["delta_perplexity"] = figures["perplexity"] - base["perplexity"]
    if not args.json:
        _summary([out])
    return out


def _claim_out(args: argparse.Namespace):
    """--out of compress and train, held before the work: a jaxq directory (only one is
    replaced), with room for about the source model's size."""
    from jaxq.models.default import model_bytes

    return claim_output(args.out, serialize.JAXQ_DIR, need_bytes=model_bytes(args.model))


@holds_output(_claim_out)
def cmd_compress(args: argparse.Namespace) -> dict:
    from jaxq.recipes import load_recipe
    from jaxq.recipes import run as run_recipe

    recipe = load_recipe(args.recipe, kind="transforms")
    out_dir = Path(args.out)
    if args.stream:  # a model larger than memory: one block at a time, no evaluation
        return _compress_streamed(args, recipe, out_dir)
    work = out_dir.with_name(out_dir.name + ".work")  # finished layers of a killed run
    if work.exists() and not args.resume:
        raise CLIError(f"{work} holds a previous run: pass --resume to continue it, or remove it")
    m = load_any(args.model)
    if m.compressed:
        raise CLIError(f"{m.source} is already compressed; give the source model")
    run = run_recipe(m, recipe, progress=not args.json,
                     status=console.status if not args.json else None, work_dir=work)
    qparams, seconds = run.params, run.seconds
    qm = LoadedModel(qparams, run.config, m.tokenizer, m.source, {})
    result = {"model": m.source, "recipe": recipe.name, "quantize_seconds": seconds,
              **size_figures(qparams), "fallback_layers": run.fallback_layers}
    if (run.calibration or {}).get("resumed_weights"):
        result["resumed_weights"] = run.calibration["resumed_weights"]
        if not args.json:
            console.print(f"resumed: {result['resumed_weights']} weights read back from {work}")
    _evaluate_and_save(args, m, qm, recipe, out_dir, result)
    shutil.rmtree(work, ignore_errors=True)  # the result is saved: nothing left to resume
    if not args.json:
        _summary([result])
        if result["fallback_layers"]:
            console.print(f"{len(result['fallback_layers'])} layers fell back to a group size "
                          "that divides their input width: " + ", ".join(
                              sorted({re.sub(r"/\d+/", "/*/", p)
                                      for p in result["fallback_layers"]})))
        console.print(f"saved to {out_dir}")
    return result


def _compress_streamed(args: argparse.Namespace, recipe: Any, out_dir: Path) -> dict:
    from jaxq.recipes.stream import compress

    res = compress(args.model, recipe, out_dir, progress=not args.json,
                   status=console.status if not args.json else None)
    result = {"model": res.source, "recipe": recipe.name, **res.figures, "out": str(out_dir)}
    if not args.json:
        _summary([result])
        console.print(f"saved to {out_dir} (streamed; `jaxq eval {out_dir}` gives perplexity)")
    return result


def _evaluate_and_save(args: argparse.Namespace, source: LoadedModel, qm: LoadedModel,
                       recipe: Any, out_dir: Path, result: dict) -> None:
    """Evaluate the new model against the source's float baseline (unless --no-eval), then
    save it with the tokenizer files; ``result`` gains the figures and ``out``."""
    if not args.no_eval:
        result.update(evaluate(qm, args.windows, progress=not args.json))
        base = float_baseline(source.source, args.windows, progress=not args.json)
        result["float_perplexity"] = base["perplexity"]
        result["delta_perplexity"] = result["perplexity"] - base["perplexity"]
    tok = source.tokenizer
    extra = {"tokenizer.json": tok.to_json_str(),
             "tokenizer_config.json": json.dumps(tok.special_config(), indent=1)} if tok else {}
    with console.status(f"saving {out_dir}"):
        _save(out_dir, qm.params, recipe, qm, result, extra)
    result["out"] = str(out_dir)


def _save(out_dir: Path, qparams: Any, recipe: Any, m: LoadedModel, result: dict,
          extra: dict) -> None:
    serialize.save(out_dir, qparams, {
        "recipe": recipe.to_dict(), "source": m.source, "config": dataclasses.asdict(m.config),
        "figures": json_safe({k: v for k, v in result.items()
                              if k not in ("model", "recipe")})},
        extra_files=extra)


@holds_output(_claim_out)
def cmd_train(args: argparse.Namespace) -> dict:
    """Run a pipeline recipe's stages (prune, distill, quantize, QAT...) and save the result;
    rerun with ``--resume`` after a kill to continue from the last checkpoint."""
    from jaxq.recipes import load_recipe
    from jaxq.recipes.pipeline import run_pipeline

    recipe = load_recipe(args.recipe, kind="stages")
    out_dir = Path(args.out)
    work = out_dir.with_name(out_dir.name + ".work")
    if work.exists() and not args.resume:
        raise CLIError(f"{work} holds a previous run: pass --resume to continue it, or remove it")
    m = load_any(args.model)
    if m.compressed:
        raise CLIError(f"{m.source} is already compressed; give the source model")
    t0 = time.perf_counter()
    res = run_pipeline(recipe, m.params, m.config, _require_tokenizer(m), work,
                       steps=args.steps, progress=not args.json,
                       on_stage=lambda i, st: console.print(f"stage {i}: {st['stage']}"))
    qm = LoadedModel(res.params, res.config, m.tokenizer, m.source, {})
    result = {"model": m.source, "recipe": recipe.name, "train_seconds": time.perf_counter() - t0,
              "stages": [{k: v for k, v in st.items() if k != "losses"} | (
                  {"first_loss": st["losses"][0], "last_loss": st["losses"][-1]}
                  if st["losses"] else {}) for st in res.stages], **size_figures(res.params)}
    _evaluate_and_save(args, m, qm, recipe, out_dir, result)
    if not args.json:
        _summary([result])
        console.print(f"saved to {out_dir}")
    return result


def cmd_generate(args: argparse.Namespace) -> dict:
    from jaxq.calib import apply, fuse_siblings
    from jaxq.kernels import prepare
    from jaxq.models.llama import end_ids, generate, make_apply_fn, trim_at_end

    m = load_any(args.model)
    tok = _require_tokenizer(m)
    ids = tok.encode(args.prompt)
    if not ids:
        raise CLIError("the prompt encodes to no tokens")
    t0 = time.perf_counter()
    prompt = jnp.asarray(ids, jnp.int32)
    params = m.params
    if m.compressed:  # q/k/v and gate/up as one matmul each, repacked once for the kernels
        params = prepare(fuse_siblings(make_apply_fn(m.config), params, prompt[None]))
    stops = end_ids(m.config, tok)  # generation stops at any of them, the text ends before it
    out = generate(params, m.config, prompt, args.max_tokens, eos_ids=stops,
                   apply=apply if m.compressed else None)
    out = trim_at_end(np.asarray(out).tolist(), stops)
    seconds = time.perf_counter() - t0
    text = tok.decode(out, skip_special_tokens=True)
    result = {"model": m.source, "prompt": args.prompt, "completion": text, "tokens": out,
              "seconds": seconds}
    if not args.json:
        sys.stdout.write(args.prompt + text + "\n")
    return result


def _summary(rows: list[dict]) -> None:
    t = Table("model", "recipe", "size MB", "bits/weight", "linear bits/w", "perplexity",
              "vs float", "time s", title="jaxq summary")
    for r in rows:
        ppl = r.get("perplexity")
        delta = r.get("delta_perplexity")
        t.add_row(Path(str(r.get("out", r["model"]))).name, str(r.get("recipe", "-")),
                  f"{r['size_mb']:.1f}", f"{r['bits_per_weight']:.3f}",
                  f"{r['linear_bits_per_weight']:.3f}",
                  "-" if ppl is None else f"{ppl:.3f}",
                  "-" if delta is None else f"{delta:+.3f}",
                  f"{r.get('quantize_seconds', r.get('eval_seconds', 0)):.1f}")
    console.print(t)


# --- entry point -----------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


ALLOW_HELP = "go on, with a warning, when a weight, statistic or output holds NaN/Inf"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help="'default', a .gguf file, an HF dir or a jaxq dir")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.set_defaults(fn=fn)
        return p

    add("info", cmd_info, "architecture, parameter count, size, per-layer storage")
    p = add("eval", cmd_eval, "perplexity on Penn Treebank (the eval protocol)")
    p.add_argument("--windows", type=_positive_int, default=32,
                   help="512-token windows (default 32)")
    p.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_HELP)
    p = add("compress", cmd_compress, "apply a recipe and save the compressed model")
    p.add_argument("--recipe", default="w4-g64", help="a shipped recipe name or a YAML path")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--windows", type=_positive_int, default=32)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_HELP)
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from the layers it left in OUT.work")
    p.add_argument("--stream", action="store_true", help="one block in memory at a time, for "
                   "models larger than memory (no evaluation: run jaxq eval OUT)")
    p = add("train", cmd_train, "run a pipeline recipe (prune, distill, quantize, QAT+KD)")
    p.add_argument("--recipe", required=True, help="a shipped pipeline recipe or a YAML path")
    p.add_argument("--out", required=True, help="output directory (work files in OUT.work)")
    p.add_argument("--steps", type=_positive_int, help="steps of every training stage")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT.work")
    p.add_argument("--windows", type=_positive_int, default=32)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p = add("generate", cmd_generate, "greedy completion of a prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    from jaxq.export.cli import add_export_parser

    add_export_parser(sub, load_any)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxq.models import ModelLoadError
    from jaxq.recipes import RecipeError

    args = build_parser().parse_args(argv)
    try:
        with (contextlib.nullcontext() if args.json else _jaxq_log_on_stderr(),
              allowing(getattr(args, "allow_nonfinite", False), echo=_warn)):
            result = args.fn(args)
    except (CLIError, ModelLoadError, RecipeError, FileNotFoundError, ValueError) as err:
        # jaxq validates at its boundaries with ValueErrors that name the tensor or setting:
        # one line for the user, the traceback on request.
        if os.environ.get("JAXQ_DEBUG"):
            raise
        hint = " (JAXQ_DEBUG=1 shows the traceback)" if type(err) is ValueError else ""
        print(f"jaxq: error: {err}{hint}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_safe(result), indent=1, default=_json_default, allow_nan=False))
    return 0


def _warn(message: str) -> None:
    print(f"jaxq: warning: {message}", file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: a live rich progress bar puts a
    proxy there that prints above the bar instead of tearing it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def _jaxq_log_on_stderr():
    """jaxq's INFO notes (the kernel autotuner's, for one) on stderr while a command runs."""
    logger = logging.getLogger("jaxq")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("jaxq: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    sys.exit(main())
