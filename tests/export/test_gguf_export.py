"""GGUF export: bit-exact block layouts, a round trip through gguf's reader and jaxq's loader,
tokenizer metadata, fallbacks, atomic output, the CLI, and (slow) llama.cpp itself."""

from __future__ import annotations

import argparse
import json
import warnings

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from _exportkit import (
    TEXT,
    export_llama,
    jaxq_greedy,
    jaxq_logits,
    prompt_ids,
    tiny_tokenizer,
)

import jaxq
from jaxq.export.common import ExportError, ExportWarning
from jaxq.export.gguf import decode_blocks, export_gguf, lossless_type
from jaxq.models import convert_rope_layout, load_gguf


@pytest.fixture(scope="module")
def tiny():
    cfg, params = export_llama()
    return params, cfg


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _gguf_values(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


W = np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32) * 0.05


@pytest.mark.parametrize("kw,qtype", [
    (dict(bits=4, group_size=32), "Q4_1"),
    (dict(bits=4, group_size=64), "Q4_1"),
    (dict(bits=4, group_size=128, symmetric=True), "Q4_0"),
    (dict(bits=5, group_size=32), "Q5_1"),
    (dict(bits=5, group_size=64, symmetric=True), "Q5_0"),
    (dict(bits=8, group_size=32, symmetric=True), "Q8_0"),
])
def test_affine_blocks_bit_exact(kw, qtype):
    """Codes, d and m read back from the blocks equal the QArray's; values equal its dequant."""
    qa = jaxq.quantize(jnp.asarray(W), scale_dtype=jnp.float16, **kw)
    assert lossless_type(qa) == qtype
    from jaxq.export.gguf import encode_qarray

    raw = encode_qarray(qa, qtype)
    back = decode_blocks(raw, qtype, W.shape[1])
    rep = qa.group_size // 32
    assert np.array_equal(back["codes"], np.asarray(qa.codes()))
    assert np.array_equal(back["d"], np.repeat(np.asarray(qa.scales), rep, axis=-1))
    if "m" in back:
        assert np.array_equal(back["m"], np.repeat(np.asarray(qa.biases), rep, axis=-1))
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(W.shape)
    np.testing.assert_array_equal(values, np.asarray(qa.dequantize()))


@pytest.mark.parametrize("mode,qtype", [("mxfp4", "MXFP4"), ("nvfp4", "NVFP4")])
def test_microscaling_blocks_exact(mode, qtype):
    from jaxq.export.gguf import encode_qarray
    from jaxq.quant.float_formats import mx_quantize

    qa = mx_quantize(jnp.asarray(W), mode=mode)
    assert lossless_type(qa) == qtype
    values = gguf.quants.dequantize(encode_qarray(qa, qtype),
                                    gguf.GGMLQuantizationType[qtype]).reshape(W.shape)
    np.testing.assert_array_equal(values, np.asarray(qa.dequantize()))


def _mixed(params):
    from jaxq.core.transform import chain

    return chain(
        jaxq.RTN(bits=8, group_size=32, symmetric=True, scale_dtype=jnp.float16,
                 where=r"self_attn/v_proj"),
        jaxq.RTN(bits=8, group_size=32, symmetric=True, scale_dtype=jnp.float16,
                 where=lambda p, x: p.startswith("model/embed")),
        jaxq.RTN(bits=4, group_size=64, scale_dtype=jnp.float16, where=r"mlp/"),
        jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16),
    )(params)


@pytest.fixture(scope="module")
def mixed_file(tiny, tmp_path_factory):
    params, cfg = tiny
    q = _mixed(params)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        r = export_gguf(q, cfg, tiny_tokenizer(), path, float_type="f32")
    return path, q, cfg, r


def test_round_trip_through_reader_is_bit_exact(mixed_file):
    """Row order is kept: the tiny model already uses llama.cpp's interleaved RoPE rows."""
    path, q, cfg, r = mixed_file
    assert cfg.rope_interleaved
    tensors = _tensors(path)
    assert r.types["blk.0.attn_v.weight"] == "Q8_0" and r.types["token_embd.weight"] == "Q8_0"
    assert r.types["blk.1.ffn_up.weight"] == "Q4_1" and r.types["blk.0.attn_q.weight"] == "Q4_1"
    assert r.types["output_norm.weight"] == "F32" and not r.requantized and not r.rerounded
    for name, key in (("blk.1.ffn_down.weight", ("mlp", "down_proj")),
                      ("blk.0.attn_v.weight", ("self_attn", "v_proj")),
                      ("blk.1.attn_k.weight", ("self_attn", "k_proj"))):
        t = tensors[name]
        qa = q["model"]["layers"][int(name[4])][key[0]][key[1]]["weight"]
        cols = qa.shape[1]
        back = decode_blocks(np.asarray(t.data), t.tensor_type.name, cols)
        want = np.asarray(qa.codes())
        assert np.array_equal(back["codes"], want), name
        np.testing.assert_array_equal(_gguf_values(t), np.asarray(qa.dequantize()))


def test_jaxq_loader_gives_same_logits_and_tokenizer(mixed_file):
    path, q, cfg, _ = mixed_file
    params, lcfg, tok = load_gguf(path)
    assert lcfg.rope_interleaved and lcfg.num_kv_heads == cfg.num_kv_heads
    assert lcfg.tie_word_embeddings and lcfg.eos_token_id == 2 and lcfg.bos_token_id == 1
    prompt = prompt_ids()
    np.testing.assert_allclose(jaxq_logits(params, lcfg, prompt), jaxq_logits(q, cfg, prompt),
                               atol=1e-4)
    src = tiny_tokenizer()
    assert tok.encode(TEXT) == src.encode(TEXT)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.chat_template == src.chat_template
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()
            if k.startswith("tokenizer.")}
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert meta["tokenizer.ggml.add_bos_token"] is False


def test_hf_order_model_is_permuted_for_llama_cpp(tiny, tmp_path):
    params, cfg = tiny
    hf_params, hf_cfg = convert_rope_layout(params, cfg, interleaved=False)
    q = jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16)(hf_params)
    export_gguf(q, hf_cfg, tiny_tokenizer(), tmp_path / "hf.gguf", float_type="f32")
    loaded, lcfg, _ = load_gguf(tmp_path / "hf.gguf")
    assert lcfg.rope_interleaved
    np.testing.assert_allclose(jaxq_logits(loaded, lcfg, prompt_ids()),
                               jaxq_logits(q, hf_cfg, prompt_ids()), atol=1e-4)


def test_fallbacks_warn_and_name_layers(tiny, tmp_path):
    params, cfg = tiny
    q = jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16)(params)
    layer = q["model"]["layers"][1]
    layer["mlp"]["up_proj"]["weight"] = jaxq.quantize(
        params["model"]["layers"][1]["mlp"]["up_proj"]["weight"], bits=3, group_size=32)
    layer["mlp"]["down_proj"]["weight"] = jaxq.quantize(
        params["model"]["layers"][1]["mlp"]["down_proj"]["weight"], bits=8, group_size=64)
    layer["self_attn"]["o_proj"]["weight"] = jaxq.quantize(
        params["model"]["layers"][1]["self_attn"]["o_proj"]["weight"], bits=4, group_size=32,
        scale_dtype=jnp.float32)
    with pytest.warns(ExportWarning) as record:
        r = export_gguf(q, cfg, tiny_tokenizer(), tmp_path / "fb.gguf")
    text = " ".join(str(w.message) for w in record)
    assert "blk.1.ffn_up.weight" in text and "blk.1.ffn_down.weight" in text
    assert r.types["blk.1.ffn_up.weight"] == "Q4_1" and r.types["blk.1.ffn_down.weight"] == "Q8_0"
    assert r.rerounded == ["blk.1.attn_output.weight"]
    with pytest.warns(ExportWarning):
        r2 = export_gguf(q, cfg, tiny_tokenizer(), tmp_path / "fb16.gguf", fallback="f16")
    assert r2.types["blk.1.ffn_up.weight"] == "F16"
    assert load_gguf(tmp_path / "fb.gguf")[1].num_layers == 2


def test_atomic_and_errors(tiny, tmp_path, monkeypatch):
    params, cfg = tiny
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(params, cfg, None, tmp_path / "a.gguf")
    import jaxq.export.gguf as g

    monkeypatch.setattr(g, "_write_tokenizer", lambda *a, **k: (_ for _ in ()).throw(
        OSError("disk full")))
    with pytest.raises(OSError):
        export_gguf(params, cfg, tiny_tokenizer(), tmp_path / "b.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_both_targets(tiny, tmp_path):
    from jaxq.cli import load_any
    from jaxq.core.io import OutputError
    from jaxq.export.cli import add_export_parser, cmd_export

    params, cfg = tiny
    q = jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16)(params)
    src = tmp_path / "src.gguf"
    export_gguf(q, cfg, tiny_tokenizer(), src)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"), load_any)
    out = cmd_export(parser.parse_args(["export", str(src), "--to", "gguf", "--out",
                                        str(tmp_path / "o.gguf"), "--json"]))
    assert out["types"]["F16"] >= 1 and out["bytes"] == (tmp_path / "o.gguf").stat().st_size
    args = parser.parse_args(["export", str(src), "--to", "mlx", "--out", str(tmp_path / "m"),
                              "--max-shard-size", "100KB", "--json"])
    out = cmd_export(args)
    assert "model.safetensors.index.json" in out["files"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(OutputError, match="m already exists; pass --force"):
        cmd_export(args)


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed "
                               "(see docs/llama-cpp.md)")


def _mx_model(mode):
    def build(params):
        from jaxq.quant.float_formats import MX

        return MX(mode=mode)(params)
    return build


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixed", "mxfp4", "nvfp4"])
def test_llama_cpp_runs_tiny_export(kind, mixed_file, tiny, tmp_path):
    """llama.cpp loads Q4_1/Q8_0/F32, MXFP4 and NVFP4 files; logits and greedy tokens agree."""
    _llama_cpp()
    from jaxq.export import llamacpp

    if kind == "mixed":
        path, q, cfg, _ = mixed_file
    else:
        params, cfg = tiny
        q = _mx_model(kind)(params)
        r = export_gguf(q, cfg, tiny_tokenizer(), tmp_path / f"{kind}.gguf", float_type="f32")
        assert r.types["blk.0.ffn_up.weight"] == kind.upper() and not r.requantized
        path = r.path
    llm = llamacpp.load(path, n_ctx=64, threads=2)
    prompt = prompt_ids()
    got, want = llamacpp.window_logits(llm, prompt), jaxq_logits(q, cfg, prompt)
    # llama.cpp rounds activations to 8 bits inside quantized dot products: a relative bound.
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert llamacpp.greedy(llm, prompt, 16) == jaxq_greedy(q, cfg, prompt, 16)


@pytest.mark.slow
def test_llama_cpp_greedy_matches_jaxq_on_smollm2(smollm, tmp_path):
    """The real SmolLM2, W4 g32 -> Q4_1 (embedding kept float): llama.cpp's greedy == jaxq's."""
    _llama_cpp()
    params, cfg, tok = smollm
    q = jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16)(params)
    r = export_gguf(q, cfg, tok, tmp_path / "smol.gguf", float_type="f32")
    assert set(r.types.values()) == {"Q4_1", "F32"} and not r.requantized
    from jaxq.export import llamacpp

    llm = llamacpp.load(r.path, n_ctx=128, threads=2)
    # llama.cpp rounds activations to 8 bits in its Q4_1 dot products, so a prompt whose greedy
    # path has a near-tie can diverge ("The capital of France is" does, at step 10, with a
    # top-2 margin jaxq's float math resolves the other way); this one has margins > 0.25.
    prompt = tok.encode("Once upon a time")
    assert llm.tokenize(b"Once upon a time", add_bos=False, special=False) == prompt
    assert llamacpp.greedy(llm, prompt, 16) == jaxq_greedy(q, cfg, np.asarray(prompt), 16)


@pytest.mark.slow
def test_kquant_post_processing(mixed_file, tmp_path):
    _llama_cpp()
    from jaxq.export.gguf import kquant

    path, *_ = mixed_file
    out = kquant(path, tmp_path / "k.gguf", "Q4_K_M")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types & {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"}
