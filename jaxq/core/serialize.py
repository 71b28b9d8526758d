"""Save and load params pytrees with compressed leaves: orbax for arrays, JSON for structure.

A saved directory holds ``arrays/`` (an orbax checkpoint of a flat ``{name: array}`` dict) and
``manifest.json`` (the nested dict/list skeleton, each leaf's kind and static metadata, and any
user metadata such as the recipe and figures). The structure lives in JSON so a directory loads
without the code that made it. Writes go to a temporary sibling that is renamed into place, so an
interrupted save never leaves a half-written directory behind.

A directory written piece by piece (:class:`ShardWriter`, for models larger than memory) holds
its arrays in safetensors shards instead of ``arrays/``, one shard per piece, each listed with
its array names under ``shards`` in the manifest; :func:`load` reads either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core.checks import (
    ModelLoadError,
    check_arrays_present,
    check_file_sizes,
    check_leaves,
    check_manifest,
    check_tree,
    file_sizes,
    one_line,
    orbax_error,
    read_json,
)
from jaxq.core.io import OutputKind, atomic_output, quiet_writer_threads
from jaxq.core.leaf import is_leaf, leaf_class, leaf_name

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
#: What :func:`save` writes; it replaces an existing directory only if that has the manifest.
JAXQ_DIR = OutputKind(name="a jaxq compressed directory", is_dir=True,
                      test=lambda p: (p / MANIFEST).is_file())


def _encode_static(x: Any) -> Any:
    """JSON for a leaf's static field (dtypes and tuples tagged so they come back as such)."""
    if isinstance(x, tuple):
        return {"tuple": [_encode_static(v) for v in x]}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        return {"dtype": jnp.dtype(x).name}
    except TypeError:
        raise TypeError(f"cannot save the static value {x!r} of a compressed leaf") from None


def _decode_static(x: Any) -> Any:
    if isinstance(x, dict):
        (kind, value), = x.items()
        return (tuple(_decode_static(v) for v in value) if kind == "tuple"
                else jnp.dtype(value))
    return x


def _describe(tree: Any, arrays: dict[str, Any]) -> Any:
    if isinstance(tree, _Written):
        return tree.desc
    if is_leaf(tree):
        name = leaf_name(tree)
        if name is None:
            raise TypeError(f"cannot save a {type(tree).__name__}: a run-time form (fused or "
                            "repacked weights: save the params before fuse_siblings/prepare) "
                            "or a leaf class not registered with jaxq.register_leaf")
        return {"leaf": {
            "class": name,
            "children": {k: _describe(v, arrays) for k, v in tree.children().items()},
            "static": {f: _encode_static(getattr(tree, f)) for f in tree.static_fields()}}}
    if isinstance(tree, dict):
        return {"dict": {str(k): _describe(v, arrays) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list" if isinstance(tree, list) else "tuple":
                [_describe(v, arrays) for v in tree]}
    if tree is None:
        return {"none": True}
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, int, float)):
        key = f"a{len(arrays)}"
        arrays[key] = tree
        return {"array": key}
    raise TypeError(f"cannot save a leaf of type {type(tree).__name__}; jaxq saves nested "
                    "dicts/lists of arrays and compressed leaves")


def _rebuild(desc: dict, arrays: Any) -> Any:
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
    if kind == "leaf":
        cls = leaf_class(value["class"])
        children = {k: _rebuild(v, arrays) for k, v in value["children"].items()}
        static = {k: _decode_static(v) for k, v in value["static"].items()}
        return cls(**children, **static)
    if kind == "qarray":  # format version 1
        children = {name: jnp.asarray(arrays[key]) for name, key in value["children"].items()}
        children.setdefault("biases", None)
        return leaf_class(value.get("class", "qarray"))(
            bits=value["bits"], group_size=value["group_size"], size=value["size"],
            axis=value["axis"], dtype=jnp.dtype(value["dtype"]), fmt=value["fmt"],
            **children, **value.get("static", {}))
    raise ValueError(f"unknown entry {kind!r} in manifest")


def save(path: str | os.PathLike, params: Any, metadata: dict | None = None,
         extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Atomically write ``params`` (and JSON-able ``metadata``) to directory ``path``.

    ``extra_files`` (name -> text or bytes, e.g. a tokenizer.json) are written beside them. An
    existing jaxq directory at ``path`` is replaced only once the new one is complete (in one
    step: :func:`jaxq.core.io.atomic_output`); anything else there is refused, never deleted.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    arrays: dict[str, Any] = {}
    manifest = {"format": "jaxq", "version": FORMAT_VERSION,
                "tree": _describe(params, arrays), "metadata": metadata or {}}
    with atomic_output(path, JAXQ_DIR) as tmp:
        with quiet_writer_threads():  # a full disk: one error, not a traceback per thread
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(tmp / "arrays", {k: jnp.asarray(v) for k, v in arrays.items()})
            checkpointer.wait_until_finished()
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        manifest["files"] = file_sizes(tmp)  # checked on load: a truncated file is named
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        if (Path(path) / "arrays").is_dir():
            raise ModelLoadError(f"{manifest_path} is missing: a jaxq compressed directory "
                                 "cannot be loaded without it")
        raise FileNotFoundError(f"{path}: not a jaxq compressed directory (no {MANIFEST})")
    return check_manifest(read_json(manifest_path), manifest_path, FORMAT_VERSION)


def load(path: str | os.PathLike) -> tuple[Any, dict]:
    """Load ``(params, metadata)`` written by :func:`save`; a damaged directory is a
    :class:`ModelLoadError` naming the file, key or array (:mod:`jaxq.core.checks`)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    manifest = read_manifest(path)
    if "files" in manifest:  # directories saved before the file list load unchecked
        check_file_sizes(path, manifest["files"], path / MANIFEST)
    where = check_tree(manifest["tree"], path / MANIFEST)
    if "shards" in manifest:  # written piece by piece (jaxq compress --stream)
        arrays = _ShardArrays(path, manifest["shards"], path / MANIFEST)
    else:
        try:
            arrays = ocp.StandardCheckpointer().restore(path / "arrays")
        except Exception as e:  # orbax/tensorstore raise bare Exceptions spanning pages
            raise orbax_error(e, path, where) from None
    check_arrays_present(where, arrays, path)
    try:
        params = _rebuild(manifest["tree"], arrays)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path / MANIFEST}: damaged tree ({one_line(e)})") from None
    check_leaves(params, path / MANIFEST)
    return params, manifest["metadata"]


class _Numbered(dict):
    """The arrays of one piece, named on from the ``start`` arrays of the pieces before it
    (:func:`_describe` names each array after the count so far)."""

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def __len__(self) -> int:
        return self.start + super().__len__()


class _Written:
    """A piece already in its shard: its manifest entry stands in for it in the tree."""

    def __init__(self, desc: dict):
        self.desc = desc


class _ShardArrays:
    """Arrays by name, read from the shard that holds each, one at a time, when asked for."""

    def __init__(self, path: Path, shards: Any, manifest: Path):
        if not (isinstance(shards, dict) and all(
                isinstance(f, str) and "/" not in f and isinstance(names, list)
                for f, names in shards.items())):
            raise ModelLoadError(f"{manifest}: key 'shards' is not an object of file lists")
        self.path = path
        self.where = {name: f for f, names in shards.items() for name in names}

    def __iter__(self):
        return iter(self.where)

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        file = self.path / self.where[name]
        try:
            with safe_open(str(file), framework="numpy") as fh:
                return fh.get_tensor(name)
        except Exception as e:  # safetensors raises its own errors, and bare ones
            raise ModelLoadError(f"{file}: cannot read array {name} ({one_line(e)})") from None


class ShardWriter:
    """Save a params tree one piece at a time (a decoder block, the embedding, ...): each
    :meth:`put` writes the piece's arrays to a safetensors shard of its own and returns a
    stand-in for it; :meth:`finish` writes the manifest of the tree assembled from stand-ins
    (and small arrays). Memory holds one piece, never the tree: how ``jaxq compress --stream``
    saves a model larger than memory. ``directory`` is the temporary directory of an
    :func:`~jaxq.core.io.atomic_output`; :func:`load` reads the result like any save."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.count = 0
        self.shards: dict[str, list[str]] = {}

    def put(self, piece: Any) -> _Written:
        arrays = _Numbered(self.count)
        desc = _describe(piece, arrays)
        self._write(arrays)
        return _Written(desc)

    def _write(self, arrays: _Numbered) -> None:
        from safetensors.numpy import save_file

        name = f"arrays-{len(self.shards):05d}.safetensors"
        save_file({k: np.asarray(jnp.asarray(v)) for k, v in arrays.items()},
                  str(self.dir / name))
        self.shards[name] = list(arrays)
        self.count = len(arrays)

    def finish(self, tree: Any, metadata: dict | None = None,
               extra_files: dict[str, str | bytes] | None = None) -> None:
        """Write the manifest of ``tree`` (stand-ins from :meth:`put` where pieces go) and
        ``extra_files``; a last shard takes any arrays ``tree`` still holds itself."""
        rest = _Numbered(self.count)
        desc = _describe(tree, rest)
        if dict.__len__(rest):
            self._write(rest)
        for name, content in (extra_files or {}).items():
            target = self.dir / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        (self.dir / MANIFEST).write_text(json.dumps(
            {"format": "jaxq", "version": FORMAT_VERSION, "tree": desc,
             "metadata": metadata or {}, "shards": self.shards,
             "files": file_sizes(self.dir)}, indent=1))  # checked on load, as save's
