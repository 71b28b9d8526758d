"""Import an mlx-lm directory (quantized or not) into jaxq: params with QArray leaves.

The inverse of :mod:`mlx_backend.export`, and the way into jaxq for models quantized by mlx-lm
itself (``mlx_lm.convert -q``), so they can be evaluated, re-compressed or converted to GGUF.
Reading needs no mlx: tensors come from ``safetensors.numpy``. A module with ``.scales`` becomes
a :class:`QArray` holding exactly the stored words, scales and biases; its quantization comes
from the config's per-module entry, else is inferred from the shapes as mlx-lm does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.core.qarray import QArray
from jaxq.export.common import unflatten
from jaxq.models import ModelLoadError
from jaxq.models.hf_loader import config_from_hf
from jaxq.models.llama import LlamaConfig, Params, param_shapes
from jaxq.models.tokenizer import Tokenizer

#: mlx modes whose scales are uint8 exponents / E4M3 bytes: (bits, group size) -> mode.
_MX_BY_SHAPE = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
_DROP = ("rotary_emb.inv_freq",)


def _weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("model*.safetensors"))


def _tensor_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            names.extend(fh.keys())
    return names


def is_mlx_dir(path: str | Path) -> bool:
    """A directory written by mlx-lm (or jaxq's MLX export) that the HF loader would misread.

    True when config.json has a ``quantization`` block or ``rope_traditional: true``, or a
    weight file holds ``.scales`` tensors. A plain float mlx-lm directory is an HF directory.
    """
    d = Path(path)
    cfg_file = d / "config.json"
    if not d.is_dir() or not cfg_file.is_file() or not _weight_files(d):
        return False
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError:
        return False
    if cfg.get("quantization") or cfg.get("rope_traditional"):
        return True
    try:
        return any(n.endswith(".scales") for n in _tensor_names(_weight_files(d)))
    except Exception:  # unreadable weights: let the HF loader report it
        return False


def _read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from e
    return tensors


def _module_spec(module: str, quant: dict[str, Any], tensors: dict[str, np.ndarray],
                 in_dims: int) -> dict[str, Any]:
    """Quantization of one module: its config entry, else inferred as mlx-lm infers it."""
    entry = quant.get(module)
    scales = tensors[f"{module}.scales"]
    weight = tensors[f"{module}.weight"]
    group_size = in_dims // scales.shape[-1]
    bits = weight.shape[-1] * 32 // in_dims
    if isinstance(entry, dict):
        spec = {"mode": "affine", **entry}
    elif scales.dtype != np.uint8:
        spec = {"group_size": group_size, "bits": bits, "mode": "affine"}
    elif (bits, group_size) in _MX_BY_SHAPE:
        spec = {"group_size": group_size, "bits": bits, "mode": _MX_BY_SHAPE[bits, group_size]}
    else:
        raise ModelLoadError(f"{module}: cannot infer its quantization ({bits} bits, "
                             f"group {group_size}, uint8 scales)")
    if (spec["group_size"], spec["bits"]) != (group_size, bits):
        raise ModelLoadError(f"{module}: config says {spec}, but the tensors hold {bits}-bit "
                             f"codes in groups of {group_size}")
    return spec


def _qarray(module: str, spec: dict[str, Any], tensors: dict[str, np.ndarray], in_dims: int,
            dtype: Any) -> QArray:
    if spec["mode"] != "affine":
        import jaxq.quant.float_formats  # noqa: F401  (registers the mx decoders)
    biases = tensors.get(f"{module}.biases")
    if spec["mode"] == "nvfp4" and f"{module}.global_scale" in tensors:
        biases = tensors[f"{module}.global_scale"].astype(np.float32).reshape(1, 1)
    return QArray(packed=jnp.asarray(tensors[f"{module}.weight"], jnp.uint32),
                  scales=jnp.asarray(tensors[f"{module}.scales"]),
                  biases=None if biases is None else jnp.asarray(biases),
                  bits=int(spec["bits"]), group_size=int(spec["group_size"]), size=in_dims,
                  axis=-1, dtype=jnp.dtype(dtype), fmt=spec["mode"])


def load_mlx_dir(path: str | Path, *, dtype: Any = jnp.float32
                 ) -> tuple[Params, LlamaConfig, Tokenizer | None]:
    """``(params, config, tokenizer)`` of an mlx-lm llama directory; quantized modules as QArrays.

    Float tensors are cast to ``dtype``; QArrays keep their stored words, scales and biases
    bit for bit (their logical dtype is ``dtype``). ``rope_traditional`` becomes
    ``rope_interleaved``.
    """
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{d}: no config.json (not an mlx-lm directory)")
    hf = json.loads(cfg_file.read_text())
    config = dataclasses.replace(config_from_hf(hf, cfg_file),
                                 rope_interleaved=bool(hf.get("rope_traditional", False)))
    files = _weight_files(d)
    if not files:
        raise ModelLoadError(f"{d}: no model*.safetensors files")
    tensors = {k: v for k, v in _read_tensors(files).items() if not k.endswith(_DROP)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    quant = hf.get("quantization") or hf.get("quantization_config") or {}
    shapes = {k.replace("/", "."): v.shape for k, v in _flat_shapes(config).items()}
    flat: dict[str, Any] = {}
    for key, arr in tensors.items():
        module, _, field = key.rpartition(".")
        if field in ("scales", "biases", "global_scale"):
            continue
        if f"{module}.scales" in tensors and field == "weight":
            if key not in shapes:
                raise ModelLoadError(f"{d}: unexpected quantized tensor {key}")
            in_dims = shapes[key][-1]
            flat[key] = _qarray(module, _module_spec(module, quant, tensors, in_dims),
                                tensors, in_dims, dtype)
        else:
            flat[key] = jnp.asarray(arr.astype(np.float32) if arr.dtype.kind == "V" else arr,
                                    dtype)
    problems = _shape_problems(flat, shapes)
    if problems:
        raise ModelLoadError(f"{d}: tensors do not match config.json: {'; '.join(problems[:4])}")
    tok_file = d / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file, config=hf) if tok_file.is_file() else None
    return unflatten(flat), config, tokenizer


def _shape_problems(flat: dict[str, Any], shapes: dict[str, Any]) -> list[str]:
    """Differences between loaded leaves (QArrays by logical shape) and the config's tree."""
    problems = [f"missing {k}" for k in shapes if k not in flat]
    problems += [f"unexpected {k}" for k in flat if k not in shapes]
    problems += [f"{k} has shape {tuple(flat[k].shape)}, expected {tuple(shapes[k])}"
                 for k in shapes if k in flat and tuple(flat[k].shape) != tuple(shapes[k])]
    return problems


def _flat_shapes(config: LlamaConfig) -> dict[str, Any]:
    from jaxq.core.tree import flatten_with_paths

    leaves, _ = flatten_with_paths(param_shapes(config))
    return dict(leaves)
