"""The jaxq command: errors leave nothing behind; compress -> eval/generate/info round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _tinyllama import tiny_llama

from jaxq.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxq-cache"))


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main([*argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--json" in argv else None), err


def compress_recipe(tmp_path, capsys, text: str) -> tuple[dict, Path]:
    """``jaxq compress default`` with the recipe ``text`` (no evaluation): its JSON and output."""
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "o"
    recipe.write_text(text)
    rc, res, err = run(capsys, "compress", "default", "--recipe", str(recipe), "--out", str(out),
                       "--no-eval", "--json")
    assert rc == 0, err
    return res, out


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxq: error:"), err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_jaxq_notes_on_stderr_while_a_command_runs(monkeypatch, capsys):
    """INFO from jaxq's loggers (the autotuner's progress) reaches stderr during a command (the
    current sys.stderr, so a progress bar's proxy gets it), not with --json, and the handler
    is gone afterwards."""
    import io
    import logging
    import sys

    import jaxq.cli

    swapped = io.StringIO()

    def fake_info(args):
        logging.getLogger("jaxq.kernels.autotune").info("tuning some-key: 3 candidates")
        real, sys.stderr = sys.stderr, swapped  # as a live rich progress bar does
        try:
            logging.getLogger("jaxq.kernels.autotune").info("tuned some-key")
        finally:
            sys.stderr = real
        return {"ok": True}

    monkeypatch.setattr(jaxq.cli, "cmd_info", fake_info)
    rc, _, err = run(capsys, "info", "default")
    assert rc == 0 and "jaxq: tuning some-key: 3 candidates" in err
    assert swapped.getvalue() == "jaxq: tuned some-key\n" and "tuned" not in err
    rc, res, err = run(capsys, "info", "default", "--json")
    assert rc == 0 and res == {"ok": True} and "tuning" not in err
    assert not logging.getLogger("jaxq").handlers


def test_missing_model(tmp_path, capsys):
    rc, _, err = run(capsys, "compress", str(tmp_path / "nope.gguf"), "--out",
                     str(tmp_path / "out"))
    assert_one_line_error(rc, err, "nope.gguf")
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_and_method(tmp_path, capsys):
    rc, _, err = run(capsys, "compress", "default", "--recipe", "w5-magic", "--out",
                     str(tmp_path / "out"))
    assert_one_line_error(rc, err, "unknown recipe 'w5-magic'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntransforms:\n  - {method: quantum, bits: 4}\n")
    rc, _, err = run(capsys, "compress", "default", "--recipe", str(bad), "--out",
                     str(tmp_path / "out"))
    assert_one_line_error(rc, err, "unknown method 'quantum'")
    opt = tmp_path / "opt.yaml"
    opt.write_text("name: opt\ntransforms:\n  - {method: rtn, bitz: 4}\n")
    rc, _, err = run(capsys, "compress", "default", "--recipe", str(opt), "--out",
                     str(tmp_path / "out"))
    assert_one_line_error(rc, err, "no option 'bitz'; did you mean 'bits'?")
    assert not (tmp_path / "out").exists()


def test_bad_counts_are_one_line_errors(capsys):
    """Counts are checked as arguments; a count the data cannot meet is one line, not a
    traceback."""
    for argv in (["generate", "default", "--prompt", "hi", "--max-tokens", "-3"],
                 ["eval", "default", "--windows", "0"], ["eval", "default", "--windows", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "expected a whole number >= 1" in capsys.readouterr().err
    rc, _, err = run(capsys, "eval", "default", "--windows", "100000")
    assert_one_line_error(rc, err, "fewer than 100000 windows of 512", "JAXQ_DEBUG=1")


def test_refuses_to_replace_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    rc, _, err = run(capsys, "compress", "default", "--out", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "not a jaxq compressed directory")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def write_tiny_hf(d: Path, vocab: int, tokenizer_json: str, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    cfg, params = tiny_llama(seed, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_layers=1, num_heads=2, num_kv_heads=1,
                             tie_word_embeddings=True)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = np.asarray(node, np.float32)

    walk("", params)
    d.mkdir(exist_ok=True)
    save_file(flat, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    (d / "tokenizer.json").write_text(tokenizer_json)


@pytest.mark.slow
def test_tokenizer_mismatch(tmp_path, capsys, smollm):
    write_tiny_hf(tmp_path / "tiny", vocab=1000, tokenizer_json=smollm[2].to_json_str())
    rc, _, err = run(capsys, "compress", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "tokenizer mismatch", "49152", "1000")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compressed_dir_keeps_its_tokens_and_its_source(tmp_path, capsys, smollm, monkeypatch):
    """A compressed directory keeps the tokenizer's special ids and chat template, and names
    its source by absolute path: eval from elsewhere finds it, a rewritten weight file is a new
    float baseline (not a stale cached one), a corrupt cache is ignored, and a source that is
    gone skips the baseline instead of failing."""
    from jaxq.cli import load_any

    tok = smollm[2]
    assert tok.eos_id is not None and tok.chat_template
    write_tiny_hf(tmp_path / "tiny", vocab=tok.vocab_size, tokenizer_json=tok.to_json_str())
    (tmp_path / "tiny" / "tokenizer_config.json").write_text(json.dumps(tok.special_config()))
    monkeypatch.chdir(tmp_path)
    rc, res, err = run(capsys, "compress", "tiny", "--recipe", "w4-g32", "--out", "q",
                       "--windows", "1", "--json")
    assert rc == 0, err
    back = load_any(str(tmp_path / "q")).tokenizer
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert back.chat_template == tok.chat_template
    assert load_any(str(tmp_path / "q")).metadata["source"] == str(tmp_path / "tiny")

    monkeypatch.chdir("/")
    rc, ev, err = run(capsys, "eval", str(tmp_path / "q"), "--windows", "1", "--json")
    assert rc == 0, err
    assert ev["float_perplexity"] == res["float_perplexity"]
    weights = tmp_path / "tiny" / "model.safetensors"
    size = weights.stat().st_size
    write_tiny_hf(tmp_path / "tiny", vocab=tok.vocab_size, tokenizer_json=tok.to_json_str(),
                  seed=1)  # same size, other weights
    assert weights.stat().st_size == size
    rc, ev2, err = run(capsys, "eval", str(tmp_path / "q"), "--windows", "1", "--json")
    assert rc == 0, err
    assert ev2["float_perplexity"] != res["float_perplexity"]
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path / "jaxq-cache"))
    (tmp_path / "jaxq-cache").mkdir()
    (tmp_path / "jaxq-cache" / "float_ppl.json").write_text("{not json")
    rc, ev3, err = run(capsys, "eval", str(tmp_path / "q"), "--windows", "1", "--json")
    assert rc == 0 and ev3["float_perplexity"] == ev2["float_perplexity"], err
    shutil.rmtree(tmp_path / "tiny")
    rc, ev4, err = run(capsys, "eval", str(tmp_path / "q"), "--windows", "1", "--json")
    assert rc == 0, err
    assert "float_perplexity" not in ev4 and "float baseline skipped" in err


@pytest.mark.slow
def test_truncated_gguf(tmp_path, capsys):
    from jaxq.models.default import default_model_path

    data = default_model_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 3])
    rc, _, err = run(capsys, "compress", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "cut.gguf")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compress_then_eval_generate_info(tmp_path, capsys):
    out = tmp_path / "w4"
    rc, res, err = run(capsys, "compress", "default", "--recipe", "w4-g64", "--out", str(out),
                       "--windows", "2", "--json")
    assert rc == 0, err
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()
    # 4-bit g64 linears with f16 scale+bias: 4.5 bits; f32 norms and an 8-bit g64 embedding.
    assert abs(res["linear_bits_per_weight"] - 4.5) < 1e-9
    assert 4.5 < res["bits_per_weight"] < 5.5
    assert res["fallback_layers"] == []
    assert 1.0 < res["perplexity"] / res["float_perplexity"] < 2.0

    rc, ev, err = run(capsys, "eval", str(out), "--windows", "2", "--json")
    assert rc == 0, err
    assert abs(ev["perplexity"] - res["perplexity"]) < 1e-6 * res["perplexity"]
    assert abs(ev["float_perplexity"] - res["float_perplexity"]) < 1e-9

    rc, info, err = run(capsys, "info", str(out), "--json")
    assert rc == 0, err
    kinds = {row["path"]: row["dtype"] for row in info["layers"]}
    assert kinds["model/layers/*/mlp/up_proj/weight"].startswith("affine 4-bit g64")
    assert kinds["model/embed_tokens/weight"].startswith("affine 8-bit g64")
    assert kinds["model/norm/weight"] == "float32"
    assert info["recipe"] == "w4-g64"

    rc, gen, err = run(capsys, "generate", str(out), "--prompt", "The capital of France is",
                       "--max-tokens", "6", "--json")
    assert rc == 0, err
    assert gen["completion"] and len(gen["tokens"]) <= 6


@pytest.mark.slow
def test_group_fallback_is_reported(tmp_path, capsys):
    res, _ = compress_recipe(tmp_path, capsys, "name: g128\ntransforms:\n"
                             "  - {method: rtn, bits: 4, group_size: 128, where: layers/0/}\n")
    # 576-wide inputs fall back to 64; down_proj's 1536-wide input keeps 128.
    assert sorted(p.split("/")[-2] for p in res["fallback_layers"]) == [
        "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.slow
def test_mixed_precision_recipe_meets_its_budget(tmp_path, capsys):
    """Sensitivity planning then sequential GPTQ, on a few windows: the budget holds for the
    whole model and the widths differ between layers."""
    res, out = compress_recipe(
        tmp_path, capsys,
        "name: mixed-4\ncalibration: {windows: 4, length: 128, batch: 2, mode: sequential,"
        " sensitivity_windows: 2}\ntransforms:\n  - method: mixed\n    budget_bpw: 4.0\n"
        "    quantizers:\n      - {method: gptq, scale_dtype: float16}\n"
        "      - {method: rtn, where: embed_tokens, scale_dtype: float16}\n")
    assert 3.8 < res["bits_per_weight"] <= 4.0
    rc, info, err = run(capsys, "info", str(out), "--json")
    assert rc == 0, err
    widths = {row["dtype"].split(",")[0] for row in info["layers"]
              if row["dtype"].startswith("affine")}
    assert len(widths) > 1, widths


@pytest.mark.slow
def test_collect_mode_recipe_folds_awq_scales(tmp_path, capsys, smollm):
    """A collect-mode recipe (AWQ then GPTQ) on a few windows: statistics of the float model,
    scales folded into the selected layers' norms, their linears quantized, the rest as it was."""
    from jaxq.core import serialize
    from jaxq.core.tree import flatten_with_paths

    _, out = compress_recipe(
        tmp_path, capsys,
        "name: awq-gptq-w4\ncalibration: {windows: 4, length: 128, batch: 2, mode: collect}\n"
        "transforms:\n  - {method: awq, bits: 4, group_size: 64, where: 'layers/[01]/',\n"
        "     then: {method: gptq, bits: 4, group_size: 64}}\n")
    got = dict(flatten_with_paths(serialize.load(out)[0])[0])
    before = dict(flatten_with_paths(smollm[0])[0])
    quantized = sorted(p for p, x in got.items() if hasattr(x, "dequantize"))
    assert len(quantized) == 14 and all("layers/0/" in p or "layers/1/" in p
                                        for p in quantized), quantized
    norm = "model/layers/{}/input_layernorm/weight"
    assert not np.allclose(got[norm.format(0)], before[norm.format(0)])  # a scale folded in
    np.testing.assert_array_equal(got[norm.format(2)], before[norm.format(2)])
