"""Calibration's results on disk, a layer at a time, so a killed run resumes.

:func:`jaxq.calibrate` hands every weight it compresses (in collect mode: every weight's
statistics) to ``checkpoint.save(key, leaf)`` and asks ``checkpoint.load(key)`` before
calibrating one. :class:`LayerCheckpoint` buffers the results of one layer (the path up to its
first numeric part: ``model/layers/3``; slice ``i`` of a stacked leaf is layer ``@i``) and
writes them as one :func:`jaxq.core.serialize.save` directory when the next layer's first
weight arrives (and on :meth:`flush`). A layer costs one write, not one per weight (a write
has a fixed cost of about 0.1 s), and a kill loses at most the layer in progress. Each
directory is renamed into place whole, so a kill during a write leaves only a hidden
temporary directory, which is never read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from jaxq.core import serialize

_NUMBERED = re.compile(r"^(\d{5})$")
_LAYER = re.compile(r"^(.*?(?:^|/)\d+)(?:/|$)")


def layer_of(key: str) -> str:
    """The layer a weight belongs to: its path up to the first numeric part, ``@i`` for
    slice ``i`` of a stacked leaf, else the key itself (an embedding, a head)."""
    path, at, index = key.rpartition("@")
    if at and index.isdigit():
        return f"@{index}"
    m = _LAYER.match(key)
    return m.group(1) if m else key


class LayerCheckpoint:
    """A :class:`jaxq.calib.interpreter.Checkpoint` in ``directory``: numbered entries
    ``00000``, ``00001``, ... each holding the compressed weights of one layer by key."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._known: dict[str, Any] | None = None
        self._buffer: dict[str, Any] = {}
        self._layer: str | None = None
        self._next = 0

    def entries(self) -> list[Path]:
        """The complete entries, oldest first (half-written ones are hidden temporaries)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if _NUMBERED.match(p.name) and (p / serialize.MANIFEST).is_file())

    def _read(self) -> dict[str, Any]:
        if self._known is None:
            self._known = {}
            entries = self.entries()
            for p in entries:
                try:
                    leaves, _ = serialize.load(p)
                except Exception as err:  # whatever orbax or the manifest reader raises
                    raise ValueError(f"{p}: unreadable layer checkpoint ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''}); "
                                     f"remove {self.directory} to start afresh") from None
                if not isinstance(leaves, dict):
                    raise ValueError(f"{p}: not a layer checkpoint; remove {self.directory} "
                                     "to start afresh")
                self._known.update(leaves)
            self._next = int(entries[-1].name) + 1 if entries else 0
        return self._known

    def __len__(self) -> int:
        """Weights held on disk."""
        return len(self._read())

    def load(self, key: str) -> Any | None:
        return self._read().get(key)

    def save(self, key: str, leaf: Any) -> None:
        self._read()
        layer = layer_of(key)
        if self._buffer and layer != self._layer:
            self.flush()
        self._layer = layer
        self._buffer[key] = leaf

    def flush(self) -> None:
        """Write the buffered layer now (calibration calls :meth:`save` only)."""
        if not self._buffer:
            return
        known = self._read()
        serialize.save(self.directory / f"{self._next:05d}", self._buffer,
                       {"layer": self._layer})
        known.update(self._buffer)
        self._next += 1
        self._buffer = {}
