"""The bad-input matrix's harness: every case is a test marked ``bad_input`` whose one-line
docstring says what is wrong and what jaxq answers; ``scripts/bench_reliability.py`` counts
them and writes the table in docs/reliability.md.

A case feeds jaxq one bad input (CLI arguments run in-process through ``jaxq.cli.main``, or a
callable for the Python API) and checks three things: exit status 2 (or one exception), one
line of error that names the file, tensor, layer or key at fault, and nothing left on disk
that was not there before (``watch``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from _tinyllama import tiny_llama


def snapshot(*dirs: str | os.PathLike) -> dict[str, tuple[int, float]]:
    """Every path under ``dirs`` (hidden ones included) with its size and mtime; a directory's
    mtime is left out (it changes when an entry comes and goes, e.g. the lock jaxq holds on an
    output while it runs: what is left is compared entry by entry)."""
    out: dict[str, tuple[int, float]] = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            continue
        for p in [d, *d.rglob("*")]:
            st = p.lstat()
            is_dir = p.is_dir() and not p.is_symlink()
            out[str(p)] = (st.st_size if p.is_file() else 0, 0.0 if is_dir else st.st_mtime)
    return out


def expect_clear_error(run: Sequence[str] | Callable[[], object], *names: str,
                       watch: Iterable[str | os.PathLike] = (), capsys=None,
                       errors: tuple[type[BaseException], ...] = (ValueError, TypeError,
                                                                   OSError)) -> str:
    """Run one bad input and return its error line.

    ``run``: CLI arguments (``jaxq.cli.main(run)`` must return 2 and print exactly one line on
    stderr, ``jaxq: error: ...``; pass pytest's ``capsys``) or a callable that must raise one
    of ``errors``. Each of ``names`` must appear in the message; every path under ``watch``
    must be exactly as it was (no debris, nothing deleted or rewritten).
    """
    before = snapshot(*watch)
    if callable(run):
        with pytest.raises(errors) as info:
            run()
        line = str(info.value)
        assert "\n" not in line.strip(), f"a multi-line error: {line!r}"
    else:
        from jaxq.cli import main

        assert capsys is not None, "CLI cases need capsys"
        capsys.readouterr()
        code = main(list(run))
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("jaxq: error:")]
        assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
        assert len(lines) == 1, f"expected one error line, got: {err[-2000:]}"
        line = lines[0]
        assert "Traceback" not in err, err[-2000:]
    for name in names:
        assert name.lower() in line.lower(), f"{name!r} not named in: {line}"
    after = snapshot(*watch)
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert after == before, (f"disk changed: added {sorted(set(after) - set(before))}, "
                             f"removed {sorted(set(before) - set(after))}, changed {changed}")
    return line


@functools.cache
def _tiny_gguf_bytes(seed: int) -> bytes:
    import sys
    import tempfile
    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    from _exportkit import export_llama, tiny_tokenizer

    from jaxq.export.gguf import export_gguf

    cfg, params = export_llama(seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tiny.gguf"
        export_gguf(params, cfg, tiny_tokenizer(), path, float_type="f32")
        return path.read_bytes()


def tiny_gguf(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny float Llama (128 wide, 2 blocks, trained BPE) as a GGUF file: a source model any
    CLI command loads in well under a second."""
    path = Path(path)
    path.write_bytes(_tiny_gguf_bytes(seed))
    return path


__all__ = ["expect_clear_error", "snapshot", "tiny_gguf", "tiny_llama"]
