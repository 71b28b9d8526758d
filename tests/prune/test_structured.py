"""Structured pruning: scores, refit and plan against numpy; a tiny llama shrinks exactly as
claimed, keeps its logits when nothing is removed, equals the zeroed-unit model, drops a
do-nothing block; the pruned model round-trips through GGUF, MLX directories and the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.calib import collect_stats
from jaxq.models.llama import check_params, forward, param_count
from jaxq.models.structure import (
    BLOCKS,
    LAYER_PARAMS,
    SCORE_SITES,
    config_for_params,
    llama_block_distances,
    llama_units,
)
from jaxq.prune.structured import (
    DropBlocks,
    Slice,
    StructuredPrune,
    UnitGroup,
    angular_distances,
    choose_blocks,
    contribution_scores,
    kept_units,
    plan_counts,
    refit_columns,
    resolve_blocks,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from _exportkit import export_llama, prompt_ids, tiny_tokenizer  # noqa: E402
from _tinyllama import tiny_config, tiny_params  # noqa: E402

CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=6, head_dim=8, tie_word_embeddings=True)


@functools.cache
def tiny():
    params = tiny_params(CFG, scale=0.1)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, CFG.vocab_size)
    return params, tokens


def prune(params, cfg, tokens, **kw):
    kw.setdefault("units", functools.partial(llama_units, head_dim=cfg.head_dim))
    t = StructuredPrune(where=SCORE_SITES, of=LAYER_PARAMS, **kw)
    stats, _ = collect_stats(lambda p, x: forward(p, x, cfg), params, [(tokens,)], [t],
                             progress=False)
    return t, stats


# --- the math against numpy ---------------------------------------------------------------------

def test_contribution_scores_are_output_norms():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(50, 12)), rng.normal(size=(7, 12))
    for width in (1, 3, 4):
        got = contribution_scores(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32),
                                  width)
        want = [np.sum((x[:, u * width:(u + 1) * width] @ w[:, u * width:(u + 1) * width].T) ** 2)
                for u in range(12 // width)]
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_refit_is_least_squares_and_beats_plain_removal():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10))  # correlated inputs
    w = rng.normal(size=(5, 10))
    keep = np.array([0, 2, 3, 7, 9])
    got = np.asarray(refit_columns(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32),
                                   jnp.asarray(keep), 1e-7), np.float64)
    want = np.linalg.lstsq(x[:, keep], x @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)

    def err(wk):
        return np.sum((x[:, keep] @ wk.T - x @ w.T) ** 2)

    assert err(got) <= 1.001 * err(want) and err(got) < 0.9 * err(w[:, keep])


def test_kept_units_per_class():
    scores = np.array([5, 1, 3, 0, 9, 8, 2, 7, 4.0])
    assert kept_units(scores, 2, 3).tolist() == [0, 2, 4, 5, 7, 8]
    assert kept_units(scores, 9).tolist() == list(range(9))
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        kept_units(scores, 4, 3)


def _groups(kind, n, classes=1, layers=2):
    s = Slice(f"{kind}/w", 1, 1)
    return [UnitGroup(kind=kind, name=f"{kind}{i}", n=n, slices=(s,), score=s, classes=classes)
            for i in range(layers)]


def test_plan_trades_kinds_by_importance_per_parameter():
    heads, neurons = _groups("h", 4, classes=2), _groups("n", 8)
    sizes = {**{g.name: 10 for g in heads}, **{g.name: 1 for g in neurons}}
    cheap_neurons = {**{g.name: np.full(4, 100.0) for g in heads},
                     **{g.name: np.arange(8.0) for g in neurons}}
    # 10 parameters: five neurons a layer (cost 2 x (0+1+2+3+4)) beat a head a layer (200)
    assert plan_counts(heads + neurons, cheap_neurons, sizes, 10) == {"h": 4, "n": 3}
    # 20 parameters need one head per class per layer (40): all neurons (56) are dearer
    assert plan_counts(heads + neurons, cheap_neurons, sizes, 40) == {"h": 2, "n": 8}
    assert plan_counts(heads + neurons, cheap_neurons, sizes, 10, kinds=["h"]) == {"h": 2, "n": 8}
    assert plan_counts(heads + neurons, cheap_neurons, sizes, 3, multiples={"n": 4}) == \
        {"h": 4, "n": 4}
    with pytest.raises(ValueError, match="no uniform shrink"):
        plan_counts(heads + neurons, cheap_neurons, sizes, 10**6)


def test_angular_distances_and_block_choice():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(4, 3, 5, 6))
    flat = h.reshape(4, 15, 6)
    unit = flat / np.linalg.norm(flat, axis=-1, keepdims=True)
    want = np.arccos(np.clip(np.einsum("itd,jtd->ijt", unit, unit), -1, 1)).sum(-1) / np.pi
    np.testing.assert_allclose(angular_distances(jnp.asarray(h, jnp.float32)), want, atol=2e-3)
    d = np.array([[0, .5, .6, .9], [.5, 0, .1, .7], [.6, .1, 0, .2], [.9, .7, .2, 0]])
    assert choose_blocks(d, 1) == (1,)
    assert choose_blocks(d, 2) == (0, 1)  # d[0, 2] = .6 < d[1, 3] = .7
    assert choose_blocks(d, 2, contiguous=False) == (1, 2)
    with pytest.raises(ValueError, match="cannot drop 3 of 3"):
        choose_blocks(d, 3)


# --- a tiny llama ---------------------------------------------------------------------------------

def test_shrinks_exactly_as_planned_and_config_follows():
    params, tokens = tiny()
    t, stats = prune(params, CFG, tokens, fraction=0.3)
    _, _, keep = t.plan(params, stats)
    pruned = t(params, stats=stats)
    cfg = config_for_params(pruned, CFG)
    assert check_params(pruned, cfg) == []
    assert (cfg.num_heads, cfg.intermediate_size) == (keep["heads"], keep["neurons"])
    assert cfg.num_kv_heads == CFG.num_kv_heads and cfg.head_dim == CFG.head_dim
    d, hd = CFG.hidden_size, CFG.head_dim
    removed = CFG.num_layers * ((CFG.num_heads - cfg.num_heads) * 2 * hd * d
                                + (CFG.intermediate_size - cfg.intermediate_size) * 3 * d)
    assert param_count(params) - param_count(pruned) == removed
    layer_params = sum(int(np.size(x)) for x in jax.tree.leaves(params["model"]["layers"]))
    assert removed >= 0.3 * layer_params
    assert forward(pruned, tokens, cfg).shape == (4, 16, CFG.vocab_size)


def test_keeping_everything_is_the_identity():
    params, tokens = tiny()
    t, stats = prune(params, CFG, tokens, fraction=0.0)
    pruned = t(params, stats=stats)
    assert config_for_params(pruned, CFG) == CFG
    np.testing.assert_array_equal(forward(pruned, tokens, CFG), forward(params, tokens, CFG))


def _zeroed(params, cfg, heads_keep, neurons_keep):
    """The unpruned model with the dropped units' output columns zeroed."""
    layers = []
    for layer, hk, nk in zip(params["model"]["layers"], heads_keep, neurons_keep, strict=True):
        hmask = np.zeros(cfg.num_heads)
        hmask[hk] = 1
        nmask = np.zeros(cfg.intermediate_size)
        nmask[nk] = 1
        o = layer["self_attn"]["o_proj"]["weight"] * np.repeat(hmask, cfg.head_dim)
        down = layer["mlp"]["down_proj"]["weight"] * nmask
        layers.append({**layer, "self_attn": {**layer["self_attn"], "o_proj": {"weight": o}},
                       "mlp": {**layer["mlp"], "down_proj": {"weight": down}}})
    return {**params, "model": {**params["model"], "layers": layers}}


@pytest.mark.parametrize("interleaved", [False, True])
def test_pruned_model_equals_the_model_with_its_units_zeroed(interleaved):
    """Slicing q/o by head (GQA: each kept query head still reads its own KV head) and
    gate/up/down by neuron is exactly zeroing those units' output columns."""
    params, tokens = tiny()
    cfg = dataclasses.replace(CFG, rope_interleaved=interleaved)
    t, stats = prune(params, cfg, tokens, fraction=0.6, compensate=False)
    groups, scores, keep = t.plan(params, stats)
    assert keep["heads"] < cfg.num_heads  # the case exercises heads and neurons
    assert keep["neurons"] < cfg.intermediate_size
    pruned = t(params, stats=stats)
    kept = {g.name: kept_units(scores[g.name], keep[g.kind] // g.classes, g.classes)
            for g in groups}
    n = cfg.num_layers
    ref = _zeroed(params, cfg, [kept[f"model/layers/{i}/self_attn"] for i in range(n)],
                  [kept[f"model/layers/{i}/mlp"] for i in range(n)])
    np.testing.assert_allclose(forward(pruned, tokens, config_for_params(pruned, cfg)),
                               forward(ref, tokens, cfg), atol=2e-5)


def test_least_important_head_costs_less_than_the_most_important():
    params, tokens = tiny()
    o = params["model"]["layers"][1]["self_attn"]["o_proj"]["weight"]
    scale = np.ones(CFG.num_heads)
    scale[[1, 4]] = [0.05, 5.0]  # head 1 whispers, head 4 shouts
    layers = list(params["model"]["layers"])
    attn = {**layers[1]["self_attn"], "o_proj": {"weight": o * np.repeat(scale, CFG.head_dim)}}
    layers[1] = {**layers[1], "self_attn": attn}
    params = {**params, "model": {**params["model"], "layers": layers}}
    t, stats = prune(params, CFG, tokens, fraction=0.0)
    groups, scores, _ = t.plan(params, stats)
    g = next(g for g in groups if g.name == "model/layers/1/self_attn")
    s = np.asarray(scores[g.name])
    assert s.argmin() == 1 and s.argmax() == 4
    base = forward(params, tokens, CFG)
    everything = [np.arange(CFG.num_heads)] * CFG.num_layers
    neurons = [np.arange(CFG.intermediate_size)] * CFG.num_layers

    def change(drop):  # removing a head is zeroing its columns of o_proj (test above)
        heads = list(everything)
        heads[1] = np.array([h for h in range(CFG.num_heads) if h != drop])
        return float(jnp.linalg.norm(forward(_zeroed(params, CFG, heads, neurons), tokens, CFG)
                                     - base))

    assert change(1) < 0.2 * change(4)


def test_a_do_nothing_block_is_the_one_dropped():
    params, tokens = tiny()
    layers = list(params["model"]["layers"])
    zero = {"weight": jnp.zeros_like(layers[1]["self_attn"]["o_proj"]["weight"])}
    layers[1] = {**layers[1], "self_attn": {**layers[1]["self_attn"], "o_proj": zero},
                 "mlp": {**layers[1]["mlp"],
                         "down_proj": {"weight": 0 * layers[1]["mlp"]["down_proj"]["weight"]}}}
    params = {**params, "model": {**params["model"], "layers": layers}}
    d = llama_block_distances(params, CFG, [(tokens,)])
    t = resolve_blocks(DropBlocks(n=1, blocks=BLOCKS), d)
    assert t.drop == (1,)
    pruned = t(params)
    cfg = config_for_params(pruned, CFG)
    assert cfg.num_layers == 2 and check_params(pruned, cfg) == []
    np.testing.assert_allclose(forward(pruned, tokens, cfg), forward(params, tokens, CFG),
                               atol=1e-5)
    with pytest.raises(ValueError, match="no blocks chosen"):
        DropBlocks(n=1, blocks=BLOCKS)(params)


def test_quantized_weights_are_refused():
    import jaxq

    params, tokens = tiny()
    t, stats = prune(params, CFG, tokens, fraction=0.6)
    with pytest.raises(ValueError, match="prune before quantizing"):
        t(jaxq.RTN(bits=4, group_size=8)(params), stats=stats)


# --- the pruned model in other runtimes -----------------------------------------------------------

@functools.cache
def pruned_tiny():
    """The export kit's tiny llama (GQA, interleaved RoPE, tied head) with half its layer
    parameters pruned: ``hidden_size != num_heads * head_dim`` afterwards."""
    cfg, params = export_llama()
    tokens = jnp.asarray(tiny_tokenizer().encode(TEXT_PROMPT)[:96], jnp.int32)[None]
    t, stats = prune(params, cfg, tokens, fraction=0.5, multiples={"neurons": 32})
    pruned = t(params, stats=stats)
    pcfg = config_for_params(pruned, cfg)
    assert pcfg.num_heads * pcfg.head_dim != pcfg.hidden_size, pcfg
    return pruned, pcfg


TEXT_PROMPT = "the quick brown fox jumps over the lazy dog. 12 cats and 345 dogs ran home. " * 4


def _logits(params, cfg):
    return np.asarray(forward(params, jnp.asarray(prompt_ids())[None], cfg))[0]


def test_gguf_round_trip_of_a_pruned_model(tmp_path):
    from jaxq.export.gguf import export_gguf
    from jaxq.models import load_gguf

    pruned, cfg = pruned_tiny()
    export_gguf(pruned, cfg, tiny_tokenizer(), tmp_path / "p.gguf", float_type="f32")
    params, lcfg, _ = load_gguf(tmp_path / "p.gguf")
    assert (lcfg.num_heads, lcfg.num_kv_heads, lcfg.head_dim, lcfg.intermediate_size) == \
        (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    np.testing.assert_allclose(_logits(params, lcfg), _logits(pruned, cfg), atol=1e-4)


@pytest.mark.slow
def test_llama_cpp_runs_a_pruned_model(tmp_path):
    """llama.cpp reads head_dim from attention.key_length when it differs from hidden/heads."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from jaxq.export import llamacpp
    from jaxq.export.gguf import export_gguf

    pruned, cfg = pruned_tiny()
    export_gguf(pruned, cfg, tiny_tokenizer(), tmp_path / "p.gguf", float_type="f32")
    llm = llamacpp.load(tmp_path / "p.gguf", n_ctx=64, threads=2)
    want = _logits(pruned, cfg)
    got = llamacpp.window_logits(llm, prompt_ids())
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_mlx_directory_round_trip_of_a_pruned_model(tmp_path):
    from mlx_backend.export import export_mlx
    from mlx_backend.load import load_mlx_dir

    pruned, cfg = pruned_tiny()
    export_mlx(pruned, cfg, tiny_tokenizer(), tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (written["num_attention_heads"], written["head_dim"], written["intermediate_size"]) \
        == (cfg.num_heads, cfg.head_dim, cfg.intermediate_size)
    params, lcfg, _ = load_mlx_dir(tmp_path / "m")
    assert lcfg.head_dim == cfg.head_dim and lcfg.num_heads == cfg.num_heads
    np.testing.assert_allclose(_logits(params, lcfg), _logits(pruned, cfg), atol=1e-4)


@pytest.mark.mlx
def test_mlx_lm_runs_a_pruned_model(tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx_lm

    from mlx_backend import verify
    from mlx_backend.export import export_mlx

    pruned, cfg = pruned_tiny()
    export_mlx(pruned, cfg, tiny_tokenizer(), tmp_path / "m")
    model, _ = mlx_lm.load(str(tmp_path / "m"))
    got = verify.logits(model, prompt_ids()[None])[0]
    np.testing.assert_allclose(got, _logits(pruned, cfg), atol=1e-2, rtol=0)


@pytest.mark.slow
def test_cli_compress_eval_generate_export(tmp_path, capsys, monkeypatch):
    """``jaxq compress`` with a structured recipe saves the shrunk config; the directory
    evaluates, generates, and exports to GGUF and MLX with the same logits."""
    from jaxq.cli import load_any, main
    from jaxq.export.gguf import export_gguf
    from jaxq.models import load_gguf

    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path / "cache"))
    cfg, params = export_llama()
    export_gguf(params, cfg, tiny_tokenizer(), tmp_path / "src.gguf", float_type="f32")
    (tmp_path / "r.yaml").write_text(
        "name: t\ncalibration: {windows: 2, length: 64, batch: 2, mode: collect}\n"
        "transforms:\n  - {method: structured, fraction: 0.5, multiples: {neurons: 32}}\n"
        "  - {method: drop_blocks, n: 1}\n")

    def run(*argv):
        assert main([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    res = run("compress", str(tmp_path / "src.gguf"), "--recipe", str(tmp_path / "r.yaml"),
              "--out", str(tmp_path / "o"), "--windows", "1")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())["metadata"]["config"]
    assert manifest["num_layers"] == 1 and manifest["num_heads"] < cfg.num_heads
    assert manifest["head_dim"] == cfg.head_dim and res["params"] < param_count(params)
    assert np.isfinite(run("eval", str(tmp_path / "o"), "--windows", "1")["perplexity"])
    assert len(run("generate", str(tmp_path / "o"), "--prompt", "the quick", "--max-tokens",
                   "3")["tokens"]) <= 3
    run("export", str(tmp_path / "o"), "--to", "gguf", "--out", str(tmp_path / "o.gguf"),
        "--float-type", "f32")
    run("export", str(tmp_path / "o"), "--to", "mlx", "--out", str(tmp_path / "o-mlx"))
    m = load_any(str(tmp_path / "o"))
    want = _logits(m.params, m.config)
    params, gcfg, _ = load_gguf(tmp_path / "o.gguf")
    np.testing.assert_allclose(_logits(params, gcfg), want, atol=1e-4)
    mm = load_any(str(tmp_path / "o-mlx"))
    np.testing.assert_allclose(_logits(mm.params, mm.config), want, atol=1e-4)
