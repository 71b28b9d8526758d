"""The package's layering, as a rule: every ``import jaxq.X`` / ``from jaxq.X import`` in jaxq/ and
mlx_backend/ (module-level and function-local alike) must go downwards.

core  <-  calib  <-  quant, prune, lowrank, train, distill (qat may also use quant)
core  <-  kernels
all of the above  <-  models  <-  eval  <-  export  <-  recipes  <-  cli

mlx_backend sits beside export (it may use anything but the CLI), and nothing imports it at
import time: only function-local imports in the CLI and the exporters may reach it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_ALGORITHMS = ("quant", "prune", "lowrank", "train", "distill", "qat")
_TOP = ("models", "eval", "export", "recipes", "cli")

#: layer -> the layers it may import (besides itself), with the reason shown on a crossing.
ALLOWED: dict[str, tuple[frozenset[str], str]] = {
    "core": (frozenset(), "core imports nothing of jaxq above core"),
    "calib": (frozenset({"core"}), "calib imports core only"),
    "kernels": (frozenset({"core"}), "kernels import core only"),
    **{a: (frozenset({"core", "calib"}),
           f"{a} imports core and calib only (not kernels, eval, models or other algorithms)")
       for a in _ALGORITHMS if a not in ("qat", "lowrank")},
    # Both build on quantizers: QAT reuses the formats' coders and starts from PTQ grids; the
    # low-rank correction fits the residual of a quantizer (GPTQ by default).
    "qat": (frozenset({"core", "calib", "quant"}), "qat imports core, calib and quant only"),
    "lowrank": (frozenset({"core", "calib", "quant"}),
                "lowrank imports core, calib and quant only"),
}
_BELOW_TOP = frozenset({"core", "calib", "kernels", *_ALGORITHMS})
for _i, _name in enumerate(_TOP):
    ALLOWED[_name] = (_BELOW_TOP | frozenset(_TOP[:_i]),
                      f"{_name} may import the layers below it ({', '.join(_TOP[:_i]) or '-'} "
                      "and the algorithm layers), not those above")
ALLOWED["jaxq"] = (_BELOW_TOP | frozenset({"models", "eval"}),
                   "the jaxq facade re-exports the library, not the tools on top of it")
ALLOWED["mlx_backend"] = (_BELOW_TOP | frozenset({"models", "eval", "export", "mlx_backend"}),
                          "mlx_backend is an exporter: it may not import the CLI or recipes")
#: the only modules that may import mlx_backend, and then only inside a function
MLX_LAZY_OK = ("jaxq.cli", "jaxq.export")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in ("jaxq", "mlx_backend"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), f))
    return out


def _known(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at import time) for every import of jaxq or mlx_backend."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, not local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:  # `from jaxq import cli` imports the module jaxq.cli
                    sub = f"{base}.{a.name}"
                    found.append((sub if _known(sub) else base, child.lineno, not local))
            visit(child, inner)

    visit(tree, False)
    return [(m, ln, top) for m, ln, top in found
            if m.split(".")[0] in ("jaxq", "mlx_backend")]


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "mlx_backend":
        return "mlx_backend"
    return parts[1] if len(parts) > 1 else "jaxq"


def crossings() -> list[str]:
    bad: list[str] = []
    for module, path in _modules():
        src = _layer(module)
        for target, line, at_import in _imports(module, path):
            dst = _layer(target)
            where = f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
            if dst == "mlx_backend" and src != "mlx_backend":
                if at_import or not module.startswith(MLX_LAZY_OK):
                    bad.append(f"{where}: nothing imports mlx_backend at import time (only "
                               "function-local imports in the CLI and exporters)")
                continue
            if dst == src:
                continue
            allowed, rule = ALLOWED[src]
            if dst not in allowed:
                bad.append(f"{where}: {rule}")
            elif module == "jaxq.export.cli" and target.startswith("jaxq.cli"):
                bad.append(f"{where}: jaxq.cli imports jaxq.export.cli, not the other way round")
    return list(dict.fromkeys(bad))  # one line per crossing, not per imported name


def test_every_layer_is_known():
    unknown = {_layer(m) for m, _ in _modules()} - set(ALLOWED)
    assert not unknown, f"add a layering rule for {sorted(unknown)} in tests/test_layering.py"


def test_no_layer_crossing():
    bad = crossings()
    assert not bad, "layering crossed:\n" + "\n".join(bad)


@pytest.mark.parametrize("src, target, ok", [
    ("jaxq.core.tree", "jaxq.quant.rtn", False),
    ("jaxq.quant.rtn", "jaxq.kernels.nf4", False),
    ("jaxq.quant.rtn", "jaxq.calib.trace", True),
    ("jaxq.cli", "jaxq.recipes", True),
    ("jaxq.recipes", "jaxq.cli", False),
])
def test_rule_table(src, target, ok):
    """The table itself: a downward import passes, an upward one is caught."""
    allowed, _ = ALLOWED[_layer(src)]
    assert (_layer(target) in allowed or _layer(target) == _layer(src)) is ok


def test_checker_sees_function_local_and_relative_imports(tmp_path):
    f = tmp_path / "jaxq" / "core" / "x.py"
    f.parent.mkdir(parents=True)
    (f.parent / "__init__.py").write_text("")
    (tmp_path / "jaxq" / "__init__.py").write_text("")
    (tmp_path / "jaxq" / "quant").mkdir()
    (tmp_path / "jaxq" / "quant" / "__init__.py").write_text("")
    f.write_text("def g():\n    from ..quant import rtn\n    import mlx_backend.load\n")
    globals()["ROOT"] = tmp_path
    try:
        found = _imports("jaxq.core.x", f)
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]
    assert ("jaxq.quant", 2, False) in found and ("mlx_backend.load", 3, False) in found
