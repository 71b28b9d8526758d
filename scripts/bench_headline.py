"""BENCHMARKS.md's headline: a short summary at the top, generated from the rows the detail
sections below it already hold (nothing is measured here).

    python scripts/bench_headline.py           # rewrite the headline section in place
    python scripts/bench_headline.py --check   # exit 1 if the headline is out of date

It reads the "quality" section's size-quality front (jaxq against mlx-lm and llama.cpp), the
"gptq-time" and "eval-time" sections, and the GPU "kernels" and "kernels-decode" tables. Run it
after any script that rewrites one of those sections.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- begin headline -->", "<!-- end headline -->"


def section(text: str, name: str) -> str:
    m = re.search(rf"<!-- begin {re.escape(name)} -->(.*?)<!-- end {re.escape(name)} -->",
                  text, re.S)
    if not m:
        raise SystemExit(f"BENCHMARKS.md has no '{name}' section")
    return m.group(1)


def table_after(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after ``heading`` (a substring of a line), as dicts."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    header, body = rows[0], [r for r in rows[2:]]
    return [dict(zip(header, r)) for r in body]


def front(text: str) -> list[str]:
    rows = table_after(section(text, "quality"), "### Size-quality front")
    below = sum(r["jaxq at or below"] == "yes" for r in rows)
    out = [f"- **Size-quality front** (SmolLM2-135M, PTB perplexity, whole-model bits per "
           f"weight): jaxq is at or below {below} of {len(rows)} mlx-lm and llama.cpp points. "
           "Against each peer's main recipes:", "",
           "  | peer | bits/w | ppl | jaxq's best at ≤ bits | bits/w | ppl |",
           "  |---|---|---|---|---|---|"]
    keep = ("RTN W4 g64", "RTN W3 g64", "GPTQ W4 g64", "AWQ W4 g64", "Q4_K_M", "Q3_K_M",
            "Q2_K")
    for r in rows:
        if any(k in r["peer"] for k in keep):
            out.append(f"  | {r['peer']} | {r['bits/weight']} | {r['perplexity']} | "
                       f"{r['best jaxq at ≤ bits']} | {r['its bits/weight']} | "
                       f"{r['its perplexity']} |")
    return out


def gptq_time(text: str) -> str:
    rows = table_after(section(text, "gptq-time"), "| run |")
    seq = next(r for r in rows if "true-sequential" in r["run"])
    col = next((c for c in seq if c.startswith("speed vs mlx-lm")), None)
    ref = re.search(r"\((\d+) s\)", col or "")
    versus = (f", {seq[col]} faster than mlx-lm's GPTQ ({ref.group(1)} s)" if col and ref
              else "")
    return (f"- **GPTQ time**: W4 g64 of the whole model on the 128 x 512 calibration tokens, "
            f"true-sequential: {seq['seconds']} s on 2 CPU cores{versus}.")


def eval_time(text: str) -> str:
    body = section(text, "eval-time")
    m = re.search(r"perplexity ([\d.]+); ([\d.]+) s including compilation, ([\d.]+) s warm",
                  body)
    if not m:
        raise SystemExit("eval-time section: no 'perplexity P; S s including compilation'")
    return (f"- **Eval time**: the whole protocol (32 x 512 tokens, float SmolLM2, perplexity "
            f"{m.group(1)}) in {m.group(2)} s on 2 CPU cores, {m.group(3)} s warm.")


def kernels(text: str) -> list[str]:
    body = section(text, "kernels")
    rows = table_after(body, "| K | N | M |")
    big = [r for r in rows if (r["K"], r["N"]) == ("8192", "28672")]
    device = re.search(r"device: ([^;]+);", body)
    pick = {r["M"]: r for r in big}
    parts = []
    for m in ("1", "16", "4096"):
        r = pick.get(m)
        if r:
            parts.append(f"M = {m}: {r['jaxq µs']} µs, {r['jaxq/floor']}x the memory floor, "
                         f"{r['vs bf16']} vs XLA bf16, {r['vs torch']} vs torch int4")
    out = [f"- **Kernels** (int4 g128 matmul, K x N = 8192 x 28672, "
           f"{device.group(1) if device else 'GPU'}): " + "; ".join(parts) + "."]
    dec = table_after(section(text, "kernels-decode"), "| model |")
    for r in dec:
        if "W4" in r["weights"] and "8B" in r["model"]:
            out.append(f"- **Decode** (batch 1, {r['model']}): {r['tokens/s']} tokens/s with W4 "
                       f"weights, {r['speedup vs bf16']} bf16's.")
    return out


def optional_rows(text: str, name: str, heading: str) -> list[dict[str, str]]:
    """The table after ``heading`` in section ``name``; no rows when the section is absent."""
    if f"<!-- begin {name} -->" not in text:
        return []
    return table_after(section(text, name), heading)


def pruning(text: str) -> str:
    rows = table_after(section(text, "prune"), "| runtime |")
    jaxq = {(r["method"], r["pattern"]): r for r in rows if r["runtime"] == "jaxq"}
    parts = []
    for pattern in ("50%", "2:4", "4:8", "70%"):
        best = jaxq.get(("SparseGPT + exact refit", pattern))
        plain = jaxq.get(("SparseGPT", pattern))
        if best is None or plain is None:
            continue
        peer = plain["llm-compressor (issue's figure)"]
        parts.append(f"{pattern} {best['perplexity']} (the paper's update: "
                     f"{plain['perplexity']}" + (f"; llm-compressor {peer}" if peer else "")
                     + ")")
    if not parts:
        return ""
    return ("- **Pruning** (SmolLM2-135M, PTB perplexity, float 56.66, 32 calibration windows): "
            "SparseGPT with the exact refit under its mask at " + ", ".join(parts) + ".")


def training(text: str) -> str:
    """The training rows against their start: QAT/KD on the PTQ model, KD after pruning."""
    parts = [f"{r['row'].split(': ')[0].split(', from')[0]} {r['start ppl']} -> {r['perplexity']} "
             f"({r['gap recovered']} of the gap, {r['bits/weight']} bpw)"
             for r in optional_rows(text, "train", "| row |") if r["gap recovered"] != "-"]
    if not parts:
        return ""
    return ("- **Training** (SmolLM2-135M, PTB perplexity from the start model to the trained "
            "one, float 56.66; the token budgets of 2 CPU cores): " + "; ".join(parts) + ".")


def reliability(text: str) -> str:
    total = next((r for r in optional_rows(text, "reliability", "| area |")
                  if "all" in r["area"]), None)
    if total is None:
        return ""
    return (f"- **Reliability**: {total['cases']} bad inputs (damaged files, non-finite weights, "
            f"recipe errors, interrupted writes and resumes), {total['both']} of them one clear "
            "line with exit status 2 and nothing lost on disk.")


def headline(text: str) -> str:
    lines = ["## Headline", "",
             "Generated by `python scripts/bench_headline.py` from the sections below (their "
             "commands, machines and dates are there).", "",
             *front(text), "", gptq_time(text), eval_time(text), *kernels(text)]
    extra = [x for x in (pruning(text), training(text), reliability(text)) if x]
    return "\n".join(lines + extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the headline is stale")
    args = ap.parse_args()
    text = BENCHMARKS.read_text()
    block = f"{BEGIN}\n{headline(text)}\n{END}"
    if BEGIN in text:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text,
                     flags=re.S)
    else:  # right under the title
        title, _, rest = text.partition("\n")
        new = f"{title}\n\n{block}\n{rest}"
    if args.check:
        return 0 if new == text else 1
    if new != text:
        sys.path.insert(0, str(ROOT))
        from jaxq.core.io import atomic_write

        atomic_write(BENCHMARKS, new)
    print(headline(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
