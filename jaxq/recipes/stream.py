"""Compress a model larger than memory one decoder block at a time: ``jaxq compress --stream``.

The source is opened lazily (:func:`jaxq.models.lazy.open_model`); each piece (the embedding,
every decoder block, the final norm with the output head) is read, compressed, written to a
safetensors shard of its own (:class:`jaxq.core.serialize.ShardWriter`) and dropped before the
next is read, so memory holds about one block plus the calibration activations, whatever the
model's size. The output is a jaxq directory that ``jaxq eval``/``export``/``generate`` load
as any other.

The result equals the in-memory :func:`jaxq.recipes.run`: a recipe without calibration applies
each leaf's transform as the whole-tree call does (bit-identical). A sequential recipe (GPTQ)
runs the calibration interpreter on one block at a time: each block's inputs are the previous
block's outputs, computed in the same pass on the compressed weights, equation by equation as
the whole-model pass computes them, so every statistic and every weight matches that pass's
(:func:`jaxq.calib.interpreter.calibrate_sequential`). What the hidden states of the
calibration windows cost (``windows x length x hidden`` floats, 151 MB for SmolLM2's 128 x
512 x 576) is carried from block to block.

Recipes that decide over the whole model cannot stream and are refused up front: ``collect``
calibration (AWQ and SmoothQuant fold scales from float statistics of the whole pass),
mixed precision (a global bit budget), OWL, global magnitude pruning, structured pruning,
block dropping and budgeted low-rank. No evaluation runs here (it would need the model in
memory): ``jaxq eval OUT`` gives the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import serialize
from jaxq.core.io import atomic_output
from jaxq.core.transform import Chain, LeafTransform, Transform
from jaxq.core.tree import map_with_path
from jaxq.eval.size import size_report
from jaxq.models.lazy import LazyModel, open_model
from jaxq.models.llama import (
    LlamaConfig,
    decoder_layer,
    linear,
    param_shapes,
    rms_norm,
    rope_angles,
)
from jaxq.recipes import Recipe, RecipeError, fallen_back, load_recipe


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """What :func:`compress` wrote: the directory, the source as the manifest names it, the
    figures saved in the manifest, and the bytes of the source model at float32 (what the
    in-memory path would hold)."""

    out: Path
    source: str
    figures: dict
    model_bytes: int


def check_streamable(recipe: Recipe, transform: Transform) -> None:
    """Raise a :class:`RecipeError` naming the step of ``recipe`` that needs the whole model
    at once (a global plan, or scales folded from a whole-model statistics pass)."""
    mode = recipe.calibration_mode
    if recipe.needs_calibration and mode != "sequential":
        raise RecipeError(f"{recipe.name}: calibration mode {mode!r} collects statistics of "
                          "the whole float model before any transform, so it cannot stream "
                          "(only 'sequential' recipes and recipes without calibration can)")
    steps = transform.transforms if isinstance(transform, Chain) else (transform,)
    for spec, step in zip(recipe.transforms, steps):
        if not isinstance(step, LeafTransform) or type(step).__call__ is not (
                LeafTransform.__call__):
            raise RecipeError(f"{recipe.name}: method {spec['method']!r} decides over the "
                              "whole model (a global plan or scale folding), so it cannot "
                              "stream one block at a time; compress without --stream")


def compress(source: str | Path, recipe: Recipe | str, out: str | Path, *,
             calibration: Mapping | None = None, progress: bool = True,
             status: Callable[[str], contextlib.AbstractContextManager] | None = None
             ) -> StreamResult:
    """Compress ``source`` (``"default"``, a GGUF file or an HF directory) with ``recipe`` into
    the jaxq directory ``out``, one block in memory at a time.

    ``calibration`` overrides fields of the recipe's calibration block (``windows``,
    ``length``, ``batch``). ``out`` is written atomically: an error leaves nothing behind (and
    an existing jaxq directory there as it was). ``status(text)`` is shown while the source
    opens and the calibration windows are cut.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    if out.exists() and not (out / serialize.MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a jaxq compressed directory; refusing to "
                         "replace it")
    if str(source) != "default" and (Path(source) / serialize.MANIFEST).is_file():
        raise ValueError(f"{source} is already compressed; give the source model")
    status = status or (lambda _text: contextlib.nullcontext())
    t0 = time.perf_counter()
    with status(f"opening {source}"):
        m = open_model(source)
    cfg = m.config
    tok = m.tokenizer
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{source}: tokenizer mismatch: the tokenizer has {tok.vocab_size} "
                         f"tokens but the model's embedding has {cfg.vocab_size} rows")
    transform = recipe.build(head_dim=cfg.head_dim)
    check_streamable(recipe, transform)
    transform.check_patterns(param_shapes(cfg))
    for path, shape in m.shapes.items():  # fail now, not blocks into the run
        needs = transform.required_stats(path, jax.ShapeDtypeStruct(shape, m.dtype))
        if needs and not recipe.needs_calibration:
            raise RecipeError(f"{recipe.name}: needs calibration statistics {sorted(needs)} "
                              f"for '{path}' but has no calibration block")
        if needs and not _is_site(path, cfg):
            raise RecipeError(f"{recipe.name}: needs calibration statistics {sorted(needs)} "
                              f"for '{path}', but no matmul reads that leaf; leave it out "
                              "with where=")
    hs = None
    if recipe.needs_calibration:
        with status("cutting calibration windows"):
            hs = _calibration_inputs(m, recipe, calibration)
    pieces = _Pieces(recipe, transform)
    with atomic_output(out, serialize.JAXQ_DIR) as tmp:
        writer = serialize.ShardWriter(tmp)
        bar, tick = _progress(cfg.num_layers + 2, progress)
        try:
            embed = m.tensor("model/embed_tokens/weight")
            if hs is not None:
                hs = [jnp.take(embed, tokens, axis=0) for tokens in hs]
            model: dict[str, Any] = {}
            if not cfg.tie_word_embeddings:  # a tied one is compressed at the head, below
                model["embed_tokens"] = writer.put(pieces.leaves(
                    "model/embed_tokens", {"weight": embed}))
            del embed
            tick()
            layers = []
            for i in range(cfg.num_layers):
                layer = m.subtree(f"model/layers/{i}")
                if hs is None:
                    q = pieces.leaves(f"model/layers/{i}", layer)
                else:
                    q, hs = pieces.calibrated(f"model/layers/{i}", layer, hs,
                                              _block_fn(cfg, i))
                del layer
                layers.append(writer.put(q))
                del q
                tick()
            model["layers"] = layers
            tree = _head(m, pieces, writer, model, hs)
            tick()
        finally:
            if bar is not None:
                bar.stop()
        seconds = time.perf_counter() - t0
        figures = {"quantize_seconds": seconds, **pieces.size_figures(),
                   "fallback_layers": pieces.fallback, "streamed": True}
        extra = ({"tokenizer.json": tok.to_json_str(),
                  "tokenizer_config.json": json.dumps(tok.special_config(), indent=1)}
                 if tok is not None else {})
        writer.finish(tree, {"recipe": recipe.to_dict(), "source": m.source,
                             "config": dataclasses.asdict(cfg), "figures": figures},
                      extra_files=extra)
    return StreamResult(out, m.source, figures, m.nbytes)


def _is_site(path: str, cfg: LlamaConfig) -> bool:
    """Whether a matmul reads the leaf at ``path`` (the embedding only as a tied head)."""
    if path == "model/embed_tokens/weight":
        return cfg.tie_word_embeddings
    return path.endswith("/weight") and ("_proj/" in path or path.startswith("lm_head/"))


class _Pieces:
    """Compresses pieces the way the whole-tree run does, and sums their figures."""

    def __init__(self, recipe: Recipe, transform: Transform):
        self.recipe, self.transform = recipe, transform
        self.totals = [0, 0, 0, 0]
        self.fallback: list[str] = []

    def account(self, prefix: str, piece: Any) -> None:
        full = _nest(prefix, piece)
        r = size_report(full)
        for i, v in enumerate((r.total_bytes, r.n_params, r.linear_bytes, r.linear_params)):
            self.totals[i] += v
        self.fallback += fallen_back(full, self.recipe)

    def leaves(self, prefix: str, piece: Any) -> Any:
        """Each leaf through ``apply_leaf`` as ``Transform.__call__`` applies it (each step of
        a chain in turn is the same, leaf by leaf, for leaf transforms)."""
        full = map_with_path(lambda p, x: self.transform.apply_leaf(p, x), _nest(prefix, piece))
        q = _unnest(prefix, full)
        jax.block_until_ready(jax.tree.leaves(q))
        self.account(prefix, q)
        return q

    def calibrated(self, prefix: str, piece: Any, hs: list, fn: Callable) -> tuple[Any, list]:
        from jaxq.calib.interpreter import calibrate_sequential

        full, outs = calibrate_sequential(fn, _nest(prefix, piece), [(h,) for h in hs],
                                          self.transform, progress=False)
        q = _unnest(prefix, full)
        jax.block_until_ready(jax.tree.leaves(q))
        self.account(prefix, q)
        return q, outs

    def size_figures(self) -> dict:
        total, n, lin, lin_n = self.totals
        return {"size_mb": total / 1e6, "params": n, "bits_per_weight": 8.0 * total / n,
                "linear_bits_per_weight": 8.0 * lin / max(lin_n, 1)}


def _nest(prefix: str, piece: Any) -> Any:
    """``piece`` at ``prefix`` in a tree of its own, so its leaves have their full paths."""
    for key in reversed(prefix.split("/")):
        piece = {int(key) if key.isdigit() else key: piece}
    return piece


def _unnest(prefix: str, tree: Any) -> Any:
    for key in prefix.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def _block_fn(cfg: LlamaConfig, i: int) -> Callable:
    """Block ``i`` as a model of its own: ``(params, h) -> h``, params nested at its path."""

    def fn(params: Any, h: jax.Array) -> jax.Array:
        cos, sin = rope_angles(jnp.arange(h.shape[1])[None], cfg.head_dim, cfg.rope_theta)
        return decoder_layer(params["model"]["layers"][i], h, cos, sin, cfg)

    return fn


def _head(m: LazyModel, pieces: _Pieces, writer: serialize.ShardWriter, model: dict,
          hs: list | None) -> dict:
    """Compress the final norm and the output head (the tied embedding), write them, and
    return the whole tree of stand-ins."""
    cfg = m.config
    head = "model/embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    params: dict[str, Any] = {"model": {"norm": m.subtree("model/norm")}}
    if cfg.tie_word_embeddings:
        params["model"]["embed_tokens"] = m.subtree(head)
    else:
        params["lm_head"] = m.subtree(head)
    if hs is None:
        q = {"model": {k: pieces.leaves(f"model/{k}", v) for k, v in params["model"].items()}}
        if "lm_head" in params:
            q["lm_head"] = pieces.leaves("lm_head", params["lm_head"])
    else:
        from jaxq.calib import calibrate

        def fn(p: Any, h: jax.Array) -> jax.Array:
            hn = rms_norm(h, p["model"]["norm"]["weight"], cfg.rms_norm_eps)
            w = p["model"]["embed_tokens"] if cfg.tie_word_embeddings else p["lm_head"]
            return linear(hn, w).astype(jnp.float32)

        # The logits are never computed: the pass keeps only what reaches a site.
        q, _ = calibrate(fn, params, [(h,) for h in hs], pieces.transform, sequential=True,
                         progress=False)
        jax.block_until_ready(jax.tree.leaves(q))
        for k, v in q["model"].items():
            pieces.account(f"model/{k}", v)
        if "lm_head" in q:
            pieces.account("lm_head", q["lm_head"])
    del params
    model["norm"] = writer.put(q["model"]["norm"])
    if cfg.tie_word_embeddings:
        model["embed_tokens"] = writer.put(q["model"]["embed_tokens"])
    tree: dict[str, Any] = {"model": model}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = writer.put(q["lm_head"])
    return tree


def _calibration_inputs(m: LazyModel, recipe: Recipe, overrides: Mapping | None) -> list:
    """The calibration token batches, cut as :func:`jaxq.recipes.run` cuts them."""
    from jaxq.eval.data import calibration_windows, window_batches

    cal = {**(recipe.calibration or {}), **(overrides or {})}
    if m.tokenizer is None:
        raise ValueError(f"{recipe.name} calibrates on PTB text, and {m.source} has no "
                         "tokenizer")
    windows = calibration_windows(m.tokenizer, n=int(cal.get("windows", 128)),
                                  length=int(cal.get("length", 512)))
    return [b[0] for b in window_batches(windows, int(cal.get("batch", 8)))]


def _progress(total: int, enabled: bool) -> tuple[Any, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("compressing block by block", total=total)
    bar.start()
    return bar, lambda: bar.advance(task)
