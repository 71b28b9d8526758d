"""Checks on what jaxq reads from disk, so a damaged file is one clear line, not a traceback.

Every loader (GGUF, HF and mlx-lm directories, jaxq's own saved directories, tokenizers)
validates the parts of a file that say where and what the data is (headers, offsets, shapes,
manifests) before trusting them, and reports a problem as a :class:`ModelLoadError` whose one
line names the file and the tensor or key at fault. Flips inside tensor data cannot be told
from real weights here; everything that locates or types the data can.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxq.core.leaf import is_leaf, leaf_class
from jaxq.core.tree import flatten_with_paths


class ModelLoadError(ValueError):
    """A model file or directory is missing, truncated, corrupt, or of an unsupported kind."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """The first meaningful line of a third-party error message (some span pages)."""
    lines = [ln.strip() for ln in str(err).splitlines()
             if ln.strip() and not ln.startswith(("Traceback", "  File "))]
    text = lines[0] if lines else type(err).__name__ if isinstance(err, BaseException) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def read_json(path: str | os.PathLike, *, kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (an object by default)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON (not UTF-8 at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                             f"{e.colno}; truncated or corrupt?)") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, kind):
        raise ModelLoadError(f"{path}: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                             f"found {_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def require(obj: dict, where: str, key: str, kind: type | tuple[type, ...], *,
            optional: bool = False) -> Any:
    """``obj[key]`` checked to be a ``kind`` (ints are never bools); ``None`` if optional and
    absent. ``where`` names the file (and section) for the error."""
    if key not in obj:
        if optional:
            return None
        raise ModelLoadError(f"{where}: key {key!r} is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise ModelLoadError(f"{where}: key {key!r} is {value!r:.60}, expected a {names}")
    return value


# --- safetensors ---------------------------------------------------------------------------

#: safetensors dtype names -> bits per element.
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header: ``{tensor: (dtype, shape)}``.

    The header must be a JSON object of tensors with a known dtype, a shape of non-negative
    ints and data offsets inside the file whose length is exactly shape x dtype; the tensors
    must not overlap and must cover the data region (as every writer lays them out).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = fh.read(n) if n is not None and n <= min(size - 8, _MAX_HEADER) else None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e.strerror or e})") from None
    if n is None:
        raise ModelLoadError(f"{path}: not a safetensors file ({size} bytes; truncated or "
                             "corrupt?)")
    if raw is None:
        raise ModelLoadError(f"{path}: header length {n} does not fit the file ({size} bytes; "
                             "truncated or corrupt?)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({one_line(e)})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelLoadError(f"{path}: corrupt safetensors header (__metadata__ is not "
                                     "a map of strings)")
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ModelLoadError(f"{where}: its header entry is not an object")
        dtype = require(info, where, "dtype", str)
        shape = require(info, where, "shape", list)
        offsets = require(info, where, "data_offsets", list)
        if dtype not in SAFETENSORS_BITS:
            raise ModelLoadError(f"{where}: unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelLoadError(f"{where}: bad shape {shape}")
        if (len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                         for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{where}: bad data_offsets {offsets}")
        begin, end = offsets
        if end > data_size:
            raise ModelLoadError(f"{where}: data [{begin}, {end}) runs past the end of the file "
                                 f"({data_size} data bytes; truncated or corrupt?)")
        bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
        if bits % 8 or end - begin != bits // 8:
            raise ModelLoadError(f"{where}: {dtype} {tuple(shape)} needs {bits / 8:g} bytes, "
                                 f"its data_offsets hold {end - begin}")
        out[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    _check_tiling(spans, data_size, str(path))
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"tensor {k!r} appears twice")
        out[k] = v
    return out


def _check_tiling(spans: list[tuple[int, int, str]], data_size: int, path: str) -> None:
    """Tensors must not overlap and must cover ``[0, data_size)``."""
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise ModelLoadError(f"{path}: tensor {name!r} overlaps tensor {prev!r} "
                                 f"(data offsets damaged?)")
        if begin > pos:
            raise ModelLoadError(f"{path}: {begin - pos} unused bytes before tensor {name!r} "
                                 f"(data offsets damaged?)")
        pos, prev = end, name
    if pos != data_size:
        raise ModelLoadError(f"{path}: {data_size - pos} bytes after the last tensor "
                             f"{prev!r} (data offsets damaged?)")


# --- files named by a manifest ----------------------------------------------------------------

def file_sizes(root: str | os.PathLike, *, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root`` (what a manifest records)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def check_file_sizes(root: str | os.PathLike, files: Any, manifest: str | os.PathLike) -> None:
    """Every file ``files`` (``{relative path: size}``, from ``manifest``) names is under
    ``root`` with that size."""
    root = Path(root)
    if not isinstance(files, dict):
        raise ModelLoadError(f"{manifest}: key 'files' is not an object")
    for rel, size in files.items():
        if not isinstance(size, int) or isinstance(size, bool) or ".." in Path(rel).parts:
            raise ModelLoadError(f"{manifest}: bad entry for file {rel!r}")
        p = root / rel
        if not p.is_file():
            raise ModelLoadError(f"{root}: file {rel} is missing (the manifest lists it)")
        if p.stat().st_size != size:
            raise ModelLoadError(f"{p}: {p.stat().st_size} bytes, the manifest says {size} "
                                 "(truncated or overwritten?)")


# --- jaxq saved directories ------------------------------------------------------------------

def check_manifest(manifest: dict, path: Path, version_max: int) -> dict:
    """A saved directory's parsed manifest.json, checked to have what loading needs."""
    if manifest.get("format") != "jaxq":
        raise ModelLoadError(f"{path}: not a jaxq manifest (format "
                             f"{manifest.get('format')!r:.40})")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= version_max:
        raise ModelLoadError(f"{path}: unknown format version {version!r:.40}")
    for key in ("tree", "metadata"):
        if not isinstance(manifest.get(key), dict):
            raise ModelLoadError(f"{path}: key {key!r} is missing or not an object")
    return manifest


_KINDS = ("dict", "list", "tuple", "none", "array", "leaf", "qarray")


def check_tree(desc: Any, manifest: Path, at: str = "") -> dict[str, str]:
    """Validate a manifest's tree; ``{array key: tree path}`` of the arrays it names."""
    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{manifest}: damaged tree at {at or '/'} ({what})")

    if not isinstance(desc, dict) or len(desc) != 1:
        raise bad("an entry is not a one-key object")
    (kind, value), = desc.items()
    if kind not in _KINDS:
        raise bad(f"unknown entry {kind!r:.40}")
    out: dict[str, str] = {}
    if kind == "dict":
        if not isinstance(value, dict):
            raise bad("a dict entry is not an object")
        for k, v in value.items():
            out.update(check_tree(v, manifest, f"{at}/{k}"))
    elif kind in ("list", "tuple"):
        if not isinstance(value, list):
            raise bad(f"a {kind} entry is not an array")
        for i, v in enumerate(value):
            out.update(check_tree(v, manifest, f"{at}/{i}"))
    elif kind == "array":
        if not isinstance(value, str) or not re.fullmatch(r"a\d+", value):
            raise bad(f"bad array key {value!r:.40}")
        out[value] = at
    elif kind == "leaf":
        if not isinstance(value, dict) or not isinstance(value.get("class"), str):
            raise bad("a leaf entry lacks its class")
        try:
            cls = leaf_class(value["class"])
        except ValueError:
            raise bad(f"unknown leaf class {value['class']!r:.40}") from None
        children, static = value.get("children"), value.get("static")
        if not isinstance(children, dict) or not isinstance(static, dict):
            raise bad(f"a {value['class']} leaf lacks its children or static fields")
        if set(children) != set(cls._CHILDREN) or set(static) != set(cls.static_fields()):
            raise bad(f"the fields of a {value['class']} leaf are wrong")
        for k, v in children.items():
            out.update(check_tree(v, manifest, f"{at}/{k}"))
    elif kind == "qarray":  # format version 1
        if not isinstance(value, dict) or not isinstance(value.get("children"), dict):
            raise bad("a qarray entry lacks its children")
        out.update({k: f"{at}/{n}" for n, k in value["children"].items()})
    return out


def orbax_error(err: BaseException, path: Path, where: dict[str, str]) -> ModelLoadError:
    """One line for orbax's (multi-page) restore error: the directory and, when the error
    names it, the array and its tree path."""
    key = re.search(r"'path': '(a\d+)/'", str(err))
    array = f"array {key[1]} ({where.get(key[1], '?')})" if key else "its arrays"
    return ModelLoadError(f"{path}: cannot read {array}: truncated or corrupt orbax data "
                          f"({one_line(err).split(' See full')[0]})")


def check_arrays_present(where: dict[str, str], arrays: dict, path: Path) -> None:
    """Every array the manifest names was restored."""
    missing = sorted(set(where) - set(arrays), key=lambda k: int(k[1:]))
    if missing:
        raise ModelLoadError(f"{path}: array {missing[0]} ({where[missing[0]]}) is missing "
                             "from arrays/")


def check_leaves(params: Any, where: str | os.PathLike) -> None:
    """Every compressed leaf's children must make its logical tensor: its dense form is
    evaluated abstractly (shapes only, no compute; once per distinct leaf signature) and must
    have the leaf's shape."""
    seen: dict[Any, str | None] = {}
    for name, leaf in flatten_with_paths(params)[0]:
        if not is_leaf(leaf):
            continue
        children, aux = jax.tree_util.tree_flatten(leaf)
        key = (aux, tuple((np.shape(c), str(getattr(c, "dtype", type(c)))) for c in children))
        if key not in seen:
            seen[key] = _leaf_problem(leaf)
        if seen[key] is not None:
            raise ModelLoadError(f"{where}: leaf {name} is inconsistent ({seen[key]})")


def _leaf_problem(leaf: Any) -> str | None:
    try:
        out = jax.eval_shape(lambda x: x.materialize(), leaf)
    except Exception as e:  # any inconsistency between a leaf's fields and its arrays
        return one_line(e, 160)
    if tuple(out.shape) != tuple(leaf.shape):
        return f"its data makes {tuple(out.shape)}, it says {tuple(leaf.shape)}"
    return None
