"""Shared by scripts/bench_*.py: timing and writing tables into BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def median_time(fn, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {cpu}, {platform.system()}"


def header(command: str | None = None, device: str | None = None) -> str:
    command = command or "python " + " ".join([Path(sys.argv[0]).name and
                                                os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return (f"Command: `{command}`  \nMachine: {device or machine()}  \n"
            f"Date: {datetime.date.today().isoformat()}\n")


def write_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section ``name`` in BENCHMARKS.md, between HTML markers."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# jaxq benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    from jaxq.core.io import atomic_write

    atomic_write(path, text)


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


@functools.cache
def default_model():
    """The bundled SmolLM2 ``(params, config, tokenizer)``, loaded once per process."""
    from jaxq.models.default import load_default

    return load_default()


@functools.cache
def protocol_eval_windows():
    """The eval protocol's 32 PTB-test windows of 512 tokens for the bundled model."""
    from jaxq.eval.data import eval_windows

    return eval_windows(default_model()[2], n=32)
