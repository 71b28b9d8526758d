"""Load a llama-family HF checkpoint directory (config.json, safetensors, tokenizer.json).

HF keys ``model.layers.N.<module>.weight`` map one-to-one onto jaxq's nested params (the same
paths mlx-lm uses). HF rotates the halves of each head, so the config says
``rope_interleaved=False`` (unless an mlx-lm config sets ``rope_traditional: true``).
Tensors are read one at a time with ``safetensors.safe_open``, from a single file or from the
shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxq.core.checks import check_safetensors, read_json, require
from jaxq.models import ModelLoadError
from jaxq.models.llama import LlamaConfig, Params, check_params
from jaxq.models.tokenizer import Tokenizer
from jaxq.models.validate import HF_KEYS, check_config, check_hf_config, check_layer_count

#: HF ``model_type`` values mapped onto :class:`LlamaConfig`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def config_from_hf(hf: dict[str, Any], path: Path | str = "<config.json>") -> LlamaConfig:
    """A :class:`LlamaConfig` from a config.json dict; errors on features jaxq does not model."""
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(hf.get("architectures") or []) or "unknown"
        raise ModelLoadError(
            f"{path}: model_type {mt!r} (architectures: {archs}) is not supported "
            f"(jaxq.models loads llama-family models: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    check_hf_config(hf, path)
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", None):
        raise ModelLoadError(f"{path}: rope_scaling {scaling} is not supported")
    if hf.get("sliding_window") is not None:
        raise ModelLoadError(f"{path}: sliding-window attention is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])

        def first(v: Any) -> int | None:
            if isinstance(v, list):
                v = v[0] if v else None
            return None if v is None else int(v)

        def every(v: Any) -> int | tuple[int, ...] | None:  # all end ids, not just the first
            return tuple(int(i) for i in v) if isinstance(v, list) else first(v)

        cfg = LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_interleaved=bool(hf.get("rope_traditional", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=first(hf.get("bos_token_id")),
            eos_token_id=every(hf.get("eos_token_id")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: incomplete or invalid config ({e!r})") from e
    return check_config(cfg, path, HF_KEYS)


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = require(read_json(index), str(index), "weight_map", dict)
        if not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
            raise ModelLoadError(f"{index}: weight_map names a shard that is not a file name")
        files = [d / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{d}: no *.safetensors weights (only safetensors is supported)")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{d}: weight shard {f.name} is missing")
    return files


def _place(params: dict, key: str, value: Any, cfg: LlamaConfig) -> bool:
    """Put HF tensor ``key`` at its nested path; False for keys to skip."""
    if key.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
        return False
    parts = key.split(".")
    if not all(p.isidentifier() or p.isdigit() for p in parts):
        raise ModelLoadError(f"unexpected tensor name {key!r}")
    node: Any = params
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ModelLoadError(f"tensor {key!r} is beyond num_hidden_layers")
            node = node[idx]
        elif part == "layers" and i == 1:
            node = node.setdefault(part, [{} for _ in range(cfg.num_layers)])
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value
    return True


def load_hf_dir(path: str | Path, *, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig,
                                                                         Tokenizer | None]:
    """Read an HF llama-family directory: ``(params, config, tokenizer)``.

    Weights are cast to ``dtype`` (float32 by default, whatever they were stored as). The
    tokenizer comes from tokenizer.json (``None`` when the directory has none).
    """
    from safetensors import SafetensorError, safe_open

    d = Path(path)
    if not d.is_dir():
        raise ModelLoadError(f"model directory not found: {d}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{d}: no config.json")
    hf = read_json(cfg_path)
    cfg = config_from_hf(hf, cfg_path)
    files = _weight_files(d)
    headers = {f: check_safetensors(f) for f in files}  # offsets, dtypes, sizes: one line
    for f, header in headers.items():
        for key, (kind, _) in header.items():
            if kind not in _FLOAT_DTYPES and not key.endswith(_IGNORED_SUFFIXES):
                raise ModelLoadError(f"{f}: tensor {key!r} has dtype {kind}; jaxq reads float "
                                     "HF checkpoints (F16, BF16, F32)")
    check_layer_count([k for h in headers.values() for k in h], cfg.num_layers, str(cfg_path),
                      "num_hidden_layers")
    params: dict[str, Any] = {"model": {"layers": [{} for _ in range(cfg.num_layers)]}}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as fh:
                for key in fh.keys():
                    try:
                        _place(params, key, jnp.asarray(fh.get_tensor(key), dtype), cfg)
                    except ModelLoadError as e:
                        raise ModelLoadError(f"{f}: {e}") from None
        except SafetensorError as e:
            raise ModelLoadError(
                f"{f}: not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    problems = check_params(params, cfg)
    if problems:
        raise ModelLoadError(f"{d}: weights do not match config.json: {'; '.join(problems[:4])}")
    tok_path = d / "tokenizer.json"
    tok = Tokenizer.from_file(tok_path, config=hf) if tok_path.is_file() else None
    return params, cfg, tok
