"""A killed ``jaxq compress`` with a sequential calibrated recipe resumes from the layers it left
in OUT.work (``--resume``) and saves exactly what an uninterrupted run saves; a work directory
that another recipe, model or command left is refused with one clear line."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from _probe import expect_clear_error, tiny_gguf

from jaxq.calib import LayerCheckpoint
from jaxq.core import serialize
from jaxq.recipes import load_recipe, resume

ROOT = Path(__file__).parents[2]
LAYERS = 6
RECIPE = """name: gptq-w4-g64-small
description: gptq-w4-g64 on 16 x 128 PTB train tokens
calibration: {windows: 16, length: 128, batch: 8, mode: sequential}
transforms:
  - {method: gptq, bits: 4, group_size: 64, scale_dtype: float16}
  - {method: rtn, bits: 8, group_size: 64, where: embed_tokens, scale_dtype: float16}
"""
AWQ_RECIPE = """name: awq-gptq-w4-g64-small
description: awq-gptq-w4-g64 (collect mode) on 16 x 128 PTB train tokens
calibration: {windows: 16, length: 128, batch: 8, mode: collect}
transforms:
  - method: awq
    bits: 4
    group_size: 64
    scale_dtype: float16
    then: {method: gptq, bits: 4, group_size: 64, scale_dtype: float16}
  - {method: rtn, bits: 8, group_size: 64, where: embed_tokens, scale_dtype: float16}
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxq-cache"))


@functools.cache
def _deep_gguf_bytes(layers: int) -> bytes:
    """The tiny GGUF model of _probe with ``layers`` blocks (room for a kill between two)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    from _exportkit import tiny_tokenizer
    from _tinyllama import tiny_llama

    from jaxq.export.gguf import export_gguf

    tok = tiny_tokenizer()
    cfg, params = tiny_llama(0, scale=0.08, vocab_size=tok.vocab_size, hidden_size=128,
                             intermediate_size=256, head_dim=32, tie_word_embeddings=True,
                             rope_interleaved=True, bos_token_id=1, eos_token_id=2,
                             num_layers=layers)
    with tempfile.TemporaryDirectory() as d:
        export_gguf(params, cfg, tok, Path(d) / "m.gguf", float_type="f32")
        return (Path(d) / "m.gguf").read_bytes()


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "deep.gguf"
    src.write_bytes(_deep_gguf_bytes(LAYERS))
    recipe = tmp_path / "gptq-small.yaml"
    recipe.write_text(RECIPE)
    return src, recipe


def _compress(src: Path, recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxq.cli", "compress", str(src), "--recipe", str(recipe),
         "--out", str(out), "--no-eval", "--json", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _assert_same_saved(a: Path, b: Path) -> None:
    """Same tree, same leaf metadata and every array equal bit for bit."""
    ma, mb = serialize.read_manifest(a), serialize.read_manifest(b)
    assert ma["tree"] == mb["tree"]
    pa, pb = serialize.load(a)[0], serialize.load(b)[0]
    import jax

    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("ref")
    src, recipe = _setup(tmp)
    res = _finish(_compress(src, recipe, tmp / "ref"))
    assert "resumed_weights" not in res
    assert not (tmp / "ref.work").exists(), "the work directory outlived the final save"
    return src, recipe, tmp / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_then_resume_saves_what_an_uninterrupted_run_saves(uninterrupted, tmp_path,
                                                                   seed):
    src, recipe, ref = uninterrupted
    rng = random.Random(seed)
    layers = rng.randint(1, LAYERS // 2)  # kill once this many layers are on disk ...
    delay = rng.uniform(0.0, 0.4)          # ... and a little after: mid-layer or mid-write
    out = tmp_path / "o"
    work = tmp_path / "o.work"
    proc = _compress(src, recipe, out)
    deadline = time.monotonic() + 300
    while len(LayerCheckpoint(work).entries()) < layers:
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    kept = len(LayerCheckpoint(work))
    assert kept >= 7 * layers  # q k v o gate up down per layer

    res = _finish(_compress(src, recipe, out, "--resume"))
    assert res["resumed_weights"] == kept
    assert not work.exists()
    _assert_same_saved(out, ref)


@pytest.mark.parametrize("text", [RECIPE, pytest.param(AWQ_RECIPE, marks=pytest.mark.slow)],
                         ids=["sequential", "collect"])
def test_resumed_cli_run_reads_layers_back_and_cleans_up(tmp_path, capsys, monkeypatch, text):
    """In-process: a run stopped after its first layer is on disk resumes with --resume, reads
    that layer back (compressed weights, or statistics in collect mode), saves what an
    uninterrupted run saves and removes OUT.work."""
    from jaxq.cli import main

    src = tiny_gguf(tmp_path / "tiny.gguf")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    args = ["compress", str(src), "--recipe", str(recipe), "--no-eval", "--json"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()

    flush = LayerCheckpoint.flush

    def killed(self):
        flush(self)
        raise KeyboardInterrupt  # the process dies right after its first layer is written

    with monkeypatch.context() as m:
        m.setattr(LayerCheckpoint, "flush", killed)
        with pytest.raises(KeyboardInterrupt):
            main([*args, "--out", str(tmp_path / "o")])
    work = tmp_path / "o.work"
    assert len(LayerCheckpoint(work).entries()) == 1
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o"), "--resume"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["resumed_weights"] == 7
    assert not work.exists()
    _assert_same_saved(tmp_path / "o", tmp_path / "ref")


# --- the bad-input matrix ----------------------------------------------------------------------

def _left_by(work: Path, recipe, src: Path) -> None:
    """The work directory a run of ``recipe`` on ``src`` leaves when killed before its first
    layer is done (its key, no layers yet)."""
    from jaxq.cli import load_any
    from jaxq.eval.data import calibration_windows

    m = load_any(str(src))
    cal = dict(recipe.calibration)
    windows = calibration_windows(m.tokenizer, n=cal["windows"], length=cal["length"])
    resume.open_work(work, resume.key(recipe, m.params, m.config, cal, windows))


@pytest.mark.bad_input
def test_leftover_work_dir_without_resume(tmp_path, capsys):
    """OUT.work left by a killed run, rerun without --resume -> names OUT.work and --resume."""
    src, recipe = _setup(tmp_path)
    _left_by(tmp_path / "o.work", load_recipe(recipe), src)
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval"], "o.work", "--resume",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_of_another_recipe(tmp_path, capsys):
    """--resume, OUT.work holds another recipe's layers -> names OUT.work and both recipes."""
    src, recipe = _setup(tmp_path)
    _left_by(tmp_path / "o.work", load_recipe(recipe), src)
    expect_clear_error(["compress", str(src), "--recipe", "sparsegpt-50", "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "o.work", "gptq-w4-g64-small", "sparsegpt-50",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_of_an_edited_recipe(tmp_path, capsys):
    """--resume, OUT.work made before the recipe file changed -> names OUT.work, the change."""
    src, recipe = _setup(tmp_path)
    _left_by(tmp_path / "o.work", load_recipe(recipe), src)
    recipe.write_text(RECIPE.replace("bits: 4", "bits: 3"))
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "o.work", "recipe file changed", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_of_another_model(tmp_path, capsys):
    """--resume, OUT.work holds layers made on another model -> names OUT.work, another model."""
    src, recipe = _setup(tmp_path)
    other = tiny_gguf(tmp_path / "other.gguf", seed=1)
    _left_by(tmp_path / "o.work", load_recipe(recipe), other)
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "o.work", "another model", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_made_by_other_code(tmp_path, capsys):
    """--resume, OUT.work made by other jaxq code or JAX -> names OUT.work and both versions."""
    src, recipe = _setup(tmp_path)
    work = tmp_path / "o.work"
    _left_by(work, load_recipe(recipe), src)
    record = json.loads((work / resume.MANIFEST).read_text())
    record["software"] = "jaxq code 000000000000, jax 0.0.1, cpu"
    (work / resume.MANIFEST).write_text(json.dumps(record))
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "o.work", "jax 0.0.1", resume.key(load_recipe(recipe), {}, None, {},
                                                          np.zeros(1))["software"],
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_of_jaxq_train(tmp_path, capsys):
    """--resume, OUT.work has no resume.json (jaxq train's) -> names OUT.work and resume.json."""
    src, recipe = _setup(tmp_path)
    (tmp_path / "o.work" / "00-prune").mkdir(parents=True)
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "o.work", "resume.json", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_with_a_corrupt_record(tmp_path, capsys):
    """--resume, OUT.work/resume.json is not valid JSON -> names resume.json."""
    src, recipe = _setup(tmp_path)
    (tmp_path / "o.work").mkdir()
    (tmp_path / "o.work" / "resume.json").write_text("{half")
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "resume.json", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_resume_dir_with_a_damaged_layer(tmp_path, capsys):
    """--resume, a layer entry in OUT.work has a truncated manifest -> names that entry."""
    src, recipe = _setup(tmp_path)
    work = tmp_path / "o.work"
    _left_by(work, load_recipe(recipe), src)
    store = LayerCheckpoint(work)
    store.save("model/layers/0/mlp/up_proj/weight", np.ones((4, 4), np.float32))
    store.flush()
    (work / "00000" / serialize.MANIFEST).write_text('{"format": "jaxq", "tree": ')
    expect_clear_error(["compress", str(src), "--recipe", str(recipe), "--out",
                        str(tmp_path / "o"), "--no-eval", "--resume"],
                       "00000", "o.work", capsys=capsys, watch=[tmp_path])
