"""The work directory that makes ``jaxq compress`` resumable: a sequential calibration writes
each finished layer's compressed weights there (:class:`jaxq.calib.LayerCheckpoint`), and a rerun
reads them back instead of calibrating them again.

The directory is bound to what made it: ``resume.json`` holds digests of the recipe, the model
(every weight's bytes and the config), the calibration (its settings and token windows) and the
software (jaxq's source, the JAX version and backend: other ones may give other bits). A rerun whose
inputs differ in any of them is refused with an error naming which, never mixed with the old
layers: a resumed result is bit-identical to an uninterrupted run or there is none.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxq.core.io import OutputKind, atomic_output

MANIFEST = "resume.json"
#: The work directory of a resumable run: only one of these is ever taken for one.
WORK_DIR = OutputKind(name="a jaxq resume work directory", is_dir=True,
                      test=lambda p: (p / MANIFEST).is_file())
PARTS = ("recipe", "model", "calibration", "software")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, (bytes, memoryview)) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def recipe_digest(recipe: Any) -> str:
    return _digest(json.dumps(recipe.to_dict(), sort_keys=True, default=str))


def model_digest(params: Any, config: Any) -> str:
    """Every weight's path, dtype, shape and bytes, and the config: the model itself, not the
    name or date of the file it came from."""
    from jaxq.core.tree import flatten_with_paths

    h = hashlib.sha256()
    h.update(repr(config).encode())
    for path, leaf in flatten_with_paths(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}|{a.dtype}|{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def key(recipe: Any, params: Any, config: Any, calibration: dict, windows: np.ndarray
        ) -> dict[str, str]:
    """What a work directory is bound to, one digest per part (see the module docstring)."""
    import jax

    w = np.ascontiguousarray(windows)
    return {"recipe_name": recipe.name, "recipe": recipe_digest(recipe),
            "model": model_digest(params, config),
            "calibration": _digest(json.dumps(calibration, sort_keys=True, default=str),
                                   w.dtype, w.shape, w.view(np.uint8).reshape(-1).data),
            "software": f"jaxq code {code_digest()}, jax {jax.__version__}, "
                        f"{jax.default_backend()}"}


def code_digest() -> str:
    """jaxq's own source (every module and shipped recipe): other code may give other bits."""
    root = Path(__file__).parents[1]
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml"))
    parts = [x for p in files for x in (str(p.relative_to(root)), p.read_bytes())]
    return _digest(*parts)[:12]


def read_key(work_dir: str | os.PathLike) -> dict[str, str]:
    """The key of an existing work directory; a ValueError naming it if it is not one."""
    path = Path(work_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{work_dir} is not a jaxq compress work directory (no {MANIFEST}); "
                         "remove it or give another --out") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); remove {work_dir} to start "
                         "afresh") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in PARTS):
        raise ValueError(f"{path}: not a jaxq compress work record; remove {work_dir} to "
                         "start afresh")
    return data


def check_recipe(work_dir: str | os.PathLike, recipe: Any) -> None:
    """Refuse a work directory left by another recipe (before any calibration work)."""
    old = read_key(work_dir)
    if old["recipe"] != recipe_digest(recipe):
        raise ValueError(_mismatch(work_dir, "recipe", old, recipe.name))


def open_work(work_dir: str | os.PathLike, want: dict[str, str]) -> tuple[Any, bool]:
    """``(LayerCheckpoint, created)`` for ``work_dir``: the existing one if its key is ``want``
    (a ValueError naming the part that differs otherwise), else a new one."""
    from jaxq.calib import LayerCheckpoint

    work_dir = Path(work_dir)
    if work_dir.exists():
        old = read_key(work_dir)
        for part in PARTS:
            if old[part] != want[part]:
                raise ValueError(_mismatch(work_dir, part, old, want["recipe_name"],
                                           want["software"]))
        return LayerCheckpoint(work_dir), False
    with atomic_output(work_dir, WORK_DIR, overwrite=False) as tmp:
        (tmp / MANIFEST).write_text(json.dumps(want, indent=1))
    return LayerCheckpoint(work_dir), True


def _mismatch(work_dir: Any, part: str, old: dict, recipe_name: str, software: str = "") -> str:
    run = f"the layers of a {old.get('recipe_name')!r} run"
    why = {"recipe": (f", not of this {recipe_name!r} one" if old.get("recipe_name") != recipe_name
                      else " made before the recipe file changed"),
           "model": " on another model (its weights or config differ)",
           "calibration": " with other calibration data or settings",
           "software": f" made with {old['software']}, not {software}"}[part]
    return f"{work_dir} holds {run}{why}; remove it to start afresh"
