"""Every shipped recipe loads by name (dots included) and builds its transforms."""

import pytest
from _tinyllama import tiny_llama

from jaxq.core.transform import Transform
from jaxq.recipes import RecipeError, available, load_recipe


@pytest.mark.parametrize("name", available())
def test_shipped_recipe_builds(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert isinstance(recipe.build(head_dim=64), Transform)
    assert recipe.calibration_mode in ("sequential", "collect")


def test_a_dotted_name_is_a_shipped_recipe_not_a_path():
    assert load_recipe("mixed-3.5").transforms[0]["budget_bpw"] == 3.5
    with pytest.raises(RecipeError, match="unknown recipe 'w9.5'"):
        load_recipe("w9.5")


@pytest.fixture(scope="module")
def tiny_model():
    cfg, params = tiny_llama(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=32)
    return params, cfg, None


def test_run_applies_a_plain_recipe_and_reports(tiny_model):
    from jaxq.recipes import run

    r = run(tiny_model, "w4-g32", progress=False)
    q = r.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"]
    assert q.bits == 4 and q.group_size == 32
    assert r.params["model"]["embed_tokens"]["weight"].bits == 8  # the recipe's embedding rule
    assert r.timings["total"] >= r.timings["transform"] > 0 and r.calibration is None


@pytest.mark.slow  # ~25 s on 2 cores: GPTQ and AWQ compile
def test_run_calibrates_with_given_windows_in_both_modes(tiny_model):
    """A sequential (GPTQ) and a collect (AWQ + GPTQ) recipe on windows the caller brings; the
    result differs from plain RTN, so calibration really ran."""
    import jax.numpy as jnp
    import numpy as np

    from jaxq.recipes import RecipeError, run

    windows = np.random.default_rng(0).integers(0, 64, (4, 16))
    params = tiny_model[0]
    w = params["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
    rtn = run(tiny_model, "w4-g32", progress=False).params
    for name in ("gptq-w4-g32", "awq-gptq-w4-g32"):
        r = run(tiny_model, name, calibration=windows, progress=False)
        assert r.calibration["windows"] == 4 and r.timings["calibrate"] > 0
        q = r.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
        q_rtn = rtn["model"]["layers"][0]["mlp"]["down_proj"]["weight"]
        assert not np.array_equal(np.asarray(q.materialize()), np.asarray(q_rtn.materialize()))
        assert float(jnp.abs(q.materialize() - w).max()) < 0.5 * float(jnp.abs(w).max())
    with pytest.raises(ValueError, match="no tokenizer"):
        run(tiny_model, "gptq-w4-g32", progress=False)
    with pytest.raises(RecipeError, match="calibration mode"):
        run(tiny_model, "gptq-w4-g32", calibration={"mode": "nope"}, progress=False)
