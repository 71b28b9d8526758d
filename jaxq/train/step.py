"""A train step for jaxq models: optax, a params transform with its own trained state (QAT),
gradient accumulation, a compute dtype, and the trainable/frozen split of compressed leaves.

The step is one pure function ``step(state, batch, *args) -> (state, metrics)``; jit it, shard
its inputs, or call it from your own loop. ``args`` (a :class:`jaxq.distill.Teacher`, say) are
passed through to the loss untouched and untrained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxq.core.leaf import combine, partition

Transform = Callable[[Any, Any], Any]
LossFn = Callable[..., Any]


class TrainState(NamedTuple):
    """Everything a run needs to continue: ``trainable`` and ``frozen`` are
    ``{"params": ..., "extra": ...}`` halves (``extra``: the transform's state, e.g. QAT
    scales), ``opt_state`` the optimizer's state over ``trainable``."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any


def all_floats(path: str, x: Any) -> bool:
    """The default ``trainable`` rule: every float array trains (integer codes never do)."""
    return True


def init_state(params: Any, optimizer: optax.GradientTransformation, *, extra: Any = None,
               trainable: Callable[[str, Any], bool] | None = all_floats) -> TrainState:
    """Split ``params`` (by ``jaxq.partition(params, trainable)``) and ``extra`` (every float
    trains) into trainable and frozen halves, and initialise the optimizer on the first.

    ``trainable=None`` trains only the float children of compressed leaves (scales, factors).
    """
    tp, fp = partition(params, trainable)
    te, fe = partition(extra, all_floats)
    train = {"params": tp, "extra": te}
    return TrainState(jnp.zeros((), jnp.int32), train, {"params": fp, "extra": fe},
                      optimizer.init(train))


def state_params(state: TrainState) -> tuple[Any, Any]:
    """``(params, extra)`` of a state, halves recombined (the raw, untransformed params)."""
    full = combine(state.trainable, state.frozen)
    return full["params"], full["extra"]


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast the float arrays of ``tree`` (compressed leaves' scales included) to ``dtype``."""
    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x
    return jax.tree.map(cast, tree)


def _split_micro(batch: Any, n: int) -> Any:
    def split(path: tuple, x: Any) -> Any:
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"train step: batch entry {jax.tree_util.keystr(path)} of shape "
                             f"{x.shape} does not split into accum_steps={n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree_util.tree_map_with_path(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    accum_steps: int = 1, compute_dtype: Any = None,
                    transform: Transform | None = None, has_aux: bool = False
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``step(state, batch, *args) -> (state, metrics)``.

    ``loss_fn(params, batch, *args)`` returns a scalar (or ``(scalar, aux dict)`` with
    ``has_aux``). The params it sees are ``transform(params, extra)`` (e.g.
    ``lambda p, s: qat_spec.apply(p, s)``: gradients reach both the params and the
    transform's state), then cast to ``compute_dtype`` (e.g. bf16; the master copy and the
    optimizer stay in float32, and the cast's transpose returns float32 gradients).

    ``accum_steps > 1`` splits the batch's leading axis into that many micro-batches, scans
    over them and applies the mean gradient once: the same update as the whole batch at
    1/accum_steps of the activation memory (exactly the same when each micro-batch's loss is a
    mean over the same number of positions).
    """
    if accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be >= 1, got {accum_steps}")

    def model_params(trainable: Any, frozen: Any) -> Any:
        full = combine(trainable, frozen)
        params = full["params"]
        if transform is not None:
            params = transform(params, full["extra"])
        if compute_dtype is not None:
            params = cast_floats(params, compute_dtype)
        return params

    def micro_loss(trainable: Any, frozen: Any, batch: Any, args: tuple) -> tuple:
        out = loss_fn(model_params(trainable, frozen), batch, *args)
        loss, aux = out if has_aux else (out, {})
        return jnp.asarray(loss, jnp.float32), aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Any, *args: Any) -> tuple[TrainState, dict]:
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.trainable, state.frozen, batch, args)
        else:
            def body(carry: tuple, micro: Any) -> tuple:
                gsum, lsum = carry
                (loss, aux), g = grad_fn(state.trainable, state.frozen, micro, args)
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss), aux

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (gsum, lsum), auxs = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32)), _split_micro(batch, accum_steps))
            grads = jax.tree.map(lambda g: g / accum_steps, gsum)
            loss = lsum / accum_steps
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return TrainState(state.step + 1, trainable, state.frozen, opt_state), metrics

    return step
