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

from jaxq.core.checks import check_safetensors, one_line, read_json, require
from jaxq.core.qarray import QArray
from jaxq.export.common import unflatten
from jaxq.models import ModelLoadError
from jaxq.models.hf_loader import config_from_hf
from jaxq.models.llama import LlamaConfig, Params, param_shapes
from jaxq.models.tokenizer import Tokenizer
from jaxq.models.validate import check_layer_count

#: mlx modes whose scales are uint8 exponents / E4M3 bytes: (bits, group size) -> mode.
_MX_BY_SHAPE = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
_DROP = ("rotary_emb.inv_freq",)
_MODES = ("affine", *_MX_BY_SHAPE.values())


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
    if not isinstance(cfg, dict):  # the HF loader reports it
        return False
    if cfg.get("quantization") or cfg.get("rope_traditional"):
        return True
    try:
        return any(n.endswith(".scales") for n in _tensor_names(_weight_files(d)))
    except Exception:  # unreadable weights: let the HF loader report it
        return False


def _read_tensors(files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """The tensors of ``files`` (headers checked first) and the file each came from."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for f in files:
        header = check_safetensors(f)
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file ({one_line(e)})") from e
        origin.update(dict.fromkeys(header, f))
    return tensors, origin


def _check_quantization(quant: Any, cfg_file: Path) -> dict[str, Any]:
    """The config's ``quantization`` block: an object whose defaults and per-module entries
    (objects, or booleans for modules mlx-lm skips) have positive integer bits and group
    sizes."""
    if not isinstance(quant, dict):
        raise ModelLoadError(f"{cfg_file}: 'quantization' is {quant!r:.40}, expected an object")
    for key, value in quant.items():
        if key in ("group_size", "bits"):
            require(quant, f"{cfg_file}: quantization", key, int)
            if value < 1:
                raise ModelLoadError(f"{cfg_file}: quantization {key} is {value}")
        elif isinstance(value, dict):
            where = f"{cfg_file}: quantization entry {key!r}"
            for k in ("group_size", "bits"):
                if require(value, where, k, int) < 1:
                    raise ModelLoadError(f"{where}: {k} is {value[k]}")
            if require(value, where, "mode", str, optional=True) not in (None, *_MODES):
                raise ModelLoadError(f"{where}: unknown mode {value['mode']!r:.40}")
    return quant


def _check_quantized_module(module: str, tensors: dict[str, np.ndarray], origin: dict,
                            d: Path) -> None:
    """Codes, scales (and biases for affine codes) come together, with matching rows."""
    weight, scales = tensors[f"{module}.weight"], tensors.get(f"{module}.scales")
    f = origin.get(f"{module}.weight", d)
    if scales is None:
        raise ModelLoadError(f"{f}: {module}.weight holds uint32 codes but {module}.scales is "
                             "missing")
    if weight.dtype != np.uint32 or weight.ndim != 2 or scales.ndim != 2:
        raise ModelLoadError(f"{f}: {module}.weight ({weight.dtype} {weight.shape}) is not "
                             f"2-d uint32 codes with 2-d scales ({scales.shape})")
    if scales.shape[0] != weight.shape[0] or not scales.shape[1] or not weight.shape[1]:
        raise ModelLoadError(f"{f}: {module}.scales {scales.shape} do not fit "
                             f"{module}.weight {weight.shape}")
    if scales.dtype != np.uint8 and f"{module}.biases" not in tensors:
        raise ModelLoadError(f"{f}: {module}.biases is missing (affine codes need them)")


def _module_spec(module: str, quant: dict[str, Any], tensors: dict[str, np.ndarray],
                 in_dims: int) -> dict[str, Any]:
    """Quantization of one module: its config entry, else inferred as mlx-lm infers it."""
    entry = quant.get(module)
    scales = tensors[f"{module}.scales"]
    weight = tensors[f"{module}.weight"]
    group_size = in_dims // scales.shape[-1]
    bits = weight.shape[-1] * 32 // in_dims
    if group_size * scales.shape[-1] != in_dims or bits * in_dims != weight.shape[-1] * 32:
        raise ModelLoadError(f"{module}: {weight.shape[-1]} code words and "
                             f"{scales.shape[-1]} scales per row do not fit {in_dims} inputs")
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
    hf = read_json(cfg_file)
    config = dataclasses.replace(config_from_hf(hf, cfg_file),
                                 rope_interleaved=bool(hf.get("rope_traditional", False)))
    files = _weight_files(d)
    if not files:
        raise ModelLoadError(f"{d}: no model*.safetensors files")
    tensors, origin = _read_tensors(files)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_DROP)}
    check_layer_count(tensors, config.num_layers, str(cfg_file), "num_hidden_layers")
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    quant = _check_quantization(hf.get("quantization") or hf.get("quantization_config") or {},
                                cfg_file)
    shapes = {k.replace("/", "."): v.shape for k, v in _flat_shapes(config).items()}
    flat: dict[str, Any] = {}
    for key, arr in tensors.items():
        module, _, field = key.rpartition(".")
        if field in ("scales", "biases", "global_scale"):
            continue
        if field == "weight" and (f"{module}.scales" in tensors or arr.dtype == np.uint32):
            if key not in shapes:
                raise ModelLoadError(f"{origin.get(key, d)}: unexpected quantized tensor {key}")
            _check_quantized_module(module, tensors, origin, d)
            in_dims = shapes[key][-1]
            try:
                spec = _module_spec(module, quant, tensors, in_dims)
            except ModelLoadError as e:
                raise ModelLoadError(f"{origin.get(key, d)}: {e}") from None
            flat[key] = _qarray(module, spec, tensors, in_dims, dtype)
        else:
            flat[key] = jnp.asarray(arr.astype(np.float32) if arr.dtype.kind == "V" else arr,
                                    dtype)
    problems = _shape_problems(flat, shapes)
    if problems:
        raise ModelLoadError(f"{d}: tensors do not match config.json: {'; '.join(problems[:4])}")
    if problems := _orphans(tensors):
        raise ModelLoadError(f"{d}: {problems}")
    tok_file = d / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file, config=hf) if tok_file.is_file() else None
    return unflatten(flat), config, tokenizer


def _orphans(tensors: dict[str, np.ndarray]) -> str:
    """Scales or biases whose module has no weight (one named; empty when none)."""
    for key in tensors:
        module, _, field = key.rpartition(".")
        if field in ("scales", "biases") and f"{module}.weight" not in tensors:
            return f"{key} has no {module}.weight"
    return ""


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
