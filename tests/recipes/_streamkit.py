"""A llama-family HF directory written from params, for the streaming and lazy-loading tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from _exportkit import tiny_tokenizer  # noqa: E402


def write_hf(d: Path, params, cfg, *, dtype=np.float32, shards: int = 1) -> Path:
    """An HF directory of ``params`` (tensors cast to ``dtype``, split over ``shards`` files)
    with the tiny BPE tokenizer."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    flat = {jax.tree_util.keystr(k, simple=True, separator="."): np.asarray(v).astype(dtype)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    names = sorted(flat)
    weight_map = {}
    for s in range(shards):
        part = {k: flat[k] for k in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "bos_token_id": 1, "eos_token_id": 2}))
    (d / "tokenizer.json").write_text(tiny_tokenizer().to_json_str())
    return d
