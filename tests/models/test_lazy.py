"""jaxq.models.lazy: a model opened lazily has the loaders' config and tokenizer, and every
tensor it reads equals the loaded one (same cast, same GGUF dequantization)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _tinyllama import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from _probe import tiny_gguf  # noqa: E402
from _streamkit import write_hf  # noqa: E402

from jaxq.core.tree import flatten_with_paths  # noqa: E402
from jaxq.models import ModelLoadError, load_model  # noqa: E402
from jaxq.models.lazy import open_model  # noqa: E402


def assert_matches_loader(src) -> None:
    lazy = open_model(src)
    params, cfg, tok = load_model(src)
    assert lazy.config == cfg
    assert (lazy.tokenizer is None) == (tok is None)
    if tok is not None:
        assert lazy.tokenizer.to_json_str() == tok.to_json_str()
    leaves = dict(flatten_with_paths(params)[0])
    assert set(lazy.shapes) == set(leaves)
    for path, want in leaves.items():
        got = lazy.tensor(path)
        assert got.dtype == want.dtype and lazy.shapes[path] == want.shape, path
        assert np.array_equal(np.asarray(got), np.asarray(want)), path
    layer = lazy.subtree("model/layers/1")
    assert jax.tree.structure(layer) == jax.tree.structure(params["model"]["layers"][1])
    assert lazy.nbytes == sum(x.size * 4 for x in leaves.values())


def test_gguf_tensors_equal_the_loaders(tmp_path):
    assert_matches_loader(tiny_gguf(tmp_path / "tiny.gguf"))


def test_hf_bf16_sharded_tensors_equal_the_loaders(tmp_path):
    import ml_dtypes

    cfg, params = tiny_llama(2, vocab_size=320, attention_bias=True)
    assert_matches_loader(write_hf(tmp_path / "m", params, cfg, dtype=ml_dtypes.bfloat16,
                                   shards=3))


@pytest.mark.slow
def test_default_smollm_quantized_gguf_equals_the_loader():
    """SmolLM2's GGUF holds Q4_1 and Q8_0 blocks: read by pread and dequantized alike."""
    assert_matches_loader("default")


def test_a_mismatched_tensor_fails_on_opening(tmp_path):
    cfg, params = tiny_llama(2, vocab_size=320)
    params["model"]["layers"][1]["mlp"]["up_proj"]["weight"] = np.zeros((3, 64), np.float32)
    d = write_hf(tmp_path / "m", params, cfg)
    with pytest.raises(ModelLoadError, match=r"model/layers/1/mlp/up_proj/weight has shape"):
        open_model(d)
