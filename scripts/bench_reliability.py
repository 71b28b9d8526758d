"""The bad-input matrix: run every case (tests marked ``bad_input`` under tests/reliability),
count the outcomes, and write the table of cases into docs/reliability.md and the counts into
BENCHMARKS.md's "reliability" section.

    python scripts/bench_reliability.py          # run the cases, rewrite both files
    python scripts/bench_reliability.py --check  # exit 1 if docs/reliability.md misses a case

A case passes when jaxq answers its bad input with exit status 2 (or one exception in the
Python API), one line naming the file, tensor, layer or key at fault, and nothing changed on
disk (tests/reliability/_probe.py). A failure is counted against "clear error" or against
"nothing lost" by what its assertion reports.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import benchlib

ROOT = benchlib.ROOT
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- begin cases -->", "<!-- end cases -->"


class _Collector:
    """A pytest plugin that keeps each bad_input case's area, docstring and outcome."""

    def __init__(self) -> None:
        self.cases: dict[str, dict] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            if item.get_closest_marker("bad_input") is None:
                continue
            area = re.sub(r"^test_", "", Path(str(item.fspath)).stem)
            doc = " ".join((item.function.__doc__ or item.name).split())
            if "[" in item.name:  # a parametrized case: its id says which input
                doc += f" ({item.name.split('[', 1)[1].rstrip(']')})"
            self.cases[item.nodeid] = {"area": area, "case": doc, "outcome": "not run"}

    def pytest_runtest_logreport(self, report) -> None:
        case = self.cases.get(report.nodeid)
        if case is None or (report.when != "call" and report.passed):
            return
        if report.failed:
            text = str(report.longrepr)
            case["outcome"] = "debris" if "disk changed" in text else "unclear"
        elif report.skipped:
            case["outcome"] = "skipped"
        else:
            case["outcome"] = "ok"


def run_cases(collect_only: bool = False) -> list[dict]:
    import pytest

    plugin = _Collector()
    args = [str(ROOT / "tests" / "reliability"), "-m", "bad_input", "-q", "-p", "no:cacheprovider"]
    if collect_only:
        args.append("--collect-only")
    pytest.main(args, plugins=[plugin])
    return list(plugin.cases.values())


def cases_markdown(cases: list[dict]) -> str:
    by_area = collections.defaultdict(list)
    for c in cases:
        by_area[c["area"]].append(c)
    out = []
    for area in sorted(by_area):
        out.append(f"\n### {area}\n")
        out.append(benchlib.table(["bad input -> what jaxq says"],
                                  [[c["case"].replace("|", "\\|")] for c in by_area[area]]))
    return "\n".join(out).strip()


def counts_table(cases: list[dict]) -> str:
    rows = []
    by_area = collections.defaultdict(list)
    for c in cases:
        by_area[c["area"]].append(c)
    for area in [*sorted(by_area), "all"]:
        cs = cases if area == "all" else by_area[area]
        n = len(cs)
        clear = sum(c["outcome"] in ("ok", "debris") for c in cs)
        kept = sum(c["outcome"] in ("ok", "unclear") for c in cs)
        rows.append([f"**{area}**" if area == "all" else area, n, clear, kept,
                     sum(c["outcome"] == "ok" for c in cs)])
    return benchlib.table(["area", "cases", "one clear line, exit 2", "nothing lost on disk",
                           "both"], rows)


def write_doc(cases: list[dict]) -> None:
    from jaxq.core.io import atomic_write

    text = DOC.read_text()
    block = f"{BEGIN}\n{cases_markdown(cases)}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    atomic_write(DOC, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that docs/reliability.md lists every case")
    args = parser.parse_args()
    if args.check:
        cases = run_cases(collect_only=True)
        missing = [c["case"] for c in cases if c["case"].replace("|", "\\|") not in
                   DOC.read_text()]
        for m in missing:
            print(f"docs/reliability.md misses: {m}", file=sys.stderr)
        return 1 if missing else 0
    cases = run_cases()
    write_doc(cases)
    failing = [c for c in cases if c["outcome"] != "ok"]
    body = ("## Reliability (issue 18): the bad-input matrix\n\n" + benchlib.header() + "\n"
            "Each case is one test under tests/reliability (listed in docs/reliability.md): a "
            "bad input must give exit status 2 (or one exception in the Python API), one line "
            "naming the file, tensor, layer or key at fault, and leave the disk exactly as it "
            "was.\n\n" + counts_table(cases) + "\n")
    if failing:
        body += "\nCases that fail today:\n\n" + "\n".join(
            f"- {c['area']}: {c['case']} ({c['outcome']})" for c in failing) + "\n"
    benchlib.write_section("reliability", body)
    print(counts_table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
