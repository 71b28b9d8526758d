"""Bad inputs to ``jaxq compress --stream`` (jaxq.recipes.stream): each refused before any work,
in one line naming the culprit, with nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _probe import expect_clear_error, tiny_gguf
from _tinyllama import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from _streamkit import write_hf  # noqa: E402


def _stream(src, tmp_path, recipe="w4-g64") -> list[str]:
    return ["compress", str(src), "--stream", "--recipe", str(recipe), "--out",
            str(tmp_path / "out")]


@pytest.mark.bad_input
def test_collect_mode_recipe(tmp_path, capsys):
    """--stream, recipe calibrated in collect mode (AWQ) -> names the recipe, says collect mode"""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    expect_clear_error(_stream(src, tmp_path, "awq-w4-g64"), "awq-w4-g64", "collect",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_whole_model_method(tmp_path, capsys):
    """--stream, recipe with a whole-model method (mixed) -> names the recipe and the method"""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    expect_clear_error(_stream(src, tmp_path, "mixed-3.5"), "mixed-3.5", "'mixed'",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_already_compressed_source(tmp_path, capsys):
    """--stream from a jaxq compressed dir -> names it, says it is already compressed"""
    from jaxq.cli import main

    src = tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["compress", str(src), "--recipe", "w4-g64", "--out", str(tmp_path / "q"),
                 "--no-eval", "--json"]) == 0
    expect_clear_error(_stream(tmp_path / "q", tmp_path), "q", "already compressed",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_tensor_shape_mismatch(tmp_path, capsys):
    """--stream, HF dir with a tensor of the wrong shape -> names the dir and the tensor"""
    cfg, params = tiny_llama(0, vocab_size=320)
    params["model"]["layers"][1]["self_attn"]["o_proj"]["weight"] = np.zeros((64, 8), np.float32)
    src = write_hf(tmp_path / "src", params, cfg)
    expect_clear_error(_stream(src, tmp_path), "src", "model/layers/1/self_attn/o_proj/weight",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_truncated_shard(tmp_path, capsys):
    """--stream, HF dir with its second shard truncated -> names the shard file"""
    cfg, params = tiny_llama(0, vocab_size=320)
    src = write_hf(tmp_path / "src", params, cfg, shards=2)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_clear_error(_stream(src, tmp_path), "model-00002-of-00002.safetensors",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_truncated_gguf(tmp_path, capsys):
    """--stream from a GGUF file cut short -> names the file, says truncated"""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    src.write_bytes(src.read_bytes()[:-5000])
    expect_clear_error(_stream(src, tmp_path), "tiny.gguf", "truncated", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_where_pattern_matches_nothing(tmp_path, capsys):
    """--stream, recipe whose where= regex matches no leaf -> names the pattern"""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\ntransforms:\n  - {method: rtn, bits: 4, where: q_porj}\n")
    expect_clear_error(_stream(src, tmp_path, recipe), "q_porj", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_calibrated_method_without_calibration(tmp_path, capsys):
    """--stream, GPTQ recipe without calibration -> names the recipe's 'calibration' key and
    the statistic, before the model loads"""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    recipe = tmp_path / "nocal.yaml"
    recipe.write_text("name: nocal\ntransforms:\n  - {method: gptq, bits: 4}\n")
    expect_clear_error(_stream(src, tmp_path, recipe), "nocal", "key 'calibration'", "gram",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_api_refuses_a_foreign_output_directory(tmp_path):
    """stream.compress into a foreign existing dir -> names it, refuses to replace it"""
    from jaxq.recipes.stream import compress

    src = tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    expect_clear_error(lambda: compress(src, "w4-g64", tmp_path / "mine", progress=False),
                       "mine", "refusing to replace", watch=[tmp_path])
