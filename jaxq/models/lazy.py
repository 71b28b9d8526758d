"""Open a model without loading it: its config, tokenizer and leaf shapes at once, its tensors
one at a time, for models larger than memory (:mod:`jaxq.recipes.stream`).

A tensor is copied out of the file when asked for and nothing else stays: safetensors files
are opened (memory-mapped) for the one read, and GGUF tensor bytes are read with ``pread`` from
the offsets the ``gguf`` reader found. A mapping that outlives its read would keep every page
it touched in the process's resident set, and a streamed model would look as large as its
file. Every tensor equals the one :func:`jaxq.models.load_model` gives (the same casts and the
same GGUF dequantization), and a source that does not match its config fails on opening, with
the loaders' messages, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.models import ModelLoadError
from jaxq.models.llama import LlamaConfig, Params, param_shapes
from jaxq.models.tokenizer import Tokenizer, TokenizerError


@dataclasses.dataclass
class LazyModel:
    """A model on disk. ``shapes`` holds every leaf path of the params pytree
    (``model/layers/3/mlp/up_proj/weight``) with its shape; :meth:`tensor` reads one leaf."""

    config: LlamaConfig
    tokenizer: Tokenizer | None
    source: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], np.ndarray]
    dtype: Any = jnp.float32

    def tensor(self, path: str) -> jax.Array:
        """Leaf ``path``, cast to the model's dtype as the loaders cast it."""
        if path not in self.shapes:
            raise KeyError(f"{self.source}: no tensor {path!r}")
        return jnp.asarray(self.read(path), self.dtype)

    def subtree(self, prefix: str) -> Params:
        """The nested dict of the leaves under ``prefix`` (``model/layers/3``), read now."""
        out: dict[str, Any] = {}
        pre = prefix.rstrip("/") + "/"
        for path in self.shapes:
            if path.startswith(pre):
                node = out
                *keys, last = path[len(pre):].split("/")
                for k in keys:
                    node = node.setdefault(k, {})
                node[last] = self.tensor(path)
        if not out:
            raise KeyError(f"{self.source}: no tensors under {prefix!r}")
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the whole params pytree at the model's dtype."""
        item = jnp.dtype(self.dtype).itemsize
        return sum(int(np.prod(s)) * item for s in self.shapes.values())


def open_model(path: str | Path = "default", *, dtype: Any = jnp.float32) -> LazyModel:
    """Open ``"default"``, a GGUF file or an HF directory (or a file inside one) lazily; the
    same sources :func:`jaxq.models.load_model` reads."""
    from jaxq.models.default import default_model_path

    if str(path) == "default":
        return _open_gguf(default_model_path(), "default", dtype)
    p = Path(path).expanduser()
    if p.is_dir():
        return _open_hf(p, dtype)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return _open_gguf(p, str(p.resolve()), dtype)
    if p.suffix == ".gguf":
        raise ModelLoadError(f"{p}: not a GGUF file (bad magic {magic!r})")
    if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json"):
        return _open_hf(p.parent, dtype)
    raise ModelLoadError(f"{p}: unknown model format (expected .gguf or an HF directory)")


def _check(shapes: dict[str, tuple[int, ...]], cfg: LlamaConfig, what: str) -> None:
    """The loaders' check (:func:`jaxq.models.llama.check_params`) on shapes alone."""
    want = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}
    problems = [f"missing {k}" for k in want if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in want]
    problems += [f"{k} has shape {shapes[k]}, expected {want[k]}"
                 for k in want if k in shapes and shapes[k] != want[k]]
    if problems:
        raise ModelLoadError(f"{what}: {'; '.join(problems[:4])}")


def _open_hf(d: Path, dtype: Any) -> LazyModel:
    from safetensors import SafetensorError, safe_open

    from jaxq.models.hf_loader import _IGNORED_SUFFIXES, _weight_files, config_from_hf

    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{d}: no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from e
    cfg = config_from_hf(hf, cfg_path)
    where: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(d):
        try:
            with safe_open(str(f), framework="numpy") as fh:
                for key in fh.keys():
                    if key.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings
                                                           and key == "lm_head.weight"):
                        continue
                    path = key.replace(".", "/")
                    where[path] = (f, key)
                    shapes[path] = tuple(fh.get_slice(key).get_shape())
        except SafetensorError as e:
            raise ModelLoadError(
                f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    _check(shapes, cfg, f"{d}: weights do not match config.json")

    def read(path: str) -> np.ndarray:
        f, key = where[path]
        try:
            with safe_open(str(f), framework="numpy") as fh:
                return fh.get_tensor(key)
        except SafetensorError as e:
            raise ModelLoadError(f"{f}: tensor {key} is unreadable (truncated?): {e}") from e

    tok_path = d / "tokenizer.json"
    tok = Tokenizer.from_file(tok_path, config=hf) if tok_path.is_file() else None
    return LazyModel(cfg, tok, str(d.resolve()), shapes, read, dtype)


def _open_gguf(p: Path, source: str, dtype: Any) -> LazyModel:
    from jaxq.models.gguf_loader import (
        _dequantize,
        _reader,
        _target,
        config_from_metadata,
        read_metadata,
    )

    reader = _reader(p)
    meta = read_metadata(reader)
    cfg = config_from_metadata(meta, {t.name for t in reader.tensors}, p)
    tensors, shapes = {}, {}
    for t in reader.tensors:
        try:
            layer, keys = _target(t.name, cfg.num_layers)
        except ModelLoadError as e:
            raise ModelLoadError(f"{p}: {e}") from None
        path = "/".join(keys) if layer is None else "/".join(("model/layers", str(layer), *keys))
        tensors[path] = t
        shapes[path] = tuple(int(d) for d in reversed(t.shape.tolist()))
    _check(shapes, cfg, f"{p}: tensors do not match the metadata")

    def read(path: str) -> np.ndarray:
        t = tensors[path]
        fd = os.open(p, os.O_RDONLY)
        try:
            raw = os.pread(fd, t.n_bytes, t.data_offset)
        finally:
            os.close(fd)
        if len(raw) != t.n_bytes:
            raise ModelLoadError(f"{p}: tensor {t.name} is truncated")
        data = np.frombuffer(raw, t.data.dtype).reshape(t.data.shape)
        return _dequantize(t._replace(data=data), p)

    try:
        tok = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
    except TokenizerError as e:
        warnings.warn(f"{p}: {e}; returning no tokenizer", stacklevel=3)
        tok = None
    return LazyModel(cfg, tok, source, shapes, read, dtype)
