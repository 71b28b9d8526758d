"""``jaxq.recipes.run``: apply a recipe to a loaded model, the one way the CLI and the benchmarks
compress a model.

A recipe may need calibration; the runner then cuts PTB-train windows with the model's
tokenizer (or takes the windows it is given), settles mixed precision from the loss's Fisher
diagonal, and runs the recipe's calibration mode: ``sequential`` (each site compressed as its
statistics complete; GPTQ) or ``collect`` (statistics of the float model first, then the
whole-tree transform; AWQ's folding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core.finite import check_finite
from jaxq.core.leaf import is_leaf
from jaxq.core.tree import flatten_with_paths
from jaxq.recipes import resume


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run` made: the compressed params and how it got there.

    ``config`` is the model's config read off the new params (structured pruning shrinks
    layers, heads and neurons). ``timings`` holds wall seconds per phase (``sensitivity``,
    ``plan``, ``calibrate`` or ``transform``, and ``total``); ``fallback_layers`` the
    quantized layers whose group size is none the recipe asked for (their input width forced
    the fallback).
    """

    params: Any
    config: Any
    recipe: Any
    timings: dict[str, float]
    fallback_layers: list[str]
    calibration: dict | None

    @property
    def seconds(self) -> float:
        return self.timings["total"]


def _parts(model: Any) -> tuple[Any, Any, Any]:
    """``(params, config, tokenizer)`` of a loaded model: an object with those attributes (the
    CLI's loader) or the tuple :func:`jaxq.models.load_model` returns."""
    if isinstance(model, tuple) and len(model) == 3:
        return model
    try:
        return model.params, model.config, getattr(model, "tokenizer", None)
    except AttributeError:
        raise TypeError("run() takes a model as (params, config, tokenizer), as "
                        "jaxq.models.load_model returns it, or an object with .params, "
                        f".config and .tokenizer; got {type(model).__name__}") from None


def run(model: Any, recipe: Any, *, calibration: Mapping | Any | None = None,
        progress: bool = True,
        status: Callable[[str], contextlib.AbstractContextManager] | None = None,
        allow_nonfinite: bool | None = None,
        work_dir: str | os.PathLike | None = None) -> RunResult:
    """Compress ``model`` with ``recipe`` (a :class:`~jaxq.recipes.Recipe`, a shipped name or a
    YAML path).

    ``calibration`` overrides the recipe's calibration block: a mapping of its fields
    (``windows``, ``length``, ``batch``, ``mode``, ``sensitivity_windows``), or the calibration
    token windows themselves (an int array ``[n, length]``), for a caller that brings its own
    data. ``progress`` shows the calibration progress bar; ``status(text)`` is a context manager
    shown around the phases that have none (the CLI passes a spinner).

    NaN/Inf in the model's weights, in a calibration statistic or in the compressed params
    (16-bit scales overflowing, say) is a :class:`~jaxq.core.finite.NonFiniteError` naming the
    first tensor at fault, unless ``allow_nonfinite`` lets it through with a warning (None: the
    enclosing :func:`jaxq.core.finite.allowing` block's setting).
    ``work_dir`` makes the calibration resumable: each finished layer is written there as it
    completes (sequential mode: its compressed weights; collect mode: its weights'
    statistics), and a run given a ``work_dir`` that an earlier run of the same recipe,
    model, calibration and software left (a kill) reads those layers back instead of
    calibrating them, ending bit-identical to an uninterrupted run. A work directory left by
    anything else is a ValueError naming what differs (it is never mixed in). Remove it once
    the result is saved (:mod:`jaxq.recipes.resume`).
    """
    from jaxq.recipes import Recipe, RecipeError, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.stages:
        raise RecipeError(f"{recipe.name} is a pipeline recipe ('stages'): run it with "
                          "jaxq.recipes.pipeline.run_pipeline (`jaxq train`)")
    params, config, tokenizer = _parts(model)
    if any(is_leaf(x) for _, x in flatten_with_paths(params)[0]):
        raise ValueError("run() takes an uncompressed model; these params already hold "
                         "compressed leaves")
    check_finite(params, "weight", allow=allow_nonfinite)
    status = status or (lambda _text: contextlib.nullcontext())
    if work_dir is not None and Path(work_dir).exists():
        resume.check_recipe(work_dir, recipe)  # before any calibration work
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    transform = recipe.build(head_dim=getattr(config, "head_dim", None))
    transform.check_patterns(params)  # a where/overrides typo fails now, not after calibrating
    windows = None
    if isinstance(calibration, Mapping):
        cal = {**(recipe.calibration or {}), **calibration}
    elif calibration is not None:
        windows = np.asarray(calibration)
        if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
            raise ValueError(f"calibration windows must be integer tokens [n, length]; got "
                             f"{windows.dtype} {windows.shape}")
        cal = {**(recipe.calibration or {}), "windows": len(windows),
               "length": windows.shape[1]}
    else:
        cal = dict(recipe.calibration) if recipe.calibration is not None else None

    if not recipe.needs_calibration:
        with status(f"quantizing with {recipe.name}"):
            qparams = transform(params)
            jax.block_until_ready(jax.tree.leaves(qparams))
        check_finite(qparams, "compressed weight", allow=allow_nonfinite)
        timings["transform"] = timings["total"] = time.perf_counter() - t_start
        return RunResult(qparams, _config_for(qparams, config), recipe, timings,
                         fallen_back(qparams, recipe), None)

    mode = str(cal.get("mode", recipe.calibration_mode))
    if mode not in ("sequential", "collect"):
        raise RecipeError(f"{recipe.name}: calibration mode must be 'sequential' or 'collect', "
                          f"not {mode!r}")
    from jaxq.calib import calibrate
    from jaxq.eval.data import calibration_windows, window_batches
    from jaxq.models.llama import make_apply_fn

    if windows is None:
        if tokenizer is None:
            raise ValueError(f"{recipe.name} calibrates on PTB text, and this model has no "
                             "tokenizer; pass calibration= windows of token ids")
        windows = calibration_windows(tokenizer, n=int(cal.get("windows", 128)),
                                      length=int(cal.get("length", 512)))
    batches = window_batches(windows, int(cal.get("batch", 8)))
    apply_fn = make_apply_fn(config)
    key = None
    if work_dir is not None:
        with status(f"fingerprinting the run for {work_dir}"):
            key = resume.key(recipe, params, config, cal, windows)
            if Path(work_dir).exists():
                resume.open_work(work_dir, key)  # refuse a stale one before any work

    t0 = time.perf_counter()
    n_sens = int(cal.get("sensitivity_windows", 16))
    planned = _plan_mixed_precision(transform, params, apply_fn, windows, n_sens, status)
    if planned is not transform:
        timings["sensitivity"] = time.perf_counter() - t0
        transform = planned

    t0 = time.perf_counter()
    planned = _plan_whole_model(transform, params, config, apply_fn, batches, progress, status)
    if planned is not transform:
        timings["plan"] = time.perf_counter() - t0
        transform = planned

    t0 = time.perf_counter()
    leaves = flatten_with_paths(params)[0]
    resumed: dict = {}
    if mode == "collect" and not any(transform.required_stats(p, x) for p, x in leaves):
        qparams = transform(params)  # e.g. blocks dropped by hidden-state distances alone
    elif key is not None:
        store, created = resume.open_work(work_dir, key)
        resumed = {"resumed_weights": len(store)}
        try:
            qparams, _ = calibrate(apply_fn, params, batches, transform, progress=progress,
                                   sequential=mode == "sequential", checkpoint=store,
                                   allow_nonfinite=allow_nonfinite)
            store.flush()
        except (ValueError, TypeError):  # bad input: a rerun fails alike, so leave no debris
            if created:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
    else:
        qparams, _ = calibrate(apply_fn, params, batches, transform, progress=progress,
                               sequential=mode == "sequential", allow_nonfinite=allow_nonfinite)
    jax.block_until_ready(jax.tree.leaves(qparams))
    check_finite(qparams, "compressed weight", allow=allow_nonfinite)
    timings["calibrate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return RunResult(qparams, _config_for(qparams, config), recipe, timings,
                     fallen_back(qparams, recipe),
                     {**cal, "mode": mode, "windows": len(windows), **resumed})


def _config_for(params: Any, config: Any) -> Any:
    from jaxq.models.llama import LlamaConfig
    from jaxq.models.structure import config_for_params

    return config_for_params(params, config) if isinstance(config, LlamaConfig) else config


def _plan_whole_model(transform: Any, params: Any, config: Any, apply_fn: Any, batches: Any,
                      progress: bool, status: Callable) -> Any:
    """Settle the decisions that need the whole model before calibration: which blocks a
    block-dropping step removes (angular distances of the residual stream), OWL's per-layer
    sparsities and global magnitude thresholds."""
    from jaxq.prune import plan
    from jaxq.prune.structured import needs_distances, resolve_blocks

    if needs_distances(transform):
        from jaxq.models.structure import llama_block_distances

        with status(f"measuring block distances on {len(batches)} calibration batches"):
            distances = llama_block_distances(params, config, batches)
        transform = resolve_blocks(transform, distances)
    return plan(transform, apply_fn, params, batches, progress=progress)


def _plan_mixed_precision(transform: Any, params: Any, apply_fn: Any, windows: Any, n: int,
                          status: Callable) -> Any:
    """Settle any mixed-precision step's widths first, from the loss's Fisher diagonal on the
    first ``n`` calibration windows (one window per gradient); ``transform`` itself when no
    step asks for the Fisher diagonal."""
    leaves = flatten_with_paths(params)[0]
    if not any("fisher" in transform.required_stats(p, x) for p, x in leaves):
        return transform
    from jaxq.eval.perplexity import next_token_loss
    from jaxq.quant.mixed import fisher_diagonal, resolve_mixed

    with status(f"measuring sensitivity on {n} calibration windows"):
        fisher = fisher_diagonal(next_token_loss(apply_fn), params,
                                 [(jnp.asarray(w[None]),) for w in windows[:n]])
    return resolve_mixed(transform, params, {p: {"fisher": f} for p, f in fisher.items()})


def fallen_back(params: Any, recipe: Any) -> list[str]:
    """Quantized layers whose group size differs from every group size the recipe asked for."""
    asked = {g for g in recipe.requested_group_sizes() if isinstance(g, int)}
    if not asked:
        return []
    return [p for p, leaf in flatten_with_paths(params)[0]
            if getattr(leaf, "granularity", None) == "group"
            and leaf.group_size not in asked]
