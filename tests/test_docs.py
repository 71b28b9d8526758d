"""The Python examples in the README and docs/ run as written (each file's blocks in order, in
one namespace, as a reader would paste them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path))
    namespace: dict = {}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(block, f"{page.name}, python block {i + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", [*PAGES, ROOT / "BENCHMARKS.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_refer_to_nothing_outside_the_repository(page):
    """The product stands on its own: no `../` paths, and every `docs/...`/`scripts/...` file
    a page names in backquotes exists."""
    text = page.read_text()
    assert "../" not in text, f"{page.name} refers outside the repository"
    for name in re.findall(r"`((?:docs|scripts|jaxq|tests)/[\w./-]+\.(?:md|py|yaml))`", text):
        assert (ROOT / name).is_file(), f"{page.name} names {name}, which does not exist"


def test_benchmarks_headline_is_current():
    """BENCHMARKS.md's headline is what scripts/bench_headline.py makes of the sections below
    it (rerun the script after a benchmark rewrites one)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_headline.py"),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 0, "run: python scripts/bench_headline.py\n" + done.stderr


def test_reliability_doc_lists_every_bad_input_case():
    """docs/reliability.md's matrix holds every ``bad_input`` test's docstring (rerun
    scripts/bench_reliability.py after adding a case)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_reliability.py"),
                           "--check"], capture_output=True, text=True, cwd=ROOT / "scripts")
    assert done.returncode == 0, "run: python scripts/bench_reliability.py\n" + done.stderr
