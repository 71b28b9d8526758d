"""A tiny Llama teacher, a fake-quantized student (a stand-in straight-through rounding, not
jaxq.qat) and a KD loss: the shared setup of the train tests and their subprocess runner."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _tinyllama import tiny_config, tiny_params

from jaxq import distill
from jaxq.models.llama import make_apply_fn
from jaxq.train import TokenWindows

CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8)
BITS = 2


@jax.custom_vjp
def round_ste(x):
    return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def _is_weight(x) -> bool:
    return hasattr(x, "ndim") and x.ndim == 2


def fq_init(params):
    """One learned scale per output row of every 2-D weight."""
    qmax = 2 ** (BITS - 1) - 1
    return jax.tree.map(lambda w: jnp.max(jnp.abs(w), axis=1, keepdims=True) / qmax
                        if _is_weight(w) else None, params)


def fq_apply(params, scales):
    """Signed BITS-bit fake quantization with a straight-through rounding (LSQ-style scales)."""
    lo, hi = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1

    def one(w, s):
        if s is None:
            return w
        return jnp.clip(round_ste(w / s), lo, hi) * s
    return jax.tree.map(one, params, scales, is_leaf=lambda x: x is None)


def kd_loss(params, batch, teacher):
    apply = make_apply_fn(CFG)
    logits = apply(params, batch["tokens"])
    t = teacher(batch["tokens"])
    return distill.hinton_kd(logits[:, :-1], t[:, :-1], batch["tokens"][:, 1:],
                             temperature=2.0, alpha=1.0)


def setup(batch_size: int = 8, seq: int = 16, n_windows: int = 64):
    teacher_params = tiny_params(CFG, scale=0.3)
    student = jax.tree.map(jnp.copy, teacher_params)
    teacher = distill.frozen_teacher(make_apply_fn(CFG), teacher_params)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(n_windows, seq))
    data = TokenWindows(tokens, batch_size, seed=1)
    return student, teacher, data


OPT = optax.adam(3e-3)


def optimizer():
    """The same optimizer object each time: fit then reuses its compiled step."""
    return OPT
