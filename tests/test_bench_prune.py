"""The pruning bench's own logic: the zero/N:M read-out, and the llm-compressor peer script on a
tiny random llama written as an HF directory (that one only where the peer venv exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_prune  # noqa: E402
from _tinyllama import tiny_llama  # noqa: E402

from jaxq.models.hf_loader import load_hf_dir  # noqa: E402


def test_zero_report_counts_zeros_and_nm_groups():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    w[:, ::2] = 0.0  # every group of 4 has exactly 2 zeros: valid 2:4
    w[0, 1] = 0.0    # one group with 3 zeros: still valid (at most 2 non-zeros)
    v = rng.normal(size=(2, 8)).astype(np.float32)
    v[1, :3] = 0.0   # second row's first group keeps 1, its second keeps 4: one invalid group
    v[0, 4:] = 0.0
    params = {"a": {"weight": w}, "b": {"weight": v},
              "embed_tokens": {"weight": np.zeros((5, 8), np.float32)}}  # not a linear layer
    r = bench_prune.zero_report(params, (2, 4))
    zeros = 16 + 1 + 3 + 4
    assert r["zero_fraction"] == pytest.approx(zeros / 48)
    # groups: w has 8, all valid; v row 0: [4 nz -> invalid, 0 nz]; row 1: [1 nz, 4 nz -> invalid]
    assert r["nm_valid_fraction"] == pytest.approx(10 / 12)
    assert "nm_valid_fraction" not in bench_prune.zero_report(params, None)


_TOKENIZER = """
import sys
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0").save_pretrained(sys.argv[1])
"""


def _peer_python() -> Path:
    return bench_prune.VENV / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not _peer_python().is_file(),
                    reason="no llm-compressor venv (scripts/setup_llmcompressor)")
@pytest.mark.parametrize("args,nm", [
    (["--method", "magnitude", "--pattern", "2:4"], (2, 4)),
    (["--method", "magnitude", "--sparsity", "0.6"], None),
    (["--method", "sparsegpt", "--pattern", "2:4"], (2, 4)),
    (["--method", "wanda", "--sparsity", "0.5"], None),
    (["--method", "sparsegpt", "--pattern", "2:4", "--quant", "w4"], (2, 4)),
])
def test_peer_script_prunes_a_tiny_llama(tmp_path, args, nm):
    from mlx_backend.export import export_mlx

    cfg, params = tiny_llama(scale=0.1, tie_word_embeddings=True, rope_interleaved=True,
                             max_position_embeddings=256)
    src, out = tmp_path / "float", tmp_path / "out"
    export_mlx(params, cfg, None, src)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 96, size=(4, 32)).astype(np.int32))
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # oneshot wants a tokenizer in the directory even for token windows: a word-level one
    subprocess.run([str(_peer_python()), "-c", _TOKENIZER, str(src)], check=True, env=env)
    run = subprocess.run([str(_peer_python()), str(ROOT / "scripts" / "peer_llmcompressor.py"),
                          "--model", str(src), "--calib", str(calib), "--out", str(out), *args],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    peer = json.loads((out / "result.json").read_text())
    pruned, cfg2, _ = load_hf_dir(out)
    ours = bench_prune.zero_report(pruned, nm)
    assert ours["zero_fraction"] == pytest.approx(peer["zero_fraction"])
    before, _, _ = load_hf_dir(src)
    np.testing.assert_array_equal(pruned["model"]["embed_tokens"]["weight"],
                                  before["model"]["embed_tokens"]["weight"])
    if "--quant" in args:  # llm-compressor's GPTQ may refill pruned weights: only reported
        assert 0.0 < peer["nm_valid_fraction"] <= 1.0
        return
    target = float(args[args.index("--sparsity") + 1]) if "--sparsity" in args else 0.5
    assert ours["zero_fraction"] == pytest.approx(target, abs=0.01)
    if nm:
        assert ours["nm_valid_fraction"] == 1.0
    if args[1] == "magnitude":  # per layer: each matrix keeps exactly its largest |w|
        w0 = np.asarray(before["model"]["layers"][0]["mlp"]["up_proj"]["weight"])
        w1 = np.asarray(pruned["model"]["layers"][0]["mlp"]["up_proj"]["weight"])
        kept = w1 != 0
        if nm:
            g = np.abs(w0).reshape(w0.shape[0], -1, 4)
            top = np.argsort(-g, axis=-1)[..., :2]
            want = np.zeros_like(g, bool)
            np.put_along_axis(want, top, True, -1)
            np.testing.assert_array_equal(kept, want.reshape(w0.shape))
        else:
            assert np.abs(w0[kept]).min() >= np.abs(w0[~kept]).max()
        np.testing.assert_array_equal(w1[kept], w0[kept])
