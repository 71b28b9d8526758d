"""Bad recipes: every key is checked against the schema before a model is loaded.

The CLI cases give a model path that does not exist: were the recipe read after the model, the
error would name the missing model instead of the recipe key."""

from __future__ import annotations

from pathlib import Path

import pytest
from _probe import expect_clear_error, tiny_gguf

from jaxq.recipes import METHODS, RecipeError, available, load_recipe, recipe_from_dict
from jaxq.recipes.schema import RULES, method_fields


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _compress(tmp_path: Path, text: str, model: str | None = None) -> list[str]:
    r = _recipe(tmp_path, text)
    return ["compress", model or str(tmp_path / "missing.gguf"), "--recipe", str(r),
            "--out", str(tmp_path / "out")]


def _rtn(fields: str) -> str:
    return f"name: t\ntransforms:\n  - {{method: rtn, {fields}}}\n"


def _gptq(fields: str = "", cal: str = "{windows: 2, length: 64}") -> str:
    return (f"name: t\ncalibration: {cal}\ntransforms:\n"
            f"  - {{method: gptq, bits: 4{', ' if fields else ''}{fields}}}\n")


@pytest.mark.bad_input
def test_bits_true(tmp_path, capsys):
    """`bits: true` (Python reads 1) -> names the key: expected an integer 1-8, got true."""
    line = expect_clear_error(_compress(tmp_path, _rtn("bits: true")), "r.yaml",
                              "transforms[0].bits", "got true", capsys=capsys, watch=[tmp_path])
    assert "an integer 1-8" in line


@pytest.mark.bad_input
def test_group_size_true(tmp_path, capsys):
    """`group_size: true` (groups of one) -> names the key: expected a positive integer."""
    expect_clear_error(_compress(tmp_path, _rtn("bits: 4, group_size: true")), "r.yaml",
                       "transforms[0].group_size", "got true", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_group_size_zero(tmp_path, capsys):
    """`group_size: 0` (was a traceback) -> names the key: expected a positive integer."""
    expect_clear_error(_compress(tmp_path, _rtn("bits: 4, group_size: 0")), "r.yaml",
                       "transforms[0].group_size", "got 0", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_bits_out_of_range_before_loading(tmp_path, capsys):
    """`bits: 9` (was caught after loading the model) -> names the key before loading."""
    expect_clear_error(_compress(tmp_path, _rtn("bits: 9")), "transforms[0].bits", "got 9",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_empty_transforms(tmp_path, capsys):
    """`transforms: []` (saved the model uncompressed) -> names the key: non-empty list."""
    expect_clear_error(_compress(tmp_path, "name: t\ntransforms: []\n"), "r.yaml",
                       "'transforms'", "non-empty", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_where_matching_nothing(tmp_path, capsys):
    """a `where` that matches no parameter -> names the regex; nothing saved."""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    expect_clear_error(_compress(tmp_path, _rtn("bits: 4, where: no_such_layer"), str(src)),
                       "no_such_layer", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_key_typo_suggests(tmp_path, capsys):
    """a misspelt transform key (`bitz`) -> names the key and suggests the closest one ('bits')."""
    expect_clear_error(_compress(tmp_path, _rtn("bitz: 4")), "transforms[0].bitz",
                       "did you mean 'bits'", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_top_level_typo_suggests(tmp_path, capsys):
    """a misspelt top-level key (`calibrtion`, was ignored) -> names it, suggests 'calibration'."""
    text = "name: t\ncalibrtion: {windows: 2}\ntransforms:\n  - {method: gptq, bits: 4}\n"
    expect_clear_error(_compress(tmp_path, text), "calibrtion", "did you mean 'calibration'",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_unknown_method_suggests(tmp_path, capsys):
    """an unknown method (`gtpq`) -> names 'transforms[0].method' and suggests 'gptq'."""
    text = "name: t\ntransforms:\n  - {method: gtpq, bits: 4}\n"
    expect_clear_error(_compress(tmp_path, text), "transforms[0].method", "did you mean 'gptq'",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_negative_length(tmp_path, capsys):
    """`calibration: {length: -5}` (was accepted) -> names the key: expected an integer >= 2."""
    expect_clear_error(_compress(tmp_path, _gptq(cal="{windows: 2, length: -5}")),
                       "calibration.length", ">= 2", "got -5", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_negative_clip_min_ratio(tmp_path, capsys):
    """`clip_min_ratio: -0.5` (was accepted) -> names the key: expected a number in (0, 1]."""
    expect_clear_error(_compress(tmp_path, _gptq("clip: mse, clip_min_ratio: -0.5")),
                       "transforms[0].clip_min_ratio", "(0, 1]", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_negative_damp(tmp_path, capsys):
    """`damp: -0.1` (was accepted) -> names the key: expected a number >= 0."""
    expect_clear_error(_compress(tmp_path, _gptq("damp: -0.1")), "transforms[0].damp", ">= 0",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_bad_regex(tmp_path, capsys):
    """a `where` that is no valid regex (was a traceback) -> names the key and the regex."""
    expect_clear_error(_compress(tmp_path, _rtn("bits: 4, where: 'layers/('")),
                       "transforms[0].where", "invalid regular expression", "layers/(",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_calibration_yes(tmp_path, capsys):
    """`calibration: yes` (was a traceback) -> names the key: expected a mapping, got true."""
    expect_clear_error(_compress(tmp_path, _gptq(cal="yes")), "'calibration'", "got true",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_calibrated_method_without_calibration(tmp_path, capsys):
    """`method: gptq` without a calibration block (failed after loading) -> names 'calibration'."""
    expect_clear_error(_compress(tmp_path, "name: t\ntransforms:\n  - {method: gptq}\n"),
                       "'calibration'", "gptq", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_override_bits_true(tmp_path, capsys):
    """`overrides: {down_proj: {bits: true}}` -> names the key inside the override."""
    expect_clear_error(_compress(tmp_path, _rtn("bits: 4, overrides: {down_proj: {bits: true}}")),
                       "transforms[0].overrides[down_proj].bits", "got true", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_nested_transform_checked(tmp_path, capsys):
    """a bad field of a nested transform (AWQ's `then`) -> names the nested key."""
    text = ("name: t\ncalibration: {windows: 2}\ntransforms:\n"
            "  - {method: awq, bits: 4, then: {method: gptq, bits: 4, group_size: -64}}\n")
    expect_clear_error(_compress(tmp_path, text), "transforms[0].then.group_size", "got -64",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_cross_field_conflict_named(tmp_path, capsys):
    """fields that conflict (`keep_mask` with `clip: mse`) -> names the transform and why."""
    expect_clear_error(_compress(tmp_path, _rtn("keep_mask: '2:4', clip: mse")),
                       "transforms[0]", "keep_mask", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_pipeline_recipe_to_compress(tmp_path, capsys):
    """`jaxq compress` with a `stages` recipe (saved it uncompressed) -> says `jaxq train`."""
    expect_clear_error(["compress", str(tmp_path / "missing.gguf"), "--recipe", "pkdq", "--out",
                        str(tmp_path / "out")], "pkdq", "jaxq train", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_compression_recipe_to_train(tmp_path, capsys):
    """`jaxq train` with a `transforms` recipe (failed after loading) -> says `jaxq compress`."""
    expect_clear_error(["train", str(tmp_path / "missing.gguf"), "--recipe", "w4-g64", "--out",
                        str(tmp_path / "out")], "w4-g64", "jaxq compress", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_stage_key_typo(tmp_path, capsys):
    """a misspelt stage key (`stepz`) -> names 'stages[0].stepz', suggests 'steps'."""
    r = _recipe(tmp_path, "name: t\nstages:\n  - {stage: distill, stepz: 3}\n")
    expect_clear_error(["train", str(tmp_path / "missing.gguf"), "--recipe", str(r), "--out",
                        str(tmp_path / "out")], "stages[0].stepz", "did you mean 'steps'",
                       capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_qat_stage_bits_true(tmp_path, capsys):
    """`bits: true` in a qat stage -> names 'stages[0].bits'."""
    r = _recipe(tmp_path, "name: t\nstages:\n  - {stage: qat, bits: true}\n")
    expect_clear_error(["train", str(tmp_path / "missing.gguf"), "--recipe", str(r), "--out",
                        str(tmp_path / "out")], "stages[0].bits", "got true", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_train_negative_lr(tmp_path, capsys):
    """`train: {lr: -1e-4}` -> names 'train.lr': expected a number > 0."""
    r = _recipe(tmp_path, "name: t\ntrain: {lr: -1.0e-4}\nstages:\n  - {stage: distill}\n")
    expect_clear_error(["train", str(tmp_path / "missing.gguf"), "--recipe", str(r), "--out",
                        str(tmp_path / "out")], "train.lr", "> 0", capsys=capsys,
                       watch=[tmp_path])


# --- the schema itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", available())
def test_schema_accepts_every_shipped_recipe(name):
    recipe = load_recipe(name)
    assert recipe.transforms or recipe.stages
    recipe_from_dict(recipe.to_dict(), source=name)  # what a compressed model's metadata holds


def test_schema_covers_every_field_of_every_method():
    """Each method's recipe keys are its transform's dataclass fields, and every one that is
    not a plain bool or a nested transform has a stated range, choice or meaning."""
    import dataclasses

    from jaxq.recipes import method_class
    from jaxq.recipes.schema import NOT_IN_RECIPES, Bool, ListOf, Nullable, TransformSpec

    for method in METHODS:
        fields = method_fields(method)
        names = {f.name for f in dataclasses.fields(method_class(method))} - NOT_IN_RECIPES
        assert set(fields) == names, (method, names ^ set(fields))
        for name, check in fields.items():
            while isinstance(check, (Nullable, ListOf)):
                check = check.inner if isinstance(check, Nullable) else check.item
            if isinstance(check, (Bool, TransformSpec)) or name == "overrides":
                continue
            assert (method, name) in RULES or name in RULES, f"{method}.{name} has no rule"


def test_schema_error_format_and_python_dicts():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"name": "t", "transforms": [{"method": "rtn", "bits": True}]},
                         source="my.yaml")
    assert str(info.value) == ("recipe my.yaml: key 'transforms[0].bits': expected an integer "
                               "1-8, got true")
