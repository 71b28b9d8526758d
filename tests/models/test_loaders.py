"""GGUF and HF-directory loaders on small models written here, and their error messages."""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from _tinyllama import tiny_config, tiny_params
from safetensors.numpy import save_file

from jaxq.eval.data import ptb_text
from jaxq.models import ModelLoadError, llama, load_gguf, load_hf_dir, load_model
from jaxq.models.llama import LlamaConfig

_fwd = jax.jit(llama.forward, static_argnames=("config", "attn_block"))


@pytest.fixture(scope="module")
def tiny_tok() -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on a little PTB text, with two special tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([ptb_text("test")[:30000]], trainer)
    return tok


def _cfg(tok: tokenizers.Tokenizer, **kw) -> LlamaConfig:
    return tiny_config(vocab_size=tok.get_vocab_size(), intermediate_size=96, bos_token_id=1,
                       eos_token_id=0, **kw)


def _tokens(cfg: LlamaConfig) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# HF directories


def _hf_tensors(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="."): np.asarray(v) for k, v in flat}


def _hf_config(cfg: LlamaConfig, **kw) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "rope_scaling": None,
    }
    hf.update(kw)
    return hf


def _write_hf(d, params, cfg, tok, *, shards: int = 1, dtype=np.float32, extra=None):
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(dtype) for k, v in _hf_tensors(params).items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # ignored
    if extra:
        tensors.update(extra)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s::shards]}
            save_file(part, str(d / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(_hf_config(cfg)))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": "{{x}}"}))
    return d


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_dir_round_trip(tmp_path, tiny_tok, shards, tied):
    cfg = _cfg(tiny_tok, tie_word_embeddings=tied, attention_bias=not tied)
    params = tiny_params(cfg, 0, scale=0.1)
    extra = {"lm_head.weight": np.zeros((cfg.vocab_size, 64), np.float32)} if tied else None
    d = _write_hf(tmp_path / "m", params, cfg, tiny_tok, shards=shards, extra=extra)
    loaded, lcfg, ltok = load_hf_dir(d)
    assert lcfg == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    toks = _tokens(cfg)
    np.testing.assert_array_equal(_fwd(loaded, toks, config=lcfg), _fwd(params, toks, config=cfg))
    text = "the dow jones industrial average fell N points"
    assert ltok.encode(text) == tiny_tok.encode(text).ids
    assert (ltok.bos_id, ltok.eos_id, ltok.chat_template) == (1, 0, "{{x}}")
    again = load_model(d)  # dispatch on a directory
    assert again[1] == cfg


def test_hf_bf16_weights_are_cast_to_float32(tmp_path, tiny_tok):
    cfg = _cfg(tiny_tok)
    params = tiny_params(cfg, 1, scale=0.1)
    d = _write_hf(tmp_path / "bf16", params, cfg, tiny_tok, dtype=ml_dtypes.bfloat16)
    loaded, _, _ = load_model(d / "model.safetensors")  # dispatch on a file inside the dir
    w = loaded["model"]["layers"][1]["mlp"]["down_proj"]["weight"]
    want = np.asarray(params["model"]["layers"][1]["mlp"]["down_proj"]["weight"])
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(w, want.astype(ml_dtypes.bfloat16).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# GGUF files


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K permutation for llama (written out here independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _vocab(tok: tokenizers.Tokenizer) -> tuple[list[str], list[str], list[int]]:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    special = {"<|endoftext|>", "<|im_start|>"}
    types = [3 if t in special else 1 for t in tokens]
    return tokens, merges, types


def _llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    ("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v", ("self_attn", "o_proj"): "attn_output",
    ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}


def _write_gguf(path, params, cfg, tok, *, arch="llama"):
    """A llama.cpp-style GGUF of HF-layout ``params``: Q8_0 / F16 / F32 tensors, permuted Q/K.

    Returns the HF-layout params as the file stores them after quantization.
    """
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    tokens, merges, types = _vocab(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    stored = jax.tree.map(np.asarray, params)

    def put(name, arr, kind):
        if kind == "q8":
            data = gguf.quants.quantize(arr, q8)
            w.add_tensor(name, data, raw_dtype=q8)
            return gguf.quants.dequantize(data, q8)
        if kind == "f16":
            w.add_tensor(name, arr.astype(np.float16))
            return arr.astype(np.float16).astype(np.float32)
        w.add_tensor(name, arr.astype(np.float32))
        return arr

    m = stored["model"]
    m["embed_tokens"]["weight"] = put("token_embd.weight", m["embed_tokens"]["weight"], "q8")
    for i, layer in enumerate(m["layers"]):
        for (grp, proj), short in _GGUF_NAMES.items():
            p = layer[grp][proj]
            wt = p["weight"]
            heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(proj)
            kind = "f16" if proj in ("k_proj", "down_proj") else "q8"
            if heads:  # stored permuted; what the file holds, back in HF row order
                stored_rows = put(f"blk.{i}.{short}.weight", _llama_cpp_permute(wt, heads), kind)
                p["weight"] = _llama_cpp_unpermute(stored_rows, heads)
            else:
                p["weight"] = put(f"blk.{i}.{short}.weight", wt, kind)
        layer["input_layernorm"]["weight"] = put(
            f"blk.{i}.attn_norm.weight", layer["input_layernorm"]["weight"], "f32")
        layer["post_attention_layernorm"]["weight"] = put(
            f"blk.{i}.ffn_norm.weight", layer["post_attention_layernorm"]["weight"], "f32")
    m["norm"]["weight"] = put("output_norm.weight", m["norm"]["weight"], "f32")
    if not cfg.tie_word_embeddings:
        stored["lm_head"]["weight"] = put("output.weight", stored["lm_head"]["weight"], "f16")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_interleaved_rope(tmp_path, tiny_tok, tied):
    cfg = _cfg(tiny_tok, tie_word_embeddings=tied)
    params = tiny_params(cfg, 2, scale=0.1)
    path = tmp_path / "tiny.gguf"
    stored = _write_gguf(path, params, cfg, tiny_tok)
    loaded, lcfg, ltok = load_gguf(path)
    assert lcfg.rope_interleaved and lcfg.tie_word_embeddings == tied
    assert lcfg == llama.dataclasses.replace(cfg, rope_interleaved=True,
                                             max_position_embeddings=256)
    # Loaded Q/K rows are in llama.cpp's order; the forward with interleaved RoPE must equal the
    # HF-layout forward of the same (quantized) weights with half-split RoPE.
    toks = _tokens(cfg)
    ref = _fwd(stored, toks, config=cfg)
    np.testing.assert_allclose(_fwd(loaded, toks, config=lcfg), ref, rtol=1e-5, atol=1e-5)
    hf_params, hf_cfg = llama.convert_rope_layout(loaded, lcfg, interleaved=False)
    for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not hf_cfg.rope_interleaved
    text = "no it was n't black monday\nbut while the new york stock exchange"
    assert ltok.encode(text) == tiny_tok.encode(text).ids
    assert ltok.encode("<|im_start|>x") == tiny_tok.encode("<|im_start|>x").ids
    assert ltok.decode(ltok.encode(text)) == text
    assert load_model(path)[1] == lcfg


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        load_hf_dir(tmp_path / "nodir")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_truncated_and_corrupt_gguf(tmp_path, tiny_tok):
    cfg = _cfg(tiny_tok)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tiny_params(cfg, 3), cfg, tiny_tok)
    data = path.read_bytes()
    for n in (3, 200, len(data) // 3, len(data) - 1000):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="truncated"):
            load_gguf(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)


def test_truncated_real_gguf(tmp_path):
    from jaxq.models import default_model_path

    real = default_model_path()
    cut = tmp_path / "smollm_cut.gguf"
    with open(real, "rb") as fh:
        cut.write_bytes(fh.read(20_000))
    with pytest.raises(ModelLoadError, match=r"smollm_cut.gguf: .*truncated or corrupt"):
        load_model(cut)


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_truncated_safetensors(tmp_path, tiny_tok):
    cfg = _cfg(tiny_tok)
    d = _write_hf(tmp_path / "m", tiny_params(cfg, 4), cfg, tiny_tok)
    f = d / "model.safetensors"
    data = f.read_bytes()
    for n in (5, len(data) // 2):
        f.write_bytes(data[:n])
        with pytest.raises(ModelLoadError, match="model.safetensors: .*truncated or corrupt"):
            load_hf_dir(d)


def test_hf_errors(tmp_path, tiny_tok):
    cfg = _cfg(tiny_tok)
    params = tiny_params(cfg, 5)
    d = _write_hf(tmp_path / "m", params, cfg, tiny_tok, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / next(iter(index["weight_map"].values()))).unlink()
    with pytest.raises(ModelLoadError, match="shard .* is missing"):
        load_hf_dir(d)

    d2 = _write_hf(tmp_path / "gpt2", params, cfg, tiny_tok)
    (d2 / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError,
                       match="model_type 'gpt2' \\(architectures: GPT2LMHeadModel\\)"):
        load_hf_dir(d2)

    d3 = _write_hf(tmp_path / "scaled", params, cfg, tiny_tok)
    (d3 / "config.json").write_text(json.dumps(_hf_config(
        cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    with pytest.raises(ModelLoadError, match="rope_scaling"):
        load_hf_dir(d3)

    d4 = _write_hf(tmp_path / "wrong", params, cfg, tiny_tok)
    (d4 / "config.json").write_text(json.dumps(_hf_config(cfg, intermediate_size=80)))
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        load_hf_dir(d4)
