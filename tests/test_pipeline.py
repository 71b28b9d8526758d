"""Pipeline recipes: a tiny Llama through quantize (GPTQ) -> QAT+KD, by the runner and by
`jaxq train`: the loss falls, the result is the QArrays the last stage trained, a second run
resumes from the saved stages, and bad stages are one-line errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from _tinyllama import tiny_config, tiny_params
from tokenizers import decoders, models, pre_tokenizers

from jaxq import distill
from jaxq.calib import apply
from jaxq.cli import main
from jaxq.core.qarray import QArray
from jaxq.models import llama
from jaxq.recipes import METHODS, RecipeError, load_recipe, recipe_from_dict
from jaxq.recipes.pipeline import (
    Model,
    _load_stage,
    _run_stage,
    apply_masks,
    run_pipeline,
    train_windows,
    zero_masks,
)

VOCAB = 256
CFG = tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_heads=2,
                  num_kv_heads=1, tie_word_embeddings=True)

RECIPE = {
    "name": "tiny-gptq-qat",
    "train": {"batch": 4, "seq_len": 32, "lr": 1e-2, "checkpoint_every": 6},
    "stages": [
        {"stage": "quantize", "calibration": {"windows": 2, "length": 32, "batch": 2},
         "transforms": [{"method": "gptq", "bits": 2, "group_size": 32}]},
        {"stage": "qat", "bits": 2, "group_size": 32, "estimator": "lsq+", "steps": 12,
         "alpha": 1.0, "temperature": 1.0},
    ],
}


def byte_tokenizer() -> tokenizers.Tokenizer:
    """Byte-level BPE with no merges: 256 ids, any text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)},
                                          merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def tiny():
    from jaxq.models.tokenizer import Tokenizer

    return tiny_params(CFG, scale=0.3), Tokenizer(byte_tokenizer())


def test_runner_quantize_then_qat(tiny, tmp_path):
    params, tok = tiny
    recipe = recipe_from_dict(RECIPE)
    res = run_pipeline(recipe, params, CFG, tok, tmp_path / "work", progress=False)
    losses = res.stages[1]["losses"]
    assert len(losses) == 12 and res.stages[1]["steps"] == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    w = res.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"]
    assert isinstance(w, QArray) and w.bits == 2 and w.group_size == 32
    # on held-out windows the trained QArrays are closer to the teacher than the GPTQ start
    ptq = _load_stage(tmp_path / "work" / "00-quantize" / "model", Model(params, CFG)).params
    tokens = train_windows(tok, 64, 32)[-8:]  # past the 12 x 4 windows it trained on
    fn = apply(llama.make_apply_fn(CFG))
    teacher = llama.make_apply_fn(CFG)(params, tokens)
    kl = [float(distill.forward_kl(fn(p, tokens), teacher)) for p in (ptq, res.params)]
    assert kl[1] < 0.9 * kl[0], kl
    # a second run finds every stage saved and returns the same model
    again = run_pipeline(recipe, params, CFG, tok, tmp_path / "work", progress=False)
    assert np.array_equal(again.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"]
                          .materialize(), w.materialize())
    assert again.stages[1]["losses"] == losses


def test_prune_stage_drops_blocks(tiny):
    """A prune stage takes any recipe method: drop_blocks (blocks chosen from the residual
    stream), and the config follows the params."""
    params, tok = tiny
    stage = {"stage": "prune", "calibration": {"windows": 2, "length": 32, "batch": 2,
                                               "mode": "collect"},
             "transforms": [{"method": "drop_blocks", "n": 1}]}
    out = _run_stage(Model(params, CFG), stage, {}, {"tokenizer": tok, "progress": False,
                                                     "calibration": {}}, None)
    assert out.config.num_layers == 1 and len(out.params["model"]["layers"]) == 1
    assert out.masks is None or not any(jax.tree.leaves(out.masks))


def test_quantize_stage_folds_awq_like_calibrate(tiny):
    """An AWQ quantize stage (collect mode) folds its scales into the norms and linears that
    feed each site, as jaxq.calibrate does: no weight keeps an input scale (which would cost
    bits/weight), and the result is calibrate's."""
    params, tok = tiny
    awq = {"method": "awq", "bits": 3, "group_size": 32,
           "then": {"method": "gptq", "bits": 3, "group_size": 32}}
    cal = {"windows": 2, "length": 32, "batch": 2, "mode": "collect"}
    stage = {"stage": "quantize", "calibration": cal, "transforms": [awq]}
    out = _run_stage(Model(params, CFG), stage, {}, {"tokenizer": tok, "progress": False,
                                                     "calibration": {}}, None)
    leaves = [x for x in jax.tree.leaves(out.params, is_leaf=lambda x: isinstance(x, QArray))
              if isinstance(x, QArray)]
    assert len(leaves) == 7 * CFG.num_layers, len(leaves)
    assert all(x.input_scale is None for x in leaves)
    from jaxq.calib import calibrate
    from jaxq.eval.data import window_batches
    from jaxq.recipes import build_transform

    batches = window_batches(train_windows(tok, 2, 32), 2)
    ref, _ = calibrate(llama.make_apply_fn(CFG), params, batches,
                       build_transform(awq, "test", CFG.head_dim), progress=False)
    a = out.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
    b = ref["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
    assert np.array_equal(np.asarray(a.packed), np.asarray(b.packed))


def test_masks_hold_pruned_weights_at_zero():
    w = jnp.asarray(np.arange(1.0, 17.0).reshape(4, 4) * np.tile([1, 0, 1, 0], (4, 1)))
    params = {"a": {"weight": w}, "dense": {"weight": jnp.ones((4, 4))}, "norm": jnp.ones(4)}
    masks = zero_masks(params)
    assert masks["dense"]["weight"] is None and masks["norm"] is None
    assert np.array_equal(np.asarray(masks["a"]["weight"]), np.asarray(w) != 0)
    moved = jax.tree.map(lambda x: x + 0.5, params)
    back = apply_masks(moved, masks)
    assert np.array_equal(np.asarray(back["a"]["weight"]) == 0, np.asarray(w) == 0)
    grad = jax.grad(lambda p: jnp.sum(apply_masks(p, masks)["a"]["weight"] ** 2))(moved)
    assert np.all(np.asarray(grad["a"]["weight"])[np.asarray(w) == 0] == 0)


def test_bad_stages_fail_at_load():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.stage'.*'qat'"):
        recipe_from_dict({"stages": [{"kind": "qat"}]})
    with pytest.raises(RecipeError, match="no option"):
        recipe_from_dict({"stages": [{"stage": "distill", "stepz": 3}]})
    with pytest.raises(RecipeError, match="unknown method"):
        recipe_from_dict({"stages": [{"stage": "quantize", "transforms": [{"method": "nope"}]}]})
    with pytest.raises(RecipeError, match="estimator"):
        recipe_from_dict({"stages": [{"stage": "qat", "estimator": "magic"}]})


@pytest.mark.parametrize("name", ["qat-kd-w3-g64", "qat-kd-w2-g64", "pkdq",
                                  "student-drop-blocks"])
def test_shipped_pipeline_recipes_load(name):
    if name == "pkdq" and "sparsegpt" not in METHODS:
        pytest.skip("SparseGPT (jaxq.prune) is not in this build")
    recipe = load_recipe(name)
    assert recipe.stages and not recipe.transforms


def test_cli_train(tiny, tmp_path, capsys, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path / "cache"))
    params, tok = tiny
    src = tmp_path / "tiny"
    src.mkdir()
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
    save_file(flat, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    (src / "tokenizer.json").write_text(byte_tokenizer().to_str())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(RECIPE))  # JSON is YAML
    recipe = recipe.with_suffix(".yaml")
    out = tmp_path / "out"
    argv = ["train", str(src), "--recipe", str(recipe), "--out", str(out), "--steps", "8",
            "--windows", "1", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stages"][1]["steps"] == 8
    assert res["stages"][1]["last_loss"] < res["stages"][1]["first_loss"]
    assert np.isfinite(res["perplexity"]) and "float_perplexity" in res
    assert (out / "manifest.json").is_file()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    kinds = {row["path"]: row["dtype"] for row in info["layers"]}
    assert kinds["model/layers/*/mlp/up_proj/weight"].startswith("affine 2-bit")
    # the work directory is kept: a rerun needs --resume, and then only evaluates
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6)
