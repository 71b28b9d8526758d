"""The recipe schema: every key of a recipe checked before a model is loaded.

A recipe's transforms are built from its keys, so a key the code does not read is a typo, a
``true`` where a number belongs is a bool that Python would take for 1, and a bad regex or a
negative length is a traceback after minutes of loading. :func:`check_recipe` walks the whole
mapping (top level, ``calibration``, ``train``, ``transforms`` with their nested transforms and
``overrides``, ``stages``) and raises one :class:`~jaxq.recipes.RecipeError` naming the file and
the key::

    recipe my.yaml: key 'transforms[0].bits': expected an integer 1-8, got true

A method's keys and their types come from its transform's dataclass fields (so the schema
follows the code); :data:`RULES` states the range, choices or regex meaning of each field.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import importlib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

TOP_KEYS = ("name", "description", "calibration", "transforms", "stages", "train")


class Bad(Exception):
    """One schema violation: the dotted key and what is wrong with its value."""

    def __init__(self, key: str, message: str, *, mistyped: bool = False) -> None:
        super().__init__(f"key '{key}': {message}")
        self.key = key
        self.mistyped = mistyped  # the value is of the wrong kind (not merely out of range)


def show(value: Any) -> str:
    """A value as YAML spells it (``true``, ``null``, ``'abc'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# --- checks: what one value may be -----------------------------------------------------------

class Check:
    """Validates one value; ``__call__`` returns it or raises :class:`Bad`."""

    def describe(self) -> str:
        raise NotImplementedError

    def __call__(self, value: Any, key: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, key: str) -> Bad:
        return Bad(key, f"expected {self.describe()}, got {show(value)}", mistyped=True)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number (``None``: unbounded); ``*_open`` excludes the bound itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def describe(self, integer: bool) -> str:
        if self.lo is not None and self.hi is not None:
            if integer and not (self.lo_open or self.hi_open):
                return f" {_num(self.lo)}-{_num(self.hi)}"
            return (f" in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f" {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return ""


@dataclasses.dataclass(frozen=True)
class Int(Check):
    range: Range = Range()

    def describe(self) -> str:
        return "an integer" + self.range.describe(integer=True)

    def __call__(self, value: Any, key: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not self.range.holds(value):
            raise self.fail(value, key)
        return value


@dataclasses.dataclass(frozen=True)
class Num(Check):
    range: Range = Range()

    def describe(self) -> str:
        return "a number" + self.range.describe(integer=False)

    def __call__(self, value: Any, key: str) -> Any:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not self.range.holds(value)):
            raise self.fail(value, key)
        return value


class Bool(Check):
    def describe(self) -> str:
        return "true or false"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, bool):
            raise self.fail(value, key)
        return value


@dataclasses.dataclass(frozen=True)
class Choice(Check):
    """One of a fixed set of strings; ``source`` ("module:NAME") reads the set from the code."""

    options: tuple[str, ...] = ()
    source: str | None = None

    def choices(self) -> tuple[str, ...]:
        if self.source is None:
            return self.options
        module, _, name = self.source.partition(":")
        return tuple(getattr(importlib.import_module(module), name))

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices())

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, str) or value not in self.choices():
            raise self.fail(value, key)
        return value


class Text(Check):
    def describe(self) -> str:
        return "a string"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, str):
            raise self.fail(value, key)
        return value


class Regex(Check):
    """A regular expression over parameter paths, compiled now."""

    def describe(self) -> str:
        return "a regular expression (a string)"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, str):
            raise self.fail(value, key)
        try:
            re.compile(value)
        except re.error as err:
            raise Bad(key, f"invalid regular expression {value!r} ({err})") from None
        return value


@dataclasses.dataclass(frozen=True)
class NM(Check):
    """An ``"N:M"`` sparsity pattern (``extra`` words allowed besides, e.g. "unstructured")."""

    extra: tuple[str, ...] = ()

    def describe(self) -> str:
        return "an 'N:M' pattern with 0 < N < M <= 256" + "".join(
            f" or {e!r}" for e in self.extra)

    def __call__(self, value: Any, key: str) -> Any:
        from jaxq.core.sparse import parse_pattern

        if value in self.extra:
            return value
        if not isinstance(value, str):
            raise self.fail(value, key)
        try:
            parse_pattern(value)
        except ValueError:
            raise self.fail(value, key) from None
        return value


class FloatDtype(Check):
    def describe(self) -> str:
        return "a float dtype name (float16, bfloat16 or float32)"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, str) or value not in ("float16", "bfloat16", "float32"):
            raise self.fail(value, key)
        return value


class GroupSize(Check):
    def describe(self) -> str:
        return "a positive integer, 'channel' or 'tensor'"

    def __call__(self, value: Any, key: str) -> Any:
        if value in ("channel", "tensor") and isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(value, key)
        return value


@dataclasses.dataclass(frozen=True)
class Nullable(Check):
    inner: Check

    def describe(self) -> str:
        return f"{self.inner.describe()} or null"

    def __call__(self, value: Any, key: str) -> Any:
        if value is None:
            return value
        try:
            return self.inner(value, key)
        except Bad as bad:
            if bad.key != key or not bad.mistyped:
                raise
            raise self.fail(value, key) from None


@dataclasses.dataclass(frozen=True)
class ListOf(Check):
    item: Check
    size: int | None = None  # exactly this many items (a pair, say); None: any number, not 0

    def describe(self) -> str:
        n = f"{self.size} " if self.size else ""
        return f"a list of {n}items, each {self.item.describe()}"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, list) or not value or (
                self.size is not None and len(value) != self.size):
            raise self.fail(value, key)
        return [self.item(v, f"{key}[{i}]") for i, v in enumerate(value)]


@dataclasses.dataclass(frozen=True)
class MapOf(Check):
    """A mapping from names (structured pruning's unit kinds, low-rank's paths) to values."""

    value: Check

    def describe(self) -> str:
        return f"a mapping of names to {self.value.describe()}"

    def __call__(self, value: Any, key: str) -> Any:
        if not isinstance(value, dict):
            raise self.fail(value, key)
        for k, v in value.items():
            sub = f"{key}[{k}]"
            Text()(k, sub)
            self.value(v, sub)
        return value


class TransformSpec(Check):
    """A nested ``{method: NAME, ...}`` mapping, checked against that method's fields."""

    def describe(self) -> str:
        return "a transform mapping with a 'method'"

    def __call__(self, value: Any, key: str) -> Any:
        check_transform(value, key)
        return value


# --- field rules ---------------------------------------------------------------------------------

#: Range, choices or meaning of each field, by field name; ``(method, field)`` wins over the
#: name alone. Types come from the dataclass (an ``int`` field gets ``Int(range)``, a ``float``
#: field ``Num(range)``, optional and list fields wrap them), so a rule only says what the type
#: cannot: the bounds, the choices, that a string is a regex.
RULES: dict[str | tuple[str, str], Range | Check] = {
    "bits": Range(1, 8),
    "group_size": GroupSize(),
    "group_fallback": Range(1),
    "clip": Choice(("minmax", "mse")),
    "clip_grid": Range(1),
    "clip_min_ratio": Range(0, 1, lo_open=True),
    "grid": Range(1),
    "damp": Range(0),
    "block_size": Range(1),
    "dq_block_size": Range(1),
    "blocksize": Range(1),
    "refit": Range(0),
    "scale_dtype": FloatDtype(),
    "factor_dtype": FloatDtype(),
    "keep_mask": NM(extra=("unstructured",)),
    "where": Regex(),
    "of": Regex(),
    "group": Regex(),
    "blocks": Regex(),
    "pattern": NM(),
    "sparsity": Range(0, 1, hi_open=True),
    "storage": Choice(("dense", "sparse")),
    "scope": Choice(("layer", "global")),
    "fraction": Range(0, 1, hi_open=True),
    "kinds": Choice(("heads", "neurons")),
    "multiples": Range(1),
    "n": Range(1),
    "drop": Range(0),
    "lam": Range(0, 1),
    "m": Range(0, lo_open=True),
    "ratio": Range(0, 1, lo_open=True),
    "budget": Range(0, 1, lo_open=True),
    "ranks": Range(1),
    "rank": Range(1),
    "rounds": Range(1),
    "extra_bpw": Range(0, lo_open=True),
    "budget_bpw": Range(0, 32, lo_open=True),
    "scale_bits": Range(1, 32),
    "candidates": ListOf(ListOf(Int(Range(1)), size=2)),
    "act_bits": Range(2, 8),
    "alpha": Range(0, 1),
    ("smoothquant", "act"): Choice(("dynamic", "static")),
    ("fp8", "variant"): Choice(source="jaxq.quant.float_formats:FP8_MAX"),
    ("fp8", "granularity"): Choice(("tensor", "channel")),
    ("mx", "mode"): Choice(source="jaxq.quant.float_formats:MX_MODES"),
    ("lowrank", "variant"): Choice(source="jaxq.lowrank.svd:METHODS"),
    ("qat", "format"): Choice(source="jaxq.qat.qat:FORMATS"),
    ("qat", "estimator"): Choice(source="jaxq.qat.qat:ESTIMATORS"),
}

#: Fields a recipe cannot set (code objects), filled in by the recipe loader instead.
NOT_IN_RECIPES = frozenset({"units", "groups"})

CALIBRATION: dict[str, Check] = {
    "windows": Int(Range(1)),
    "length": Int(Range(2)),
    "batch": Int(Range(1)),
    "mode": Choice(("sequential", "collect")),
    "sensitivity_windows": Int(Range(1)),
}

TRAIN: dict[str, Check] = {
    "steps": Int(Range(1)),
    "lr": Num(Range(0, lo_open=True)),
    "alpha": Num(Range(0, 1)),
    "temperature": Num(Range(0, lo_open=True)),
    "batch": Int(Range(1)),
    "seq_len": Int(Range(2)),
    "warmup": Int(Range(0)),
    "checkpoint_every": Int(Range(1)),
    "teacher_topk": Nullable(Int(Range(1))),
    "seed": Int(Range(0)),
    "weight_decay": Num(Range(0)),
}


def _rule(method: str, name: str) -> Range | Check | None:
    return RULES.get((method, name), RULES.get(name))


def _from_hint(hint: Any, rule: Range | Check | None, method: str) -> Check | None:
    """The check for a field of type ``hint``; None for types a recipe cannot spell."""
    from jaxq.core.transform import Transform

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(rule, (GroupSize, FloatDtype, ListOf)):  # rules for the whole value
        return Nullable(rule) if hint is Any or type(None) in args else rule
    if hint is bool:
        return Bool()
    if hint is int:
        return Int(rule if isinstance(rule, Range) else Range())
    if hint is float:
        return Num(rule if isinstance(rule, Range) else Range())
    if hint is str:
        return rule if isinstance(rule, Check) else Text()
    if isinstance(hint, type) and issubclass(hint, Transform):
        return TransformSpec()
    if origin in (typing.Union, types.UnionType):
        parts = [_from_hint(a, rule, method) for a in args if a is not type(None)]
        parts = [p for p in parts if p is not None]
        if len(parts) != 1:
            return None
        return Nullable(parts[0]) if type(None) in args else parts[0]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _from_hint(args[0], rule, method)
        return ListOf(item) if item is not None else None
    if origin in (collections.abc.Mapping, dict) and len(args) == 2:
        value = _from_hint(args[1], rule, method)
        return MapOf(value) if value is not None else None
    return None


@functools.cache
def method_fields(method: str) -> dict[str, Check]:
    """The keys a transform of ``method`` takes in a recipe, with their checks (from the
    transform's dataclass fields; ``where``/``overrides`` included where it has them)."""
    from jaxq.recipes import method_class

    cls = method_class(method)
    hints = typing.get_type_hints(cls)
    out: dict[str, Check] = {}
    for f in dataclasses.fields(cls):
        if f.name in NOT_IN_RECIPES or f.name == "overrides":
            continue
        check = _from_hint(hints[f.name], _rule(method, f.name), method)
        if check is not None:
            out[f.name] = check
    if "overrides" in {f.name for f in dataclasses.fields(cls)}:
        out["overrides"] = Overrides(method)
    return out


@dataclasses.dataclass(frozen=True)
class Overrides(Check):
    """``{regex: {field: value}}`` (or ``{regex: null}``: skip), fields of the same method."""

    method: str

    def describe(self) -> str:
        return f"a mapping of regex to {self.method} fields (or null)"

    def __call__(self, value: Any, key: str) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise self.fail(value, key)
        fields = {k: c for k, c in method_fields(self.method).items()
                  if k not in ("where", "overrides")}
        for pattern, sub in value.items():
            at = f"{key}[{pattern}]"
            Regex()(pattern, at)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise Bad(at, f"expected a mapping of {self.method} fields or null, "
                              f"got {show(sub)}")
            _check_keys(sub, fields, at, f"{self.method} override")
        return value


# --- the walk ------------------------------------------------------------------------------------

def _unknown(key: str, known: typing.Iterable[str], at: str, what: str) -> Bad:
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return Bad(f"{at}.{key}" if at else str(key),
               f"{what} has no option {str(key)!r}{hint} (options: {', '.join(known)})")


def _check_keys(spec: Mapping, fields: Mapping[str, Check], at: str, what: str,
                skip: typing.Iterable[str] = ()) -> None:
    for k, v in spec.items():
        if k in skip:
            continue
        if k not in fields:
            raise _unknown(k, fields, at, what)
        fields[k](v, f"{at}.{k}" if at else k)


def check_transform(spec: Any, at: str) -> None:
    """One ``{method: NAME, ...}`` entry, nested transforms included."""
    from jaxq.recipes import METHODS

    if not isinstance(spec, dict):
        raise Bad(at, f"expected a transform mapping with a 'method', got {show(spec)}")
    method = spec.get("method")
    if method is None:
        raise Bad(at, "a transform needs a 'method'")
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise Bad(f"{at}.method", f"unknown method {method!r}{hint} "
                                  f"(known methods: {', '.join(sorted(METHODS))})")
    _check_keys(spec, method_fields(method), at, method, skip=("method",))


def _check_block(block: Any, checks: Mapping[str, Check], at: str, what: str) -> None:
    if not isinstance(block, dict):
        raise Bad(at, f"expected a mapping of {what} options, got {show(block)}")
    _check_keys(block, checks, at, what)


def _check_transforms(specs: Any, at: str) -> None:
    if not isinstance(specs, list) or not specs:
        raise Bad(at, f"expected a non-empty list of transforms, got {show(specs)} (an empty "
                      "chain would save the model uncompressed)")
    for i, spec in enumerate(specs):
        check_transform(spec, f"{at}[{i}]")


def _stage_fields(kind: str) -> dict[str, Check]:
    """Keys of a pipeline stage of ``kind``; a qat stage's fields come from :class:`QAT`."""
    from jaxq.recipes.pipeline import QAT_KEYS

    base: dict[str, Check] = {"stage": Text(), "name": Text()}
    if kind in ("prune", "quantize"):
        return {**base, "transforms": _Transforms(), "calibration": _Calibration()}
    if kind == "distill":
        return {**base, **TRAIN}
    qat = {k: c for k, c in _qat_fields().items() if k in QAT_KEYS}
    return {**base, **TRAIN, **qat}


@functools.cache
def _qat_fields() -> dict[str, Check]:
    from jaxq.qat import QAT

    hints = typing.get_type_hints(QAT)
    out = {f.name: _from_hint(hints[f.name], _rule("qat", f.name), "qat")
           for f in dataclasses.fields(QAT) if f.name != "overrides"}
    return {**{k: c for k, c in out.items() if c is not None}, "overrides": _QatOverrides()}


class _QatOverrides(Check):
    def describe(self) -> str:
        return "a mapping of regex to qat fields (or null)"

    def __call__(self, value: Any, key: str) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise self.fail(value, key)
        fields = {k: c for k, c in _qat_fields().items() if k not in ("where", "overrides")}
        for pattern, sub in value.items():
            at = f"{key}[{pattern}]"
            Regex()(pattern, at)
            if sub is not None:
                _check_block(sub, fields, at, "qat override")
        return value


class _Transforms(Check):
    def describe(self) -> str:
        return "a non-empty list of transforms"

    def __call__(self, value: Any, key: str) -> Any:
        _check_transforms(value, key)
        return value


class _Calibration(Check):
    def describe(self) -> str:
        return "a calibration mapping"

    def __call__(self, value: Any, key: str) -> Any:
        _check_block(value, CALIBRATION, key, "calibration")
        return value


def _check_stages(stages: Any) -> None:
    from jaxq.recipes.pipeline import STAGES

    if not isinstance(stages, list) or not stages:
        raise Bad("stages", f"expected a non-empty list of stages, got {show(stages)}")
    for i, st in enumerate(stages):
        at = f"stages[{i}]"
        kinds = ", ".join(map(repr, STAGES))
        if not isinstance(st, dict):
            raise Bad(at, f"expected a stage mapping, got {show(st)}")
        if "stage" not in st:
            raise Bad(f"{at}.stage", f"a stage needs a 'stage' kind: one of {kinds}")
        if st["stage"] not in STAGES:
            raise Bad(f"{at}.stage", f"expected one of {kinds}, got {show(st['stage'])}")
        fields = _stage_fields(st["stage"])
        _check_keys(st, fields, at, f"a {st['stage']} stage")
        if st["stage"] in ("prune", "quantize") and "transforms" not in st:
            raise Bad(f"{at}.transforms", f"a {st['stage']} stage needs a 'transforms' list")


def check_recipe(data: Any, source: str) -> None:
    """Raise a :class:`~jaxq.recipes.RecipeError` naming ``source`` and the key at fault for
    anything in ``data`` the schema rejects, and for any transform that cannot be built."""
    from jaxq.recipes import RecipeError

    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source}: a recipe is a mapping with a 'transforms' list (or "
                          f"a 'stages' list), got {show(data)[:60]}")
    try:
        _check(data)
    except Bad as bad:
        raise RecipeError(f"recipe {source}: {bad}") from None


def _check(data: Any) -> None:
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown(k, TOP_KEYS, "", "a recipe")
    for k in ("name", "description"):
        if k in data:
            Text()(data[k], k)
    if "calibration" in data and data["calibration"] is not None:
        _check_block(data["calibration"], CALIBRATION, "calibration", "calibration")
    has_t, has_s = "transforms" in data, "stages" in data
    if has_t == has_s:
        raise Bad("transforms", "a recipe has either a 'transforms' list (jaxq compress) or a "
                                "'stages' list (jaxq train)" + (", not both" if has_t else ""))
    if has_t:
        _check_transforms(data["transforms"], "transforms")
        for i, spec in enumerate(data["transforms"]):
            transform = _build(spec, f"transforms[{i}]")
            if data.get("calibration") is None:
                _check_needs_no_stats(transform, spec["method"], f"transforms[{i}]")
        if "train" in data:
            raise Bad("train", "'train' options go with a 'stages' recipe")
        return
    _check_stages(data["stages"])
    if data.get("train") is not None:
        _check_block(data["train"], TRAIN, "train", "train")
    for i, st in enumerate(data["stages"]):
        for j, spec in enumerate(st.get("transforms", ())):
            _build(spec, f"stages[{i}].transforms[{j}]")
        if st["stage"] == "qat":
            _build_qat(st, f"stages[{i}]")


def _build(spec: dict, at: str) -> Any:
    """Build the transform now: what only its constructor checks (a field that needs another)
    is named by the key of the transform."""
    from jaxq.recipes import RecipeError, build_transform

    try:
        return build_transform(spec, "recipe")
    except RecipeError as err:
        raise Bad(at, str(err).removeprefix("recipe: ")) from None


#: Where a llama's linear weights live: a transform that needs statistics there needs a
#: calibration block (without one it would fail after the model has loaded).
_PROBE_PATHS = ("model/layers/0/mlp/down_proj/weight", "model/layers/0/self_attn/q_proj/weight")


def _check_needs_no_stats(transform: Any, method: str, at: str) -> None:
    import numpy as np

    leaf = np.zeros((64, 64), np.float32)
    needs = sorted({s for p in _PROBE_PATHS for s in transform.required_stats(p, leaf)})
    if needs:
        raise Bad("calibration", f"{at} ({method}) needs calibration statistics "
                                 f"({', '.join(needs)}): add a calibration block, e.g. "
                                 "calibration: {windows: 128, length: 512}")


def _build_qat(stage: dict, at: str) -> None:
    from jaxq.recipes.pipeline import qat_spec

    try:
        qat_spec(stage)
    except ValueError as err:
        raise Bad(at, str(err)) from None

