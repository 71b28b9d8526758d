"""Recipes: YAML files that name a chain of transforms, shipped here or given as a path.

A recipe is a mapping with ``name``, ``description``, an optional ``calibration`` block
(``windows``, ``length``, ``batch``) and ``transforms``: a list of ``{method: NAME, ...fields}``
entries, each built into the transform class registered under ``NAME`` with the remaining keys
as its fields. Integer ``group_size`` entries get the fallback of the design (the largest of 128,
64 and 32 that divides a layer's input width) unless a ``group_fallback`` is given. Every key is
checked when the recipe is read, before any model is loaded (:mod:`jaxq.recipes.schema`).

>>> recipe = load_recipe("w4-g64")
>>> recipe.name
'w4-g64'

:func:`run` applies a recipe to a loaded model (calibration, mixed precision and both
calibration modes included); the ``jaxq compress`` command and the benchmark scripts call it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from pathlib import Path
from typing import Any

import yaml

from jaxq.core.transform import Transform, chain

RECIPE_DIR = Path(__file__).parent
DEFAULT_RECIPE = "w4-g64"
DEFAULT_FALLBACK = (128, 64, 32)

#: method name -> "module:Class" (imported on use, so optional methods cost nothing).
METHODS: dict[str, str] = {
    "rtn": "jaxq.quant.rtn:RTN",
    "gptq": "jaxq.quant.gptq:GPTQ",
    "awq": "jaxq.quant.awq:AWQ",
    "smoothquant": "jaxq.quant.smoothquant:SmoothQuant",
    "nf4": "jaxq.quant.float_formats:NF4",
    "fp8": "jaxq.quant.float_formats:FP8",
    "mx": "jaxq.quant.float_formats:MX",
    "mixed": "jaxq.quant.mixed:MixedPrecision",
    "structured": "jaxq.prune.structured:StructuredPrune",
    "drop_blocks": "jaxq.prune.structured:DropBlocks",
    "magnitude": "jaxq.prune.magnitude:Magnitude",
    "wanda": "jaxq.prune.wanda:Wanda",
    "sparsegpt": "jaxq.prune.sparsegpt:SparseGPT",
    "owl": "jaxq.prune.owl:OWL",
    "lowrank": "jaxq.lowrank.svd:LowRankSVD",
    "lowrank-correction": "jaxq.lowrank.correction:QuantLowRankCorrection",
}


class RecipeError(ValueError):
    """A recipe that cannot be read or built."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    transforms: tuple[dict, ...]
    calibration: dict | None
    source: str
    stages: tuple[dict, ...] = ()
    train: dict | None = None

    def build(self, head_dim: int | None = None) -> Transform:
        """The chain of transforms this recipe names.

        ``head_dim`` (from the model's config) tells structured pruning which slices of the
        attention projections form a head. AWQ/SmoothQuant need nothing from it: their scale
        groups come from the trace.
        """
        return chain(*(build_transform(spec, self.name, head_dim)
                       for spec in self.transforms))

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None

    @property
    def calibration_mode(self) -> str:
        """``sequential`` (compress each site as its statistics complete; GPTQ) or ``collect``
        (statistics of the float model first, then the whole-tree transform; AWQ's folding)."""
        return str((self.calibration or {}).get("mode", "sequential"))

    def requested_group_sizes(self) -> list[Any]:
        return [spec.get("group_size") for spec in self.transforms]

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "description": self.description}
        if not self.stages:
            out["transforms"] = [dict(t) for t in self.transforms]
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        if self.stages:
            out["stages"] = [dict(s) for s in self.stages]
        if self.train:
            out["train"] = dict(self.train)
        return out


def available() -> list[str]:
    """Names of the recipes shipped with jaxq."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, kind: str | None = None) -> Recipe:
    """A shipped recipe by name, or a YAML file by path, every key checked.

    ``kind`` (``"transforms"`` for ``jaxq compress``, ``"stages"`` for ``jaxq train``) refuses a
    recipe of the other kind, before any model is loaded."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):  # a shipped name ("mixed-3.5" is one too)
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}; shipped recipes: "
                              f"{', '.join(available())} (or give a path to a YAML file)")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML ({err})") from None
    recipe = recipe_from_dict(data, source=str(path))
    own = "stages" if recipe.stages else "transforms"
    if kind is not None and kind != own:
        what, command = ("a pipeline", "train") if recipe.stages else ("a compression", "compress")
        raise RecipeError(f"recipe {path}: key '{own}': {recipe.name} is {what} recipe; run it "
                          f"with `jaxq {command}`")
    return recipe


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """A recipe from its mapping: ``transforms`` (a compression chain) or ``stages`` (a
    training pipeline, run by :func:`jaxq.recipes.pipeline.run_pipeline`). Every key is checked
    (:mod:`jaxq.recipes.schema`) and every transform built now, before any model is loaded."""
    from jaxq.recipes.schema import check_recipe

    check_recipe(data, source)
    name = str(data.get("name", Path(source).stem))
    if "stages" in data:
        from jaxq.recipes.pipeline import check_stages

        return Recipe(name=name, description=str(data.get("description", "")), transforms=(),
                      calibration=data.get("calibration"), source=source,
                      stages=check_stages(data["stages"], name), train=data.get("train"))
    return Recipe(name=name, description=str(data.get("description", "")),
                  transforms=tuple(dict(spec) for spec in data["transforms"]),
                  calibration=data.get("calibration"), source=source)


def method_class(method: str) -> type:
    module, _, cls = METHODS[method].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"method {method!r} is not available in this build ({err})") from None


def build_transform(spec: dict, recipe_name: str = "recipe",
                    head_dim: int | None = None) -> Transform:
    spec = dict(spec)
    method = spec.pop("method")
    cls = method_class(method)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(
        inspect.signature(cls).parameters)
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise RecipeError(f"{recipe_name}: {method} has no option(s) {unknown}; "
                          f"options: {sorted(fields)}")
    if isinstance(spec.get("group_size"), int) and "group_fallback" in fields:
        spec.setdefault("group_fallback", DEFAULT_FALLBACK)
    for key in ("group_fallback",):
        if isinstance(spec.get(key), list):
            spec[key] = tuple(spec[key])
    if "overrides" in spec:
        spec["overrides"] = dict(spec["overrides"] or {})
    if isinstance(spec.get("quantizers"), list):
        spec["quantizers"] = tuple(build_transform(q, recipe_name, head_dim)
                                   for q in spec["quantizers"])
    if isinstance(spec.get("candidates"), list):
        spec["candidates"] = tuple(tuple(c) for c in spec["candidates"])
    for key in ("inner", "then", "quantizer"):  # nested transforms (OWL's, AWQ's, LRC's)
        if isinstance(spec.get(key), dict):
            spec[key] = build_transform(spec[key], recipe_name, head_dim)
    if method == "structured":  # the model's units; recipes here are for the llama family
        from jaxq.models import structure

        spec.setdefault("units", functools.partial(structure.llama_units, head_dim=head_dim))
        spec.setdefault("where", structure.SCORE_SITES)
        spec.setdefault("of", structure.LAYER_PARAMS)
    if method == "drop_blocks":
        from jaxq.models import structure

        spec.setdefault("blocks", structure.BLOCKS)
    for key in ("kinds", "drop"):
        if isinstance(spec.get(key), list):
            spec[key] = tuple(spec[key])
    try:
        return cls(**spec)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{recipe_name}: cannot build {method}: {err}") from None


from jaxq.recipes.runner import RunResult, fallen_back, run  # noqa: E402

__all__ = ["DEFAULT_RECIPE", "METHODS", "Recipe", "RecipeError", "RunResult", "available",
           "build_transform", "fallen_back", "load_recipe", "method_class", "recipe_from_dict",
           "run"]
