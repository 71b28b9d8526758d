"""Training pipelines: recipes whose ``stages:`` chain calibrated transforms and training.

A pipeline recipe has ``stages`` instead of ``transforms``; each stage is a mapping with a
``stage`` kind:

- ``prune`` / ``quantize``: ``transforms: [{method: ..., ...}]`` (any recipe method, e.g.
  ``sparsegpt``, ``wanda``, ``structured``, ``drop_blocks``, ``gptq``, ``awq``), calibrated on
  PTB train like ``jaxq compress`` (``calibration: {windows, length, batch, mode}`` on the
  stage, else the recipe's); the config follows shrunk layers. Exact zeros a ``prune`` stage
  leaves in a matrix are kept as a frozen mask for every later training stage.
- ``distill``: knowledge distillation from the dense teacher (the model as loaded): ``steps``,
  ``lr``, ``alpha`` (weight of the KD term; ``1 - alpha`` goes to hard-label CE),
  ``temperature``, ``batch``, ``seq_len``, ``warmup``.
- ``qat``: the same, through a :class:`jaxq.qat.QAT` fake-quantizer (``bits``, ``group_size``,
  ``estimator``, ``where``, ``overrides``, ...): continues the previous ``quantize`` stage's
  grid (``QAT.init(from_=...)``) when there is one, and ends converted to QArrays.

Training stages read defaults from the recipe's ``train:`` mapping (``teacher_topk: k`` serves
the teacher as top-k logits cached once on disk instead of a live second model). Every stage's
output is saved under ``work_dir`` and each training stage checkpoints, so a killed run resumes
where it stopped (:func:`run_pipeline`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.core import serialize
from jaxq.core.leaf import is_leaf
from jaxq.core.tree import flatten_with_paths
from jaxq.recipes import RecipeError

STAGES = ("prune", "quantize", "distill", "qat")
TRAIN_KEYS = {"steps", "lr", "alpha", "temperature", "batch", "seq_len", "warmup",
              "checkpoint_every", "teacher_topk", "seed", "weight_decay"}
TRAIN_DEFAULTS = {"steps": 100, "lr": 1e-4, "alpha": 1.0, "temperature": 1.0, "batch": 4,
                  "seq_len": 256, "warmup": 0, "checkpoint_every": 25, "teacher_topk": None,
                  "seed": 0, "weight_decay": 0.0}
QAT_KEYS = {"bits", "group_size", "format", "symmetric", "clip", "scale_dtype", "estimator",
            "learn_clip", "act_bits", "where", "overrides"}


class PipelineError(RecipeError):
    """A pipeline recipe that cannot run."""


# --- validation --------------------------------------------------------------------------------

def check_stages(stages: list, recipe_name: str) -> tuple[dict, ...]:
    """Validate ``stages`` now (kinds, options, transforms buildable), not after a model loads."""
    from jaxq.recipes import METHODS, build_transform

    out = []
    for i, st in enumerate(stages):
        where = f"{recipe_name}: stage #{i}"
        if not isinstance(st, dict) or st.get("stage") not in STAGES:
            raise PipelineError(f"{where} needs 'stage' set to one of {', '.join(STAGES)}")
        kind = st["stage"]
        allowed = {"stage", "name"} | {
            "prune": {"transforms", "calibration"}, "quantize": {"transforms", "calibration"},
            "distill": TRAIN_KEYS, "qat": TRAIN_KEYS | QAT_KEYS}[kind]
        unknown = sorted(set(st) - allowed)
        if unknown:
            raise PipelineError(f"{where} ({kind}) has no option(s) {unknown}; "
                                f"options: {sorted(allowed - {'stage'})}")
        if kind in ("prune", "quantize"):
            if not isinstance(st.get("transforms"), list) or not st["transforms"]:
                raise PipelineError(f"{where} ({kind}) needs a 'transforms' list")
            for j, spec in enumerate(st["transforms"]):
                if not isinstance(spec, dict) or spec.get("method") not in METHODS:
                    raise PipelineError(f"{where}: unknown method in transform #{j} "
                                        f"({spec!r}); known methods: {', '.join(METHODS)}")
                build_transform(spec, recipe_name)
        if kind == "qat":
            qat_spec(st)
        out.append(dict(st))
    return tuple(out)


def qat_spec(stage: dict) -> Any:
    from jaxq.qat import QAT

    fields = {k: v for k, v in stage.items() if k in QAT_KEYS}
    fields.setdefault("estimator", "lsq+")
    if "overrides" in fields:
        fields["overrides"] = dict(fields["overrides"] or {})
    try:
        return QAT(**fields)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"qat stage: {err}") from None


# --- the model being carried through the stages -----------------------------------------------

@dataclasses.dataclass
class Model:
    """What flows between stages: params (possibly compressed), their Llama config, the PTQ
    result a ``qat`` stage continues (``ptq``), and prune masks (bool tree or None)."""

    params: Any
    config: Any
    ptq: Any = None
    masks: Any = None


@dataclasses.dataclass
class PipelineResult:
    params: Any
    config: Any
    stages: list[dict]


def _apply_fn(config: Any, params: Any) -> Callable:
    from jaxq.calib import apply
    from jaxq.models.llama import make_apply_fn

    fn = make_apply_fn(config)
    compressed = any(is_leaf(x) for _, x in flatten_with_paths(params)[0])
    return apply(fn) if compressed else fn


def zero_masks(params: Any) -> Any:
    """True where a float matrix is nonzero, for pruned matrices (at least 1% exact zeros: a
    dense weight's stray zeros are not a pattern to keep); None elsewhere."""
    def one(x: Any) -> Any:
        if is_leaf(x) or jnp.ndim(x) != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return None
        m = np.asarray(x) != 0
        return None if m.mean() > 0.99 else jnp.asarray(m)
    return jax.tree.map(one, params, is_leaf=is_leaf)


def apply_masks(params: Any, masks: Any) -> Any:
    """Pruned weights held at exactly zero (gradients through them are zero too)."""
    if masks is None:
        return params
    return jax.tree.map(lambda x, m: x if m is None else jnp.where(m, x, 0).astype(x.dtype),
                        params, masks, is_leaf=lambda x: x is None or is_leaf(x))


# --- stages ------------------------------------------------------------------------------------

def _calibrate(model: Model, transforms: list[dict], cal: dict, tokenizer: Any,
               progress: bool) -> Any:
    from jaxq.calib import calibrate
    from jaxq.core.transform import chain
    from jaxq.eval.data import calibration_windows, window_batches
    from jaxq.models.structure import llama_block_distances
    from jaxq.prune.structured import needs_distances, resolve_blocks
    from jaxq.recipes import build_transform

    transform = chain(*(build_transform(t, "pipeline", model.config.head_dim)
                        for t in transforms))
    if not cal:  # RTN-like transforms: no statistics
        return transform(model.params)
    windows = calibration_windows(tokenizer, n=int(cal.get("windows", 32)),
                                  length=int(cal.get("length", 512)))
    batches = window_batches(windows, int(cal.get("batch", 8)))
    if needs_distances(transform):  # blocks to drop: chosen from the residual stream
        transform = resolve_blocks(transform, llama_block_distances(model.params, model.config,
                                                                    batches))
    apply_fn = _apply_fn(model.config, model.params)
    mode = str(cal.get("mode", "sequential"))
    if mode not in ("sequential", "collect"):
        raise PipelineError(f"calibration mode must be 'sequential' or 'collect', got {mode!r}")
    if mode == "collect" and not any(transform.required_stats(p, x)
                                     for p, x in flatten_with_paths(model.params)[0]):
        return transform(model.params)  # e.g. blocks dropped by hidden-state distances alone
    # calibrate() in collect mode hands AWQ the scale groups it finds in the trace, so its
    # scales fold into the norms and linears that feed each site (not kept as input scales)
    params, _ = calibrate(apply_fn, model.params, batches, transform, progress=progress,
                          sequential=mode == "sequential")
    return params


def train_windows(tokenizer: Any, n: int, seq_len: int) -> np.ndarray:
    """``n`` windows of ``seq_len`` tokens of PTB train (the training text)."""
    from jaxq.eval.data import ptb_text, token_windows

    return token_windows(tokenizer, ptb_text("train"), n, seq_len)


def kd_loss(apply_fn: Callable, alpha: float, temperature: float, cached: bool) -> Callable:
    """``loss(params, batch, *teacher)``: Hinton KD (α·T²·KL + (1-α)·CE) against a live
    teacher, or top-k KD against ``batch["teacher"]`` (cached, temperature 1)."""
    from jaxq import distill

    if cached:
        def loss(params: Any, batch: dict) -> jax.Array:
            tokens = batch["tokens"]
            logits = apply_fn(params, tokens)[:, :-1]
            topk = jax.tree.map(lambda a: a[:, :-1], batch["teacher"])
            kd = distill.topk_kd(logits, topk)
            if alpha == 1.0:
                return kd
            return alpha * kd + (1 - alpha) * distill.cross_entropy(logits, tokens[:, 1:])
        return loss

    def live(params: Any, batch: dict, teacher: Any) -> jax.Array:
        tokens = batch["tokens"]
        if alpha == 0.0:  # hard labels only: no teacher forward
            return distill.cross_entropy(apply_fn(params, tokens)[:, :-1], tokens[:, 1:])
        return distill.hinton_kd(apply_fn(params, tokens)[:, :-1], teacher(tokens)[:, :-1],
                                 tokens[:, 1:], temperature=temperature, alpha=alpha)
    return live


def _train(model: Model, stage: dict, opts: dict, ctx: dict, work: Path) -> Model:
    """A ``distill`` or ``qat`` stage: fit with KD from the dense teacher, resumable."""
    from jaxq import distill
    from jaxq.qat import latent_from
    from jaxq.train import TokenWindows, fit

    steps, bs = int(opts["steps"]), int(opts["batch"])
    windows = train_windows(ctx["tokenizer"], steps * bs, int(opts["seq_len"]))
    data: Any = TokenWindows(windows, bs, seed=int(opts["seed"]))
    teacher = distill.frozen_teacher(ctx["teacher_apply"], ctx["teacher_params"])
    args: tuple = (teacher,)
    k = opts["teacher_topk"]
    cached = bool(k) and float(opts["alpha"]) > 0
    if cached:
        cache_dir = Path(ctx.get("teacher_cache") or work.parent / "teacher-topk")
        path = cache_dir / f"k{int(k)}-n{len(windows)}-t{windows.shape[1]}"
        if not path.is_dir():
            try:
                distill.cache_topk(teacher, windows, path, k=int(k))
            except OSError:  # a parallel run sharing the cache finished it first
                if not path.is_dir():
                    raise
        cache = distill.TopKCache(path)
        data, args = cache.attach(data), ()

    masks = model.masks
    if stage["stage"] == "qat":
        spec = qat_spec(stage)
        if model.ptq is not None:
            params = latent_from(model.ptq)
            extra = {"qat": spec.init(params, from_=model.ptq), "masks": masks}
        else:
            params = model.params
            extra = {"qat": spec.init(params), "masks": masks}

        def transform(p: Any, e: Any) -> Any:
            return spec.apply(apply_masks(p, e["masks"]), e["qat"])
    else:  # float16 scales of a PTQ leaf cannot take Adam's small steps: train in float32
        spec, params, extra = None, _cast_floats(model.params, jnp.float32), {"masks": masks}

        def transform(p: Any, e: Any) -> Any:
            return apply_masks(p, e["masks"])

    apply_fn = _apply_fn(model.config, params)
    loss = kd_loss(apply_fn, float(opts["alpha"]), float(opts["temperature"]), cached)
    warmup = min(int(opts["warmup"]), steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(opts["lr"]), max(warmup, 1), steps) \
        if warmup else optax.cosine_decay_schedule(float(opts["lr"]), steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=float(opts["weight_decay"])))
    every = int(opts["checkpoint_every"])
    record = _LossLog(work / "losses.json", every, ctx["callback"])
    res = fit(loss, params, data, optimizer=optimizer, steps=steps, args=args, extra=extra,
              transform=transform, checkpoint_dir=work / "checkpoints", checkpoint_every=every,
              progress=ctx["progress"], callback=record)
    record.flush()
    p = apply_masks(res.params, res.extra["masks"])
    if spec is not None:
        return Model(spec.convert(p, res.extra["qat"]), model.config, None, masks)
    return Model(jax.tree.map(lambda new, old: new.astype(old.dtype), p, model.params),
                 model.config, None, masks)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


class _LossLog:
    """Per-step losses of a stage in ``path``, written with each checkpoint, so that a resumed
    run's list continues the killed run's (entries from the resumed step on are replaced)."""

    def __init__(self, path: Path, every: int, callback: Callable | None) -> None:
        self.path, self.every, self.callback = path, every, callback
        self.start: int | None = None
        self.losses: list[float] = []

    def __call__(self, step: int, metrics: dict) -> None:
        if self.start is None:
            self.start = step
        self.losses.append(metrics["loss"])
        if (step + 1) % self.every == 0:
            self.flush()
        if self.callback is not None:
            self.callback(step, metrics)

    def flush(self) -> None:
        if self.start is None:
            return
        old = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.path.write_text(json.dumps(old[:self.start] + self.losses))


def stage_losses(work_dir: str | Path, index: int, stage: dict) -> list[float]:
    path = Path(work_dir) / _stage_name(index, stage) / "losses.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _stage_name(i: int, stage: dict) -> str:
    return f"{i:02d}-{stage.get('name', stage['stage'])}"


def _run_stage(model: Model, stage: dict, opts: dict, ctx: dict, work: Path) -> Model:
    from jaxq.models.structure import config_for_params

    kind = stage["stage"]
    if kind in ("prune", "quantize"):
        cal = {**ctx["calibration"], **(stage.get("calibration") or {})}
        dense = Model(apply_masks(model.params, model.masks), model.config)
        params = _calibrate(dense, stage["transforms"], cal, ctx["tokenizer"], ctx["progress"])
        config = config_for_params(params, model.config)  # structured pruning shrinks layers
        if kind == "prune":
            return Model(params, config, None, zero_masks(params))
        if model.masks is not None and config != model.config:
            raise PipelineError("a quantize stage cannot change the model's shape")
        return Model(params, config, params, model.masks)
    return _train(model, stage, opts, ctx, work)


def run_pipeline(recipe: Any, params: Any, config: Any, tokenizer: Any, work_dir: str | Path,
                 *, steps: int | None = None, progress: bool = True,
                 teacher_cache: str | Path | None = None,
                 on_stage: Callable[[int, dict], None] | None = None,
                 callback: Callable[[int, dict], None] | None = None) -> PipelineResult:
    """Run ``recipe.stages`` on the float model ``params`` (also the teacher).

    Each finished stage's model is saved in ``work_dir`` (``NN-kind/model``) and training
    stages checkpoint into ``NN-kind/checkpoints``: run it again with the same ``work_dir``
    and it continues from the last finished stage and the newest checkpoint. ``steps``
    overrides every training stage's step count; ``teacher_cache`` is where cached teacher
    top-k logits live (shareable between runs on the same windows). ``on_stage(i, stage)``
    is called as a stage starts, ``callback(step, metrics)`` after every training step.
    """
    from jaxq.models.llama import make_apply_fn

    if not recipe.stages:
        raise PipelineError(f"{recipe.name} has no 'stages': use `jaxq compress` for it")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = {"tokenizer": tokenizer, "progress": progress, "teacher_params": params,
           "teacher_apply": make_apply_fn(config), "teacher_cache": teacher_cache,
           "calibration": dict(recipe.calibration or {}), "callback": callback}
    model = Model(params, config)
    done: list[dict] = []
    for i, stage in enumerate(recipe.stages):
        work = work_dir / _stage_name(i, stage)
        work.mkdir(exist_ok=True)
        opts = {**TRAIN_DEFAULTS, **(recipe.train or {}),
                **{k: v for k, v in stage.items() if k in TRAIN_KEYS}}
        if steps is not None:
            opts["steps"] = steps
        saved = work / "model"
        if (saved / serialize.MANIFEST).is_file():
            model = _load_stage(saved, model)
        else:
            if on_stage is not None:
                on_stage(i, stage)
            model = _run_stage(model, stage, opts, ctx, work)
            _save_stage(saved, model)
        done.append({"stage": stage["stage"], **({"steps": int(opts["steps"])}
                                                  if stage["stage"] in ("distill", "qat")
                                                  else {}),
                     "losses": stage_losses(work_dir, i, stage)})
    return PipelineResult(model.params, model.config, done)


def _save_stage(path: Path, model: Model) -> None:
    masks = None if model.masks is None else jax.tree.map(
        lambda m: None if m is None else m.astype(jnp.uint8), model.masks,
        is_leaf=lambda x: x is None)
    serialize.save(path, {"params": model.params, "masks": masks},
                   {"config": dataclasses.asdict(model.config),
                    "ptq": model.ptq is not None})


def _load_stage(path: Path, like: Model) -> Model:
    from jaxq.models.llama import LlamaConfig

    tree, meta = serialize.load(path)
    masks = tree.get("masks")
    masks = None if masks is None else jax.tree.map(
        lambda m: None if m is None else m.astype(bool), masks, is_leaf=lambda x: x is None)
    params = tree["params"]
    return Model(params, LlamaConfig(**meta["config"]), params if meta.get("ptq") else None,
                 masks)
