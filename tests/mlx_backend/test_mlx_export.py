"""MLX export and import, verified in the real mlx-lm runtime (mlx[cpu] on Linux).

Each case exports a tiny llama, loads it with ``mlx_lm.load`` and checks logits (within 1e-2 of
jaxq's forward on the same dequantized weights) and 16 greedy tokens; the import goes the other
way and must give back the exported QArrays bit for bit.
"""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from _exportkit import (
    dequantized,
    export_llama,
    jaxq_greedy,
    jaxq_logits,
    prompt_ids,
    tiny_tokenizer,
)

import jaxq
from jaxq.core.qarray import QArray
from jaxq.export.common import ExportError, ExportWarning, flat_params
from mlx_backend.export import export_mlx, prepare_params, prepared_tree
from mlx_backend.load import is_mlx_dir, load_mlx_dir

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.mlx

def _mixed(params):
    """4-bit g64 by default; layer 0's o_proj 8-bit g32, layer 1's float; embedding 8-bit g64."""
    from jaxq.core.transform import chain
    from jaxq.core.tree import default_rule

    t = chain(jaxq.RTN(bits=8, group_size=32, scale_dtype=jnp.float16,
                       where=r"layers/0/self_attn/o_proj"),
              # float32 scales (jaxq's default is float16): MLX runs a quantized tied head in
              # its scales' dtype, and these tests compare logits to 1e-2; this also keeps a
              # model with mixed scale dtypes under test
              jaxq.RTN(bits=8, group_size=64, scale_dtype=jnp.float32,
                       where=lambda p, x: p.startswith("model/embed")),
              jaxq.RTN(bits=4, group_size=64, scale_dtype=jnp.float16,
                       where=lambda p, x: default_rule(p, x) and "layers/1/self_attn/o" not in p))
    return t(params)


def _mx(mode):
    def build(params):
        from jaxq.quant.float_formats import MX

        return MX(mode=mode)(params)
    return build


CASES = {
    "w4g64": lambda p: jaxq.RTN(bits=4, group_size=64, scale_dtype=jnp.float16)(p),
    "w3g32": lambda p: jaxq.RTN(bits=3, group_size=32, scale_dtype=jnp.float16)(p),
    "mixed": _mixed,
    "mxfp4": _mx("mxfp4"),
    "nvfp4": _mx("nvfp4"),
    "mxfp8": _mx("mxfp8"),
}


@pytest.fixture(scope="module")
def tiny():
    cfg, params = export_llama()
    return params, cfg


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """Every case exported once: {name: (dir, prepared params, prepared config, qparams)}."""
    params, cfg = tiny
    out = {}
    for name, build in CASES.items():
        qparams = build(params)
        path = tmp_path_factory.mktemp("mlx") / name
        export_mlx(qparams, cfg, tiny_tokenizer(), path)
        flat, pcfg, _ = prepare_params(qparams, cfg)
        out[name] = (path, prepared_tree(flat), pcfg, qparams)
    return out


def _check_runtime(path, params, cfg, steps=16):
    import mlx_lm

    from mlx_backend import verify

    model, tokenizer = mlx_lm.load(str(path))
    prompt = prompt_ids()
    assert tokenizer.encode(tiny_tokenizer().decode(prompt), add_special_tokens=False) == \
        prompt.tolist()
    got = verify.logits(model, prompt[None])[0]
    want = jaxq_logits(params, cfg, prompt)
    np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)
    assert verify.greedy(model, prompt, steps) == jaxq_greedy(params, cfg, prompt, steps)


@pytest.mark.parametrize("name", list(CASES))
def test_mlx_lm_runs_export(exported, name):
    path, params, cfg, _ = exported[name]
    _check_runtime(path, params, cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_import_is_bit_exact(exported, name):
    path, params, cfg, _ = exported[name]
    assert is_mlx_dir(path)
    loaded, lcfg, tok = load_mlx_dir(path)
    assert lcfg == cfg
    assert tok.encode("quick fox 123") == tiny_tokenizer().encode("quick fox 123")
    want, got = flat_params(params), flat_params(loaded)
    assert want.keys() == got.keys()
    for key, leaf in want.items():
        if isinstance(leaf, QArray):
            other = got[key]
            assert (other.bits, other.group_size, other.fmt) == (leaf.bits, leaf.group_size,
                                                                   leaf.fmt), key
            for field in ("packed", "scales", "biases"):
                a, b = getattr(leaf, field), getattr(other, field)
                assert (a is None) == (b is None), (key, field)
                if a is not None:
                    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(leaf))


def test_config_quantization_block(exported):
    cfg = json.loads((exported["mixed"][0] / "config.json").read_text())
    q = cfg["quantization"]
    assert q == cfg["quantization_config"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == \
        {"group_size": 64, "bits": 4, "mode": "affine"}
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.1.self_attn.o_proj"] is False
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "model.layers.0.mlp.up_proj" not in q
    assert cfg["tie_word_embeddings"] and cfg["rope_traditional"] is False
    assert json.loads((exported["mxfp4"][0] / "config.json").read_text())["quantization"] == \
        {"group_size": 32, "bits": 4, "mode": "mxfp4", "model.embed_tokens": False}


def test_rope_traditional_keeps_interleaved_rows(tiny, tmp_path):
    params, cfg = tiny
    q = CASES["w4g64"](params)
    export_mlx(q, cfg, tiny_tokenizer(), tmp_path / "trad", rope_traditional=True)
    assert json.loads((tmp_path / "trad" / "config.json").read_text())["rope_traditional"]
    _check_runtime(tmp_path / "trad", q, cfg, steps=4)
    loaded, lcfg, _ = load_mlx_dir(tmp_path / "trad")
    assert lcfg.rope_interleaved
    np.testing.assert_allclose(jaxq_logits(loaded, lcfg, prompt_ids()),
                               jaxq_logits(q, cfg, prompt_ids()), atol=1e-3)


def test_sharded_export(tiny, tmp_path):
    params, cfg = tiny
    q = CASES["w4g64"](params)
    export_mlx(q, cfg, tiny_tokenizer(), tmp_path / "sh", max_shard_bytes=60_000)
    shards = sorted(p.name for p in (tmp_path / "sh").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "sh" / "model.safetensors").exists()
    flat, pcfg, _ = prepare_params(q, cfg)
    _check_runtime(tmp_path / "sh", prepared_tree(flat), pcfg, steps=4)
    loaded, _, _ = load_mlx_dir(tmp_path / "sh")
    np.testing.assert_allclose(jaxq_logits(loaded, pcfg, prompt_ids()),
                               jaxq_logits(q, cfg, prompt_ids()), atol=1e-3)


def test_unrepresentable_layers_are_requantized_with_warning(tiny, tmp_path):
    """Act-order perm and 7-bit codes: dequantized, requantized, named in the warning."""
    params, cfg = tiny
    q = CASES["w4g64"](params)
    layer = q["model"]["layers"][0]["mlp"]
    w = np.asarray(params["model"]["layers"][0]["mlp"]["up_proj"]["weight"])
    perm = np.random.default_rng(0).permutation(w.shape[1])
    stored = jaxq.quantize(jnp.asarray(w[:, perm]), bits=4, group_size=32,
                           scale_dtype=jnp.float16)
    layer["up_proj"]["weight"] = QArray(
        packed=stored.packed, scales=stored.scales, biases=stored.biases, bits=4, group_size=32,
        size=stored.size, perm=jnp.asarray(perm, jnp.int32))
    layer["down_proj"]["weight"] = jaxq.quantize(
        params["model"]["layers"][0]["mlp"]["down_proj"]["weight"], bits=7, group_size=64)
    with pytest.warns(ExportWarning, match=r"mlp\.up_proj.*mlp\.down_proj|down_proj.*up_proj"):
        r = export_mlx(q, cfg, tiny_tokenizer(), tmp_path / "rq")
    assert sorted(r.requantized) == ["model.layers.0.mlp.down_proj.weight",
                                     "model.layers.0.mlp.up_proj.weight"]
    with pytest.warns(ExportWarning):  # the same layers, prepared again for the runtime check
        flat, pcfg, _ = prepare_params(q, cfg)
    assert flat["model.layers.0.mlp.down_proj.weight"].bits == 8
    _check_runtime(tmp_path / "rq", prepared_tree(flat), pcfg, steps=4)


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    params, cfg = tiny
    import mlx_backend.export as ex

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_weights", boom)
    with pytest.raises(OSError):
        export_mlx(params, cfg, tiny_tokenizer(), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "y").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_mlx(params, cfg, tiny_tokenizer(), tmp_path / "y")


def test_import_model_quantized_by_mlx_lm(tiny, tmp_path):
    """mlx-lm's own quantizer (mixed: down_proj 8-bit g32) -> jaxq -> same logits as mlx-lm."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    from mlx_backend import verify

    params, cfg = tiny
    export_mlx(params, cfg, tiny_tokenizer(), tmp_path / "float")
    assert not is_mlx_dir(tmp_path / "float")  # a float HF-order dir is an HF dir
    model, config = load_model(tmp_path / "float")

    def predicate(path, module):
        return {"group_size": 32, "bits": 8, "mode": "affine"} if "down_proj" in path else True

    model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
    save_model(tmp_path / "q", model)
    save_config(config, tmp_path / "q" / "config.json")
    assert is_mlx_dir(tmp_path / "q")
    loaded, lcfg, _ = load_mlx_dir(tmp_path / "q")
    down = loaded["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
    up = loaded["model"]["layers"][0]["mlp"]["up_proj"]["weight"]
    assert (down.bits, down.group_size, up.bits, up.group_size) == (8, 32, 4, 64)
    prompt = prompt_ids()
    np.testing.assert_allclose(jaxq_logits(loaded, lcfg, prompt),
                               verify.logits(model, prompt[None])[0], atol=1e-3)
    assert dequantized(loaded)["model"]["embed_tokens"]["weight"].shape == (cfg.vocab_size, 128)


def test_no_mlx_import_needed_for_export_and_load():
    import subprocess
    import sys

    code = ("import sys; import mlx_backend.export, mlx_backend.load, jaxq.export.gguf; "
            "sys.exit(int(any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_smollm2_w4g64_in_mlx_lm(smollm, tmp_path):
    """The real SmolLM2, W4 g64 with an 8-bit embedding: mlx-lm agrees with jaxq."""
    params, cfg, tok = smollm
    q = jaxq.RTN(bits=4, group_size=64, scale_dtype=jnp.float16)(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        export_mlx(q, cfg, tok, tmp_path / "smol")
    import mlx_lm

    from mlx_backend import verify

    model, mtok = mlx_lm.load(str(tmp_path / "smol"))
    prompt = np.asarray(tok.encode("The capital of France is"), np.int32)
    assert mtok.encode("The capital of France is", add_special_tokens=False) == prompt.tolist()
    np.testing.assert_allclose(verify.logits(model, prompt[None])[0],
                               jaxq_logits(q, cfg, prompt), atol=1e-2, rtol=0)
    assert verify.greedy(model, prompt, 16) == jaxq_greedy(q, cfg, prompt, 16)


@pytest.mark.parametrize("name", ["mixed", "mxfp4", "nvfp4"])
def test_mlx_dequantized_path_matches_quantized(exported, name):
    """The benchmark's fast path (weights dequantized by mlx to float32) == quantized matmuls."""
    from mlx_backend import verify

    path = exported[name][0]
    prompt = prompt_ids()[None]
    quantized = verify.logits(verify.load(path), prompt)
    dense = verify.logits(verify.dequantize_model(verify.load(path)), prompt)
    np.testing.assert_allclose(dense, quantized, atol=1e-4, rtol=0)
