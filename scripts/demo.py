"""The demo behind ./scripts/demo (see its header)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(os.environ.get("DEMO_OUT", "out/demo"))
RECIPES = os.environ.get("DEMO_RECIPES", "w4-g64 w8-channel").split()
#: a calibrated method beside RTN: AWQ (scales folded into the norms) then GPTQ, W4 g64, on the
#: first DEMO_CALIB_WINDOWS PTB-train windows (the shipped recipe takes 128; 8 keeps the demo
#: to a few minutes on 2 cores)
CALIBRATED = os.environ.get("DEMO_CALIBRATED", "awq-gptq-w4-g64")
CALIB_WINDOWS = int(os.environ.get("DEMO_CALIB_WINDOWS", "8"))
PROMPT = os.environ.get("DEMO_PROMPT", "The capital of France is")


def jaxq(*args: str) -> dict:
    cmd = [sys.executable, "-m", "jaxq.cli", *args, "--json"]
    print("$ jaxq " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(done.returncode)
    return json.loads(done.stdout)


def plot(points: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.axhline(base["perplexity"], color="grey", ls="--", lw=1,
               label=f"float ({base['bits_per_weight']:.0f} bits/weight)")
    for p in points:
        ax.scatter(p["bits_per_weight"], p["perplexity"], zorder=3)
        ax.annotate(p["recipe"], (p["bits_per_weight"], p["perplexity"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("bits per weight (whole model, eval protocol)")
    ax.set_ylabel("PTB test perplexity (32 x 512 tokens)")
    ax.set_title("SmolLM2-135M-Instruct: size against quality (jaxq)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def calibrated_recipe() -> Path:
    """The shipped calibrated recipe with ``CALIB_WINDOWS`` calibration windows, as a YAML file
    that ``jaxq compress --recipe`` takes."""
    import yaml

    from jaxq.recipes import load_recipe

    spec = load_recipe(CALIBRATED).to_dict()
    spec["name"] = f"{CALIBRATED} ({CALIB_WINDOWS} windows)"
    spec["calibration"] = {**spec["calibration"], "windows": CALIB_WINDOWS}
    path = OUT / f"{CALIBRATED}-{CALIB_WINDOWS}w.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    OUT.mkdir(parents=True, exist_ok=True)
    base = jaxq("eval", "default")
    rows = [jaxq("compress", "default", "--recipe", r, "--out", str(OUT / r)) for r in RECIPES]
    cal = calibrated_recipe()
    rows.append(jaxq("compress", "default", "--recipe", str(cal), "--out", str(OUT / cal.stem)))
    table = Table("recipe", "size MB", "bits/weight", "linear bits/w", "perplexity", "vs float",
                  "quantize s", title="SmolLM2-135M-Instruct on PTB (jaxq demo)")
    table.add_row("float (GGUF dequantized)", f"{base['size_mb']:.1f}",
                  f"{base['bits_per_weight']:.2f}", f"{base['linear_bits_per_weight']:.2f}",
                  f"{base['perplexity']:.3f}", "", "")
    for r in rows:
        table.add_row(r["recipe"], f"{r['size_mb']:.1f}", f"{r['bits_per_weight']:.3f}",
                      f"{r['linear_bits_per_weight']:.3f}", f"{r['perplexity']:.3f}",
                      f"{r['delta_perplexity']:+.3f}", f"{r['quantize_seconds']:.1f}")
    console = Console(width=120)
    console.print(table)
    plot(rows, base, OUT / "size_vs_perplexity.png")
    console.print(f"plot: {OUT / 'size_vs_perplexity.png'}")
    gen = jaxq("generate", str(OUT / cal.stem), "--prompt", PROMPT, "--max-tokens", "24")
    console.print(f"[bold]{rows[-1]['recipe']}[/] completes {PROMPT!r}: {gen['completion']!r}")


if __name__ == "__main__":
    main()
