"""``jaxq export``: write a model (source or compressed) as an mlx-lm directory or a GGUF file.

Wired into :mod:`jaxq.cli` with ``add_export_parser(sub, load)``, where ``load`` is the CLI's model
loader (so this module never imports the CLI); the handler is :func:`cmd_export`.
Output goes through :mod:`jaxq.core.io`: ``--out`` is locked and checked before the work, written
to a temporary sibling and put in place in one step at the end, so a failed export leaves
nothing behind; ``--force`` replaces only an earlier export of the same kind.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from jaxq.core.io import claim_output, holds_output, scratch_dir

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count, as bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 123456)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_export_parser(sub: Any, load: Callable[[str], Any]) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``jaxq``'s subparsers; ``load(model)`` gives an object
    with ``params``, ``config``, ``tokenizer`` and ``source`` (the CLI's loader)."""
    p = sub.add_parser("export", help="write an mlx-lm directory or a GGUF file")
    p.add_argument("model", help="'default', a .gguf file, an HF/mlx dir or a jaxq dir")
    p.add_argument("--to", required=True, choices=("mlx", "gguf"), help="target runtime")
    p.add_argument("--out", required=True, help="output directory (mlx) or file (gguf)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export, with a warning, a model holding NaN/Inf")
    g = p.add_argument_group("mlx")
    g.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="split model.safetensors past this size (default 5GB)")
    g.add_argument("--rope-traditional", action="store_true",
                   help="keep llama.cpp's interleaved Q/K rows (rope_traditional: true) instead "
                        "of HF order")
    g = p.add_argument_group("gguf")
    g.add_argument("--float-type", choices=("f16", "bf16", "f32"), default="f16",
                   help="type of float matrices (default f16; norms are always f32)")
    g.add_argument("--fallback", choices=("nearest", "f16", "bf16", "f32"), default="nearest",
                   help="for layers no GGUF type holds exactly: requantize or write float")
    g.add_argument("--kquant", default=None, metavar="TYPE",
                   help="re-quantize with llama.cpp to a K-quant type, e.g. Q4_K_M "
                        "(needs llama-cpp-python)")
    p.set_defaults(fn=cmd_export, load=load)
    return p


def _claim_out(args: argparse.Namespace) -> Any:
    """--out, held before the work: only with --force, and only replacing an earlier export of
    the same kind; room for about the source's size (twice with --kquant: a GGUF in between)."""
    from jaxq.models.default import model_bytes

    if args.to == "gguf":
        from jaxq.export.gguf import GGUF_FILE as kind
    else:
        from mlx_backend.export import MLX_DIR as kind
    need = model_bytes(args.model) * (2 if args.kquant else 1)
    return claim_output(args.out, kind, overwrite=args.force, need_bytes=need)


@holds_output(_claim_out)
def cmd_export(args: argparse.Namespace) -> dict:
    """Load ``args.model`` and export it; returns the JSON-able result."""
    from jaxq.core.finite import check_finite
    from jaxq.export.common import ExportWarning

    out = Path(args.out)
    m = args.load(args.model)
    check_finite(m.params, "weight")  # --allow-nonfinite: the CLI's allowing() block
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        result = _export(m, args, out)
    notes = [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]
    result = {"model": m.source, "to": args.to, "out": str(out.absolute()), **result,
              "warnings": notes}
    if not args.json:
        console = Console(stderr=True)
        for note in notes:
            console.print(f"[yellow]warning:[/] {note}")
        console.print(f"exported {m.source} to {out} ({result['bytes'] / 1e6:.1f} MB, "
                      f"{result['seconds']:.1f} s)")
    return result


def _export(m: Any, args: argparse.Namespace, out: Path) -> dict:
    if args.to == "mlx":
        from mlx_backend.export import export_mlx

        r = export_mlx(m.params, m.config, m.tokenizer, out, overwrite=args.force,
                       rope_traditional=args.rope_traditional,
                       max_shard_bytes=args.max_shard_size)
        return {"bytes": r.total_bytes, "files": r.files, "seconds": r.seconds,
                "requantized": r.requantized, "quantization": r.quantization}
    from jaxq.export.gguf import export_gguf, kquant

    name = Path(m.source).stem if m.source != "default" else "SmolLM2-135M-Instruct"
    kw = dict(float_type=args.float_type, fallback=args.fallback, name=f"{name} (jaxq)")
    if args.kquant is None:
        r = export_gguf(m.params, m.config, m.tokenizer, out, overwrite=args.force, **kw)
        seconds = r.seconds
    else:
        with scratch_dir(out) as tmp:
            r = export_gguf(m.params, m.config, m.tokenizer, tmp / "base.gguf", **kw)
            kquant(r.path, out, args.kquant, overwrite=args.force)
        seconds = r.seconds
    return {"bytes": out.stat().st_size, "seconds": seconds,
            "types": dict(sorted(_count(r.types).items())), "requantized": r.requantized,
            "rerounded": r.rerounded, "kquant": args.kquant}


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return counts
