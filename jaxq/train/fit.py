"""A small fit loop (not a framework): sharding, checkpoints, resume, progress and eval.

Resume is exact because everything a step depends on is either in the checkpoint (params,
optimizer state, transform state, step) or a pure function of the step (the batch: see
:class:`jaxq.train.data.TokenWindows`). Any ``step -> batch`` callable with that property works.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxq.train.checkpoint import Checkpointer
from jaxq.train.step import (
    LossFn,
    TrainState,
    Transform,
    all_floats,
    init_state,
    make_train_step,
    state_params,
)

# --- sharding -----------------------------------------------------------------------------------

def fsdp_spec(shape: tuple[int, ...], n: int, axis: str) -> PartitionSpec:
    """Shard the largest dimension divisible by ``n`` over ``axis``; replicate if none is."""
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
    if not dims:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[int(dims[0])] = axis
    return PartitionSpec(*spec)


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in Auto mode: the shardings here are placed on inputs and XLA
    propagates them through model code that carries no sharding annotations (``jax.make_mesh``
    makes Explicit axes, under which an unannotated embedding gather is an error)."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def tree_shardings(tree: Any, mesh: Mesh, mode: str, axis: str | None = None) -> Any:
    """Per-array shardings: ``"dp"`` replicates every array on every device (data parallel);
    ``"fsdp"`` splits each array over the data axis as well (ZeRO-3: params, gradients and
    optimizer state take 1/n of the memory, XLA all-gathers a weight where it is used)."""
    axis = axis or mesh.axis_names[0]
    if mode not in ("dp", "fsdp"):
        raise ValueError(f"sharding must be 'dp' or 'fsdp', got {mode!r}")
    n = mesh.shape[axis]

    def one(x: Any) -> NamedSharding:
        if mode == "dp" or np.ndim(x) == 0:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fsdp_spec(np.shape(x), n, axis))
    return jax.tree.map(one, tree)


def batch_shardings(batch: Any, mesh: Mesh, axis: str | None = None) -> Any:
    """Split every batch entry's leading axis over the data axis (replicate if indivisible)."""
    axis = axis or mesh.axis_names[0]
    n = mesh.shape[axis]

    def one(x: Any) -> NamedSharding:
        if np.ndim(x) and np.shape(x)[0] % n == 0:
            return NamedSharding(mesh, PartitionSpec(axis))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, batch)


# --- the loop -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _jitted_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, accum_steps: int,
                 compute_dtype: Any, transform: Transform | None, has_aux: bool,
                 mesh: Mesh | None, sharding: str) -> Callable:
    """One jitted step per configuration, so repeated ``fit`` calls (a resume, a second stage
    with the same loss and optimizer) reuse the compiled program."""
    step_fn = make_train_step(loss_fn, optimizer, accum_steps=accum_steps,
                              compute_dtype=compute_dtype, transform=transform, has_aux=has_aux)
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)

    def sharded(state: TrainState, batch: Any, *args: Any) -> tuple[TrainState, dict]:
        new, metrics = step_fn(state, batch, *args)  # keep the state where fit placed it
        return jax.lax.with_sharding_constraint(new, tree_shardings(new, mesh, sharding)), metrics
    return jax.jit(sharded, donate_argnums=0)


@dataclasses.dataclass
class FitResult:
    """``params`` and ``extra`` (transform state) after training, the final ``state``, the
    per-step ``losses`` of this call (from ``start_step`` on) and ``evals``: (step, metrics)."""

    params: Any
    extra: Any
    state: TrainState
    losses: list[float]
    start_step: int
    evals: list[tuple[int, dict]]


def _progress(enabled: bool, total: int, start: int) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn())
    bar.start()
    bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    return bar


def _tokens(batch: Any, data: Any) -> int:
    if hasattr(data, "tokens_per_batch"):
        return int(data.tokens_per_batch)
    if isinstance(batch, dict) and "tokens" in batch:
        return int(np.size(batch["tokens"]))
    return 0


def fit(loss_fn: LossFn, params: Any, data: Callable[[int], Any], *,
        optimizer: optax.GradientTransformation, steps: int, args: tuple = (),
        extra: Any = None, transform: Transform | None = None,
        trainable: Callable[[str, Any], bool] | None = all_floats, has_aux: bool = False,
        accum_steps: int = 1, compute_dtype: Any = None, mesh: Mesh | None = None,
        sharding: str = "dp", checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100, keep: int = 2,
        eval_fn: Callable[[Any, Any], dict] | None = None, eval_every: int = 0,
        callback: Callable[[int, dict], None] | None = None, progress: bool = True,
        ) -> FitResult:
    """Train ``params`` for ``steps`` steps of ``loss_fn(params, batch, *args)``.

    ``data(step)`` gives the batch of a step (deterministic in ``step``: that is what makes
    resume exact). ``extra``/``transform``: a params transform and its trained state (QAT:
    ``extra=spec.init(params), transform=spec.apply``). ``args`` (e.g. a
    :class:`jaxq.distill.Teacher`) pass to the loss untrained, sharded like the params.
    With ``checkpoint_dir``, the state and data position are saved every ``checkpoint_every``
    steps and at the end, and a run finding a checkpoint there resumes from the newest one.
    ``mesh``: data parallel (``sharding="dp"``) or FSDP (``"fsdp"``) over its first axis.
    ``eval_fn(params, extra) -> dict`` runs every ``eval_every`` steps; ``callback(step,
    metrics)`` after every step (``metrics["loss"]`` a float).
    """
    state = init_state(params, optimizer, extra=extra, trainable=trainable)
    # the step donates its state; copy so the caller's params are not the buffers donated
    state = jax.tree.map(jnp.copy, state)
    if mesh is not None:
        mesh = auto_mesh(mesh)
        state = jax.device_put(state, tree_shardings(state, mesh, sharding))
        args = jax.device_put(args, tree_shardings(args, mesh, sharding))
    else:  # committed, like a restored state: a resumed run then reuses the compiled step
        state = jax.device_put(state, jax.devices()[0])
    jstep = _jitted_step(loss_fn, optimizer, accum_steps, compute_dtype, transform, has_aux,
                         mesh, sharding)

    ckpt = Checkpointer(checkpoint_dir, every=checkpoint_every, keep=keep) \
        if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and (latest := ckpt.latest()) is not None:
        state, meta = ckpt.restore(latest, state)
        start = int(meta["step"])
        if hasattr(data, "position") and int(meta["position"]) != data.position(start):
            raise ValueError(f"fit: checkpoint {latest} was written at data position "
                             f"{meta['position']}, this data source puts step {start} at "
                             f"{data.position(start)} (batch size or data changed?)")

    losses: list[float] = []
    evals: list[tuple[int, dict]] = []
    bar = _progress(progress, steps, start)
    try:
        for s in range(start, steps):
            t0 = time.perf_counter()
            batch = data(s)
            if mesh is not None:
                batch = jax.device_put(batch, batch_shardings(batch, mesh))
            state, metrics = jstep(state, batch, *args)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            losses.append(metrics["loss"])
            if bar is not None:
                tps = _tokens(batch, data) / max(time.perf_counter() - t0, 1e-9)
                bar.update(bar.task_ids[0], advance=1, loss=metrics["loss"], tps=tps)
            if callback is not None:
                callback(s, metrics)
            done = s + 1
            if ckpt is not None and (done % checkpoint_every == 0 or done == steps):
                position = data.position(done) if hasattr(data, "position") else done
                ckpt.save(done, state, {"step": done, "position": int(position)})
            if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
                evals.append((done, eval_fn(*state_params(state))))
    finally:
        if bar is not None:
            bar.stop()
        if ckpt is not None:
            ckpt.close()
    p, e = state_params(state)
    return FitResult(p, e, state, losses, start, evals)
