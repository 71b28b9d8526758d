"""No silent NaN: NaN/Inf in a model's weights, in compressed scales, in calibration statistics,
in eval logits and in exports is one error line naming the tensor (exit 2, nothing written),
unless --allow-nonfinite (allow_nonfinite=True) lets it through with a warning."""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from _probe import expect_clear_error, tiny_gguf

from jaxq.cli import main
from jaxq.core.finite import NonFiniteWarning

UP = "model/layers/0/mlp/up_proj/weight"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """The float-baseline cache away from the watched directory."""
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@functools.cache
def _edited_bytes(edit: tuple[tuple[str, tuple | None, float], ...]) -> bytes:
    """The tiny GGUF with ``(path, index or None for all, value)`` edits, as bytes."""
    import tempfile

    import jax.numpy as jnp

    from jaxq.export.gguf import export_gguf
    from jaxq.models.default import load_model

    with tempfile.TemporaryDirectory() as d:
        params, cfg, tok = load_model(str(tiny_gguf(Path(d) / "src.gguf")))
        for path, index, value in edit:
            node = params
            *parents, last = path.split("/")
            for key in parents:
                node = node[int(key) if key.isdigit() else key]
            w = np.array(node[last])
            if index is None:
                w *= value
            else:
                w[index] = value
            node[last] = jnp.asarray(w)
        out = Path(d) / "bad.gguf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            export_gguf(params, cfg, tok, out, float_type="f32", allow_nonfinite=True)
        return out.read_bytes()


def edited_gguf(path: Path, *edits: tuple[str, tuple | None, float]) -> Path:
    """A tiny GGUF source whose weights are edited: ``(leaf path, index, value)`` sets one
    value; ``(leaf path, None, factor)`` scales the whole leaf."""
    path.write_bytes(_edited_bytes(tuple(edits)))
    return path


def _run_json(capsys, argv: list[str]) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else {}, out.err


# --- the input model -------------------------------------------------------------------------

@pytest.mark.bad_input
def test_eval_nan_weight(tmp_path, capsys):
    """eval of a model with a NaN weight -> names the tensor and the first bad index"""
    src = edited_gguf(tmp_path / "nan.gguf", (UP, (3, 5), np.nan))
    line = expect_clear_error(["eval", str(src), "--windows", "1"], UP, "1 NaN", "[3, 5]",
                              "--allow-nonfinite", capsys=capsys, watch=[tmp_path])
    assert line.startswith(f"jaxq: error: weight {UP}:")


@pytest.mark.bad_input
def test_compress_inf_weight(tmp_path, capsys):
    """compress of a model with an Inf norm weight -> names the tensor, nothing saved"""
    norm = "model/layers/1/post_attention_layernorm/weight"
    src = edited_gguf(tmp_path / "inf.gguf", (norm, (7,), np.inf))
    expect_clear_error(["compress", str(src), "--recipe", "w4-g64", "--out",
                        str(tmp_path / "out"), "--no-eval"], norm, "1 Inf", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_export_nan_weight(tmp_path, capsys):
    """export (gguf, mlx) of a NaN weight -> names the tensor, nothing written"""
    src = edited_gguf(tmp_path / "nan.gguf", (UP, (3, 5), np.nan))
    for to, out in (("gguf", tmp_path / "o.gguf"), ("mlx", tmp_path / "o-mlx")):
        expect_clear_error(["export", str(src), "--to", to, "--out", str(out)], UP, "NaN",
                           capsys=capsys, watch=[tmp_path])


# --- produced scales -------------------------------------------------------------------------

@pytest.mark.bad_input
def test_compress_1e30_weight_float16_scales(tmp_path, capsys):
    """a 1e30 weight, w4-g64's float16 scales -> names the tensor's scales past float16's range"""
    src = edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e30))
    expect_clear_error(["compress", str(src), "--recipe", "w4-g64", "--out",
                        str(tmp_path / "out")], f"{UP}/scales", "1 Inf", "float16",
                       "scale_dtype float32", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
@pytest.mark.parametrize("recipe", ["w4-g64", "nf4"])
def test_compress_1e6_weight_float16_scales(tmp_path, capsys, recipe):
    """a 1e6 weight, w4-g64 / nf4 float16 scales -> names the tensor's scales past 65504"""
    src = edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e6))
    expect_clear_error(["compress", str(src), "--recipe", recipe, "--out",
                        str(tmp_path / "out"), "--no-eval"], f"{UP}/scales", "65504",
                       capsys=capsys, watch=[tmp_path])


def test_compress_allow_nonfinite_saves_with_a_warning_and_valid_json(tmp_path, capsys):
    src = edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e30))
    out = tmp_path / "out"
    code, result, err = _run_json(capsys, ["compress", str(src), "--recipe", "w4-g64", "--out",
                                           str(out), "--no-eval", "--allow-nonfinite"])
    assert code == 0, err
    assert err.count("jaxq: warning:") == 1, err
    assert f"jaxq: warning: compressed weight {UP}/scales: 1 Inf" in err
    assert result["out"] == str(out) and (out / "manifest.json").is_file()
    # ...and the saved model is refused by eval and export until allowed again.
    expect_clear_error(["eval", str(out), "--windows", "1"], f"{UP}/scales", capsys=capsys)
    expect_clear_error(["export", str(out), "--to", "gguf", "--out", str(tmp_path / "o.gguf")],
                       f"{UP}/scales", capsys=capsys, watch=[tmp_path])


# --- calibration statistics (GPTQ) -----------------------------------------------------------

def _gptq(tmp_path: Path, scale_dtype: str) -> Path:
    recipe = tmp_path / f"gptq-{scale_dtype}.yaml"
    recipe.write_text(f"name: gptq-{scale_dtype}\ncalibration: {{mode: sequential}}\n"
                      "transforms:\n"
                      f"  - {{method: gptq, bits: 4, group_size: 64, scale_dtype: {scale_dtype},"
                      " where: 'layers/0/mlp/(up|down)_proj'}\n")
    return recipe


def _windows() -> np.ndarray:
    return np.random.RandomState(0).randint(3, 300, (1, 16))


def _one_block(path: Path):
    """The edited model cut to its first block: calibration compiles half as much."""
    import dataclasses

    from jaxq.models.default import load_model

    params, cfg, tok = load_model(str(path))
    params["model"]["layers"] = params["model"]["layers"][:1]
    return params, dataclasses.replace(cfg, num_layers=1), tok


@pytest.mark.bad_input
def test_gptq_names_the_layer_at_fault_not_the_next(tmp_path):
    """GPTQ f16 on a 1e30 up_proj -> names up_proj's Inf scales, not down_proj's Cholesky"""
    from jaxq.recipes import run

    model = _one_block(edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e30)))
    recipe = _gptq(tmp_path, "float16")
    line = expect_clear_error(lambda: run(model, recipe, calibration=_windows(),
                                          progress=False), f"{UP}/scales", watch=[tmp_path])
    assert "down_proj" not in line and "Cholesky" not in line


@pytest.mark.slow
@pytest.mark.bad_input
def test_gptq_names_the_layer_whose_gram_overflows(tmp_path):
    """GPTQ f32 on a 1e30 up_proj -> names down_proj, whose input's Gram overflows"""
    from jaxq.recipes import run

    model = _one_block(edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e30)))
    recipe = _gptq(tmp_path, "float32")
    line = expect_clear_error(lambda: run(model, recipe, calibration=_windows(),
                                          progress=False),
                              "the input of layer model/layers/0/mlp/down_proj/weight",
                              "calibration statistic gram", "Inf", watch=[tmp_path])
    assert "Cholesky" not in line


@pytest.mark.bad_input
def test_calibrate_nan_activation_names_the_first_site():
    """calibrate() on a batch holding NaN -> names the first layer whose input is NaN"""
    import jax.numpy as jnp

    import jaxq

    params = {"a": {"w": jnp.ones((16, 32)) / 16}, "b": {"w": jnp.ones((32, 8)) / 32}}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["a"]["w"]) @ p["b"]["w"]

    x = jnp.ones((4, 16)).at[2, 7].set(jnp.nan)
    expect_clear_error(lambda: jaxq.calibrate(apply_fn, params, [x],
                                              jaxq.quant.GPTQ(bits=4, group_size=16),
                                              progress=False),
                       "the input of layer a/w", "gram", "NaN")


# --- outputs ---------------------------------------------------------------------------------

@pytest.mark.bad_input
def test_eval_nan_logits_from_finite_weights(tmp_path, capsys):
    """eval, finite weights whose q.k overflows (x 1e20) -> names the NaN logits' window"""
    src = edited_gguf(tmp_path / "qk.gguf", ("model/layers/0/self_attn/q_proj/weight", None, 1e20),
                      ("model/layers/0/self_attn/k_proj/weight", None, 1e20))
    expect_clear_error(["eval", str(src), "--windows", "1"], "logits of window 0",
                       "position", capsys=capsys, watch=[tmp_path])


def test_eval_nan_model_allowed_prints_valid_json(tmp_path, capsys):
    src = edited_gguf(tmp_path / "nan.gguf", (UP, (3, 5), np.nan))
    code, result, err = _run_json(capsys, ["eval", str(src), "--windows", "1",
                                           "--allow-nonfinite"])
    assert code == 0, err
    assert result["perplexity"] == "nan" and result["nll"] == "nan"
    assert err.count("jaxq: warning:") == 2, err  # the weight, then the logits


def test_eval_huge_nll_reports_inf_perplexity(tmp_path, capsys):
    """Finite logits of 1e30: the NLL is finite but exp of it is not a float; ppl is inf."""
    src = edited_gguf(tmp_path / "hot.gguf", ("model/norm/weight", None, 1e30))
    code, result, err = _run_json(capsys, ["eval", str(src), "--windows", "1"])
    assert code == 0, err
    assert result["perplexity"] == "inf"
    assert 1e20 < result["nll"] < 1e38 and math.isfinite(result["nll"])


@pytest.mark.bad_input
def test_export_gguf_float16_overflow(tmp_path, capsys):
    """export --to gguf of a 1e6 weight as float16 -> names the GGUF tensor past 65504"""
    src = edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e6))
    expect_clear_error(["export", str(src), "--to", "gguf", "--out", str(tmp_path / "o.gguf")],
                       "GGUF tensor blk.0.ffn_up.weight", "65504", capsys=capsys,
                       watch=[tmp_path])
    capsys.readouterr()
    assert main(["export", str(src), "--to", "gguf", "--out", str(tmp_path / "o.gguf"),
                 "--float-type", "f32", "--json"]) == 0


@pytest.mark.bad_input
def test_export_gguf_block_scales_past_float16(tmp_path):
    """export_gguf() of float32 scales past float16's range -> names the GGUF block scales"""
    import jax.numpy as jnp

    import jaxq
    from jaxq.core.finite import first_nonfinite
    from jaxq.export.gguf import export_gguf
    from jaxq.models.default import load_model

    params, cfg, tok = load_model(str(edited_gguf(tmp_path / "big.gguf", (UP, (3, 5), 1e30))))
    q = jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float32, where="up_proj")(params)
    assert first_nonfinite(q) is None  # finite as jaxq stores it
    expect_clear_error(lambda: export_gguf(q, cfg, tok, tmp_path / "o.gguf"),
                       "GGUF tensor blk.0.ffn_up.weight/scales", "Inf", watch=[tmp_path])
