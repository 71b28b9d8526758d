"""Load a llama-family GGUF file (llama.cpp) into jaxq's params pytree, dequantized to float.

Tensors are read one at a time from the memory-mapped file with ``gguf.GGUFReader`` and
dequantized with ``gguf.quants.dequantize`` (any type the gguf package knows: F32/F16/BF16,
Q4_0/Q4_1/Q5_x/Q8_0, the K-quants, ...). llama.cpp stores the Q/K projection rows permuted for
interleaved ("normal") RoPE; they are kept as stored and the config says
``rope_interleaved=True``. Use :func:`jaxq.models.llama.convert_rope_layout` to get HF/MLX
row order.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.core.checks import one_line
from jaxq.models import ModelLoadError
from jaxq.models.llama import LlamaConfig, Params, check_params
from jaxq.models.tokenizer import Tokenizer, TokenizerError
from jaxq.models.validate import GGUF_KEYS, check_config, check_gguf, gguf_reader

#: GGUF ``general.architecture`` values this loader maps onto :class:`LlamaConfig`.
SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
    "attn_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
}
_TOP_NAMES = {
    "token_embd": ("model", "embed_tokens"),
    "output_norm": ("model", "norm"),
    "output": ("lm_head",),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_TOP_RE = re.compile(r"([a-z_]+)\.(weight|bias)")


def _reader(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf_reader(path)
    except ModelLoadError:
        raise
    except Exception as e:  # the gguf package raises assorted errors on bad input
        size = path.stat().st_size
        raise ModelLoadError(
            f"{path}: not a readable GGUF file (truncated or corrupt? {size} bytes): {e}"
        ) from e


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of a ``GGUFReader`` as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # pragma: no cover - exotic value types
            continue
    return meta


def config_from_metadata(
    meta: dict[str, Any], tensor_names: set[str], path: Path | str = "<gguf>"
) -> LlamaConfig:
    """A :class:`LlamaConfig` from ``llama.*`` metadata keys (and which tensors exist)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported "
            f"(jaxq.models loads llama-family GGUF: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: key_length != value_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: partial RoPE (rope.dimension_count) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(f"{path}: RoPE scaling ({scaling}) is not supported")
    if meta.get(f"{arch}.expert_count"):
        raise ModelLoadError(f"{path}: mixture-of-experts models are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise ModelLoadError(f"{path}: cannot tell the vocabulary size")

    def tid(name: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if v is None else int(v)

    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_f32_value(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_interleaved=True,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=tid("bos"),
        eos_token_id=tuple(i for i in (tid("eos"), tid("eot"), tid("eom")) if i is not None),
    )


def _f32_value(v: Any) -> float:
    """The shortest decimal that a float32 metadata value rounds from (9.99999974e-06 -> 1e-05).

    GGUF stores these as float32; the source config held the short decimal.
    """
    return float(str(np.float32(v)))


def _target(name: str, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(layer index or None, key path inside the layer / model) of a llama.cpp tensor name."""
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES and int(m.group(1)) < num_layers:
        return int(m.group(1)), (*_LAYER_NAMES[m.group(2)], m.group(3))
    m = _TOP_RE.fullmatch(name)
    if m and m.group(1) in _TOP_NAMES:
        return None, (*_TOP_NAMES[m.group(1)], m.group(2))
    raise ModelLoadError(f"unexpected tensor {name!r} for a llama-family model")


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize"
        ) from e
    if arr.size != int(np.prod(shape)):
        raise ModelLoadError(f"{path}: tensor {tensor.name} is truncated")
    return np.asarray(arr, np.float32).reshape(shape)


def load_gguf(path: str | Path, *, dtype: Any = jnp.float32) -> tuple[Params, LlamaConfig,
                                                                       Tokenizer | None]:
    """Read a llama-family GGUF file: ``(params, config, tokenizer)``.

    Every tensor is dequantized to float32 then cast to ``dtype``. The tokenizer is built from
    the file's vocabulary (``None``, with a warning, if its kind is not supported).
    Raises :class:`ModelLoadError` for a missing, truncated or corrupt file, or a model that is
    not llama-family.
    """
    path = Path(path)
    reader = _reader(path)
    meta = check_gguf(reader, path)
    names = {t.name for t in reader.tensors}
    cfg = check_config(config_from_metadata(meta, names, path), path, GGUF_KEYS)
    model: dict[str, Any] = {"layers": [{} for _ in range(cfg.num_layers)]}
    params: dict[str, Any] = {"model": model}
    for tensor in reader.tensors:
        try:
            layer, keys = _target(tensor.name, cfg.num_layers)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        value = jnp.asarray(_dequantize(tensor, path), dtype)
        if layer is None:
            _set(params, keys, value)
        else:
            _set(model["layers"][layer], keys, value)
    problems = check_params(params, cfg)
    if problems:
        detail = "; ".join(problems[:4])
        raise ModelLoadError(f"{path}: tensors do not match the metadata: {detail}")
    try:
        tok = Tokenizer.from_gguf_metadata(meta) if "tokenizer.ggml.tokens" in meta else None
    except TokenizerError as e:
        warnings.warn(f"{path}: {e}; returning no tokenizer", stacklevel=2)
        tok = None
    except Exception as e:  # the tokenizers library raises bare Exceptions on bad vocabularies
        raise ModelLoadError(f"{path}: damaged tokenizer metadata ({one_line(e)})") from None
    return params, cfg, tok

