"""Real model files for the damaged-input tests and the fuzzer, all written by jaxq itself from
the tiny GGUF of :func:`_probe.tiny_gguf`: an HF directory and a 4-bit mlx-lm directory
(``jaxq export``) and a jaxq directory (``jaxq compress --no-eval``, recipe w4-g64)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from pathlib import Path

from _probe import tiny_gguf

RECIPE = Path(__file__).parents[2] / "jaxq" / "recipes" / "w4-g64.yaml"


@functools.cache
def sources() -> dict[str, Path]:
    """``{"gguf": file, "hf": dir, "mlx": dir, "jaxq": dir}``, made once per test session (in a
    temporary directory removed at exit); tests copy them, never change them."""
    root = Path(tempfile.mkdtemp(prefix="jaxq-sources-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_sources(root)


def make_sources(root: Path) -> dict[str, Path]:
    """``{"gguf": file, "hf": dir, "mlx": dir, "jaxq": dir}`` under ``root``."""
    from jaxq.cli import main

    src = tiny_gguf(root / "tiny.gguf")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", str(src), "--to", "mlx", "--out", str(root / "hf")]) == 0
        assert main(["compress", str(src), "--recipe", str(RECIPE), "--out", str(root / "q"),
                     "--no-eval"]) == 0
        assert main(["export", str(root / "q"), "--to", "mlx", "--out", str(root / "mlx")]) == 0
    return {"gguf": src, "hf": root / "hf", "jaxq": root / "q", "mlx": root / "mlx"}


def copy(src: Path, dst_dir: Path) -> Path:
    """A copy of the file or directory ``src`` inside ``dst_dir``."""
    dst = dst_dir / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst
