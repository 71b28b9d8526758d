"""Save and load params pytrees with compressed leaves: orbax for arrays, JSON for structure.

A saved directory holds ``arrays/`` (an orbax checkpoint of a flat ``{name: array}`` dict) and
``manifest.json`` (the nested dict/list skeleton, each leaf's kind and static metadata, and any
user metadata such as the recipe and figures). The structure lives in JSON so a directory loads
without the code that made it. Writes go to a temporary sibling that is renamed into place, so an
interrupted save never leaves a half-written directory behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core.qarray import QArray
from jaxq.core.tree import is_leaf

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: QArray subclasses a manifest can name (``"class"``), beside QArray itself.
_QARRAY_CLASSES: dict[str, type[QArray]] = {"qarray": QArray}


def register_qarray_class(name: str, cls: type[QArray]) -> type[QArray]:
    """Let :func:`save` write leaves of the QArray subclass ``cls`` (a dataclass whose extra
    fields are arrays in ``cls._CHILDREN`` or JSON-able statics) and :func:`load` rebuild them.
    Without it, saving such a leaf is an error: as a plain QArray it would lose what makes it
    a subclass (a W8A8 weight would run weight-only)."""
    _QARRAY_CLASSES[name] = cls
    return cls


def _qarray_class_name(leaf: QArray) -> str:
    for name, cls in _QARRAY_CLASSES.items():
        if type(leaf) is cls:
            return name
    raise TypeError(f"cannot save a {type(leaf).__name__}: a QArray subclass not registered "
                    "with jaxq.core.serialize.register_qarray_class")


def _describe(tree: Any, arrays: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        return {"dict": {str(k): _describe(v, arrays) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list" if isinstance(tree, list) else "tuple":
                [_describe(v, arrays) for v in tree]}
    if tree is None:
        return {"none": True}
    if isinstance(tree, QArray):
        cls_name = _qarray_class_name(tree)
        children = {}
        for name in type(tree)._CHILDREN:
            value = getattr(tree, name)
            if value is not None:
                key = f"a{len(arrays)}"
                arrays[key] = value
                children[name] = key
        desc = {"children": children, "bits": tree.bits, "group_size": tree.group_size,
                "size": tree.size, "axis": tree.axis, "dtype": jnp.dtype(tree.dtype).name,
                "fmt": tree.fmt}
        if cls_name != "qarray":
            known = {f.name for f in dataclasses.fields(QArray)} | set(type(tree)._CHILDREN)
            desc["class"] = cls_name
            desc["static"] = {f.name: getattr(tree, f.name)
                              for f in dataclasses.fields(tree) if f.name not in known}
        return {"qarray": desc}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, int, float)):
        key = f"a{len(arrays)}"
        arrays[key] = tree
        return {"array": key}
    if is_leaf(tree):  # FusedSlice, kernel-layout weights
        raise TypeError(f"cannot save a {type(tree).__name__}: fused and repacked weights are "
                        "a run-time form; save the params before fuse_siblings/prepare")
    raise TypeError(f"cannot save a leaf of type {type(tree).__name__}; jaxq saves nested "
                    "dicts/lists of arrays and QArrays")


def _rebuild(desc: dict, arrays: dict[str, Any]) -> Any:
    (kind, value), = desc.items()
    if kind == "dict":
        return {k: _rebuild(v, arrays) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [_rebuild(v, arrays) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "none":
        return None
    if kind == "array":
        return jnp.asarray(arrays[value])
    if kind == "qarray":
        children = {name: jnp.asarray(arrays[key]) for name, key in value["children"].items()}
        cls_name = value.get("class", "qarray")
        if cls_name not in _QARRAY_CLASSES:
            raise ValueError(f"manifest names an unknown QArray class {cls_name!r} "
                             f"(known: {sorted(_QARRAY_CLASSES)})")
        children.setdefault("biases", None)
        return _QARRAY_CLASSES[cls_name](
            bits=value["bits"], group_size=value["group_size"], size=value["size"],
            axis=value["axis"], dtype=jnp.dtype(value["dtype"]), fmt=value["fmt"],
            **children, **value.get("static", {}))
    raise ValueError(f"unknown entry {kind!r} in manifest")


def save(path: str | os.PathLike, params: Any, metadata: dict | None = None,
         extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Atomically write ``params`` (and JSON-able ``metadata``) to directory ``path``.

    ``extra_files`` (name -> text or bytes, e.g. a tokenizer.json) are written beside them. An
    existing directory at ``path`` is replaced only once the new one is complete.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}
    manifest = {"format": "jaxq", "version": FORMAT_VERSION,
                "tree": _describe(params, arrays), "metadata": metadata or {}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "arrays", {k: jnp.asarray(v) for k, v in arrays.items()})
        checkpointer.wait_until_finished()
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: not a jaxq compressed directory (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "jaxq":
        raise ValueError(f"{manifest_path}: not a jaxq manifest")
    return manifest


def load(path: str | os.PathLike) -> tuple[Any, dict]:
    """Load ``(params, metadata)`` written by :func:`save`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    manifest = read_manifest(path)
    arrays = ocp.StandardCheckpointer().restore(path / "arrays")
    return _rebuild(manifest["tree"], arrays), manifest["metadata"]
