"""Atomic output: one way every jaxq writer (save, the exporters, the caches, the benchmarks)
puts a file or directory in place.

Everything is written to a temporary sibling of the target and renamed over it only once
complete, so a crash, a full disk or a concurrent reader never sees half a file; a failed write
leaves the old target (or nothing) behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, is_dir: bool = False,
                  overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (an empty directory with ``is_dir``, else an empty
    file) and rename it into place when the block succeeds; on any error remove it instead.

    An existing ``path`` is replaced (moved aside, then removed after the rename) unless
    ``overwrite`` is False, when it is a :class:`FileExistsError`.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():  # a directory cannot be replaced by one rename
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write ``content`` (text or bytes) to the file ``path`` atomically."""
    with atomic_output(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> Path:
    """``json.dump`` ``data`` to ``path`` atomically (``dump_kwargs``: indent, sort_keys, ...)."""
    return atomic_write(path, json.dumps(data, **dump_kwargs))


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
