"""Every shipped recipe loads by name (dots included) and builds its transforms."""

import pytest

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
