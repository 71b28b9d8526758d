"""Export figures for BENCHMARKS.md: the same compressed SmolLM2 in jaxq, mlx-lm and llama.cpp.

For each model: jaxq's protocol perplexity, the exported file sizes and export times, and the
perplexity that mlx-lm (on the MLX directory) and llama.cpp (on the GGUF file) compute under the
same protocol (jaxq's PTB windows, float64 log-softmax in numpy). Runtimes must agree with jaxq
within 0.5%. mlx runs with Debian's OpenBLAS preloaded when installed (the script re-executes
itself with LD_PRELOAD); ``--blas`` also times one mlx forward with and without it.

    python scripts/bench_export.py [--windows 32] [--blas] [--full] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

N_PARAMS = 134_515_008  # SmolLM2-135M logical parameters (tied embedding once)


def _models(params):
    """name -> (compressed params, description). Both are bit-exact in MLX and GGUF (Q4_1)."""
    import jax.numpy as jnp

    import jaxq
    from jaxq.core.transform import chain
    from jaxq.recipes import load_recipe

    w4g32 = chain(jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16),
                  jaxq.RTN(bits=8, group_size=32, symmetric=True, scale_dtype=jnp.float16,
                           where=lambda p, x: p.startswith("model/embed")))
    return {
        "w4-g64": (load_recipe("w4-g64").build()(params),
                   "recipe w4-g64: linear 4-bit g64, embedding 8-bit g64 (asymmetric)"),
        "w4-g32": (w4g32(params), "linear 4-bit g32, embedding 8-bit g32 symmetric"),
    }


#: Runtimes measured per model by default (``--full``: all of them on both).
RUNTIMES = {"w4-g64": ("mlx",), "w4-g32": ("llama.cpp",)}


def _jaxq_ppl(params, config, windows) -> dict:
    from jaxq.calib import apply
    from jaxq.eval.perplexity import perplexity
    from jaxq.models.llama import make_apply_fn

    r = perplexity(apply(make_apply_fn(config)), params, windows, progress=False)
    return {"perplexity": r.ppl, "seconds": r.seconds, "tokens": r.n_tokens}


def _mlx_ppl(path: Path, windows) -> dict:
    from mlx_backend import verify

    return verify.perplexity(verify.dequantize_model(verify.load(path)), windows)


def _llama_ppl(path: Path, windows) -> dict:
    from jaxq.export import llamacpp

    return llamacpp.perplexity(llamacpp.load(path), windows)


def _blas_compare(mlx_dir: Path) -> dict:
    """Seconds for one 512-token mlx forward, with and without OpenBLAS preloaded."""
    from mlx_backend.verify import openblas_path

    code = ("import time, numpy as np; from mlx_backend import verify; "
            f"m = verify.dequantize_model(verify.load({str(mlx_dir)!r})); "
            "x = np.zeros((1, 512), np.int32); "
            "verify.logits(m, x); t = time.perf_counter(); verify.logits(m, x); "
            "print(time.perf_counter() - t)")
    out = {}
    lib = openblas_path()
    for label, preload in (("reference BLAS", ""), ("OpenBLAS", lib)):
        if label == "OpenBLAS" and not lib:
            continue
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if preload:
            env["LD_PRELOAD"] = preload
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=benchlib.ROOT, check=True)
        out[label] = float(res.stdout.strip().splitlines()[-1])
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> tuple[list[list], dict]:
    from jaxq.eval.data import eval_windows
    from jaxq.export import llamacpp
    from jaxq.export.gguf import export_gguf
    from jaxq.models.default import load_default
    from mlx_backend.export import export_mlx

    params, config, tok = load_default()
    windows = eval_windows(tok, n=args.windows)
    rows, raw = [], {}
    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    for name, (q, desc) in _models(params).items():
        print(f"[{name}] jaxq perplexity", file=sys.stderr)
        ref = _jaxq_ppl(q, config, windows)
        entry = {"description": desc, "jaxq": ref}
        rows.append([name, "jaxq", "QArray", "-", "-", "-", f"{ref['perplexity']:.3f}", "-",
                     f"{ref['seconds']:.0f}"])
        wanted = ("mlx", "llama.cpp") if args.full else RUNTIMES[name]
        mdir = work / f"{name}-mlx"
        r = export_mlx(q, config, tok, mdir)
        size = _dir_bytes(mdir)
        entry["mlx"] = {"export_seconds": r.seconds, "bytes": size}
        if "mlx" in wanted:
            print(f"[{name}] mlx-lm perplexity", file=sys.stderr)
            m = _mlx_ppl(mdir, windows)
            entry["mlx"].update(m)
            rows.append(_row(name, "mlx-lm", "mlx affine", size, r.seconds, m, ref))
        else:
            rows.append(_row(name, "mlx-lm (export only)", "mlx affine", size, r.seconds, None,
                             ref))
        if args.blas and "blas" not in raw:
            raw["blas"] = _blas_compare(mdir)
        gpath = work / f"{name}.gguf"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = export_gguf(q, config, tok, gpath, name=f"SmolLM2-135M-Instruct {name} (jaxq)")
        types = sorted({t for k, t in g.types.items() if not k.endswith("norm.weight")})
        entry["gguf"] = {"export_seconds": g.seconds, "bytes": g.bytes, "types": types,
                         "requantized": g.requantized,
                         "warnings": [str(w.message) for w in caught]}
        label = "+".join(types) + (" (embedding requantized)" if g.requantized else "")
        if llamacpp.available() and "llama.cpp" in wanted:
            print(f"[{name}] llama.cpp perplexity", file=sys.stderr)
            lp = _llama_ppl(gpath, windows)
            entry["gguf"].update(lp)
            rows.append(_row(name, "llama.cpp", label, g.bytes, g.seconds, lp, ref))
        else:
            rows.append(_row(name, "llama.cpp (export only)", label, g.bytes, g.seconds, None,
                             ref))
        raw[name] = entry
    return rows, raw


def _row(name, runtime, fmt, size, export_s, res, ref) -> list:
    head = [name, runtime, fmt, f"{size / 1e6:.1f}", f"{8 * size / N_PARAMS:.2f}",
            f"{export_s:.1f}"]
    if res is None:
        return [*head, "-", "-", "-"]
    rel = 100 * (res["perplexity"] / ref["perplexity"] - 1)
    return [*head, f"{res['perplexity']:.3f}", f"{rel:+.2f}%", f"{res['seconds']:.0f}"]


def report(rows: list[list], raw: dict, windows: int) -> str:
    head = benchlib.header()
    table = benchlib.table(["model", "runtime", "format", "file MB", "file bits/weight",
                            "export s", "perplexity", "vs jaxq", "eval s"], rows)
    lines = [
        "## Export to MLX and GGUF (issue 6): the same compressed model in three runtimes",
        "", head,
        f"SmolLM2-135M-Instruct (its packaged Q4_1 weights dequantized to float32, then "
        f"compressed by jaxq), PTB test, {windows} x 512 windows ({windows * 511:,} predictions), "
        "float64 log-softmax. mlx-lm and llama.cpp get jaxq's token windows; each window is one "
        "forward from position 0. mlx-lm runs its model on the exported directory with the "
        "weights dequantized to float32 by `mx.dequantize` (mlx's CPU quantized matmul is ~8x "
        "slower; tests check both paths agree to 1e-4). `vs jaxq` is the runtime's perplexity "
        "relative to jaxq's on the same weights (the target is within 0.5%). File sizes include "
        "tokenizer and config; bits/weight = file bits / 134,515,008 parameters. llama.cpp "
        "quantizes activations to 8 bits inside its Q4_1/Q8_0 dot products.",
        "", table, ""]
    for name in ("w4-g64", "w4-g32"):
        if name in raw:
            g = raw[name]["gguf"]
            lines.append(f"- {name}: {raw[name]['description']}; GGUF types "
                         f"{', '.join(g['types'])}" + (
                             f"; requantized for GGUF: {', '.join(g['requantized'])}"
                             if g["requantized"] else "; every tensor bit-exact"))
    if "blas" in raw:
        b = raw["blas"]
        lines.append("- one 512-token mlx-lm forward of W4 g64: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in b.items()))
    if not any(r[1] == "llama.cpp" for r in rows):
        lines.append("- llama.cpp rows missing: llama-cpp-python is not installed "
                     "(docs/llama-cpp.md)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--blas", action="store_true", help="time mlx with and without OpenBLAS")
    ap.add_argument("--full", action="store_true", help="both runtimes on both models")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    from mlx_backend.verify import reexec_with_openblas

    reexec_with_openblas()
    t0 = time.perf_counter()
    rows, raw = run(args)
    body = report(rows, raw, args.windows)
    print(body)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not args.no_write:
        benchlib.write_section("export", body)


if __name__ == "__main__":
    main()
