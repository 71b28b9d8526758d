"""Distillation losses: pure ``jnp``, jit-friendly, and padding-aware.

Every loss takes logits (or hidden states) shaped ``[batch, seq, ...]`` and an optional padding
``mask [batch, seq]`` (1 = real token). Padded positions leave both the sum and the normaliser,
so a batch's loss does not depend on what the model emits at padding. All arithmetic is in
float32 whatever the input dtype, because a bf16 log-softmax over a 50k vocabulary loses the
small probabilities that KL is made of.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TopK(NamedTuple):
    """A teacher's next-token distribution kept as its top ``k`` outcomes plus one tail bucket.

    ``logprobs [..., k]`` and ``indices [..., k]`` are the k most likely tokens and their log
    probabilities (temperature 1); ``log_tail [...]`` is the log of the total probability of
    every other token (``-inf`` when ``k`` is the whole vocabulary). Together they are a proper
    distribution over ``k + 1`` outcomes.
    """

    logprobs: jax.Array
    indices: jax.Array
    log_tail: jax.Array


# --- reductions ---------------------------------------------------------------------------------

def masked_mean(per_position: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``per_position [batch, seq]`` over unpadded positions (0 if there are none)."""
    if mask is None:
        return jnp.mean(per_position)
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {mask.shape} != per-position loss shape "
                         f"{per_position.shape} (expected [batch, seq])")
    m = mask.astype(jnp.float32)
    # where, not multiply: padded positions may hold inf/nan and must not leak into the sum
    total = jnp.sum(jnp.where(m > 0, per_position, 0.0) * m)
    return total / jnp.maximum(jnp.sum(m), 1.0)


def _xlogx_ratio(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """``p (log p - log q)`` with ``0 log 0 = 0`` and NaN-free gradients where ``p = 0``."""
    live = jnp.isfinite(logp)
    safe_p = jnp.where(live, logp, 0.0)
    safe_q = jnp.where(live, logq, 0.0)
    return jnp.where(live, jnp.exp(safe_p) * (safe_p - safe_q), 0.0)


def _log_softmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


# --- per-position divergences -------------------------------------------------------------------

def kl_per_position(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """``KL(p || q)`` over the last axis, from log-probabilities."""
    return jnp.sum(_xlogx_ratio(logp, logq), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                  ) -> jax.Array:
    """Hard-label cross-entropy, ``logits [B, T, V]`` against integer ``labels [B, T]``."""
    logq = _log_softmax(logits)
    nll = -jnp.take_along_axis(logq, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return masked_mean(nll, mask)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               mask: jax.Array | None = None, *, temperature: float = 1.0) -> jax.Array:
    """``KL(teacher || student)``: mean-seeking, the student must cover all the teacher's mass."""
    return masked_mean(kl_per_position(_log_softmax(teacher_logits, temperature),
                                       _log_softmax(student_logits, temperature)), mask)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               mask: jax.Array | None = None, *, temperature: float = 1.0) -> jax.Array:
    """``KL(student || teacher)``: mode-seeking, the student may drop the teacher's minor modes."""
    return masked_mean(kl_per_position(_log_softmax(student_logits, temperature),
                                       _log_softmax(teacher_logits, temperature)), mask)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array,
                    mask: jax.Array | None = None, *, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    With ``M = beta P + (1 - beta) Q`` (P the teacher, Q the student):
    ``beta KL(P || M) + (1 - beta) KL(Q || M)``. ``beta = 0.5`` is the symmetric JSD; small
    ``beta`` behaves like ``beta``-scaled forward KL, large like reverse KL. Bounded, so one
    confident wrong token cannot dominate a batch.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd: beta must be in (0, 1), got {beta}")
    logp = _log_softmax(teacher_logits, temperature)
    logq = _log_softmax(student_logits, temperature)
    logm = jnp.logaddexp(jnp.log(beta) + logp, jnp.log1p(-beta) + logq)
    per = beta * kl_per_position(logp, logm) + (1.0 - beta) * kl_per_position(logq, logm)
    return masked_mean(per, mask)


def hinton_kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array | None,
              mask: jax.Array | None = None, *, temperature: float = 2.0,
              alpha: float = 0.5) -> jax.Array:
    """Hinton et al. (2015) knowledge distillation.

    ``alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE(s, labels)``. The ``T^2``
    keeps the soft term's gradient scale independent of ``T`` (gradients of the softened KL
    shrink as ``1/T^2``). ``alpha = 1`` is pure distillation and needs no labels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"hinton_kd: alpha must be in [0, 1], got {alpha}")
    soft = forward_kl(student_logits, teacher_logits, mask, temperature=temperature)
    loss = alpha * temperature ** 2 * soft
    if alpha < 1.0:
        if labels is None:
            raise ValueError("hinton_kd: alpha < 1 mixes in hard-label CE, so labels are needed")
        loss = loss + (1.0 - alpha) * cross_entropy(student_logits, labels, mask)
    return loss


# --- top-k distillation --------------------------------------------------------------------------

def _topk_mask(indices: jax.Array, vocab: int) -> jax.Array:
    """Bool ``[..., vocab]``, True at the given ``indices [..., k]``."""
    lead = indices.shape[:-1]
    flat = indices.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    hit = jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True)
    return hit.reshape(*lead, vocab)


def _log_tail(logits: jax.Array, hit: jax.Array) -> jax.Array:
    """Log of the softmax mass outside ``hit``; ``-inf`` (with finite gradients) if it is empty."""
    logits = logits.astype(jnp.float32)
    any_tail = ~jnp.all(hit, axis=-1)
    rest = jnp.where(hit, -jnp.inf, logits)
    rest = jnp.where(any_tail[..., None], rest, 0.0)  # all-masked rows: keep logsumexp finite
    lt = jax.nn.logsumexp(rest, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(any_tail, lt, -jnp.inf)


def teacher_topk(teacher_logits: jax.Array, k: int) -> TopK:
    """Top-``k`` of a teacher's logits ``[..., V]`` with the tail's mass, exactly (no ``1 - sum``
    cancellation: the tail is a logsumexp over the tokens outside the top k)."""
    vocab = teacher_logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"teacher_topk: k={k} must be in [1, vocab={vocab}]")
    logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    values, indices = jax.lax.top_k(logits, k)
    logprobs = values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    log_tail = _log_tail(logits, _topk_mask(indices, vocab))
    return TopK(logprobs, indices.astype(jnp.int32), log_tail)


def topk_kd(student_logits: jax.Array, teacher: TopK, mask: jax.Array | None = None
            ) -> jax.Array:
    """Forward KL over ``k + 1`` outcomes: the teacher's top-k tokens and "everything else".

    The student's probabilities are gathered at the teacher's k indices, and its own mass
    outside them forms the extra bucket, so both sides are proper distributions and the loss
    equals the full forward KL when ``k`` is the vocabulary size. (Renormalising the top-k
    alone instead would reward the student for putting mass on tokens the teacher rules out.)
    Temperature 1 only: the tail's mass at another temperature needs the full teacher row.
    """
    logq_all = _log_softmax(student_logits)
    logq = jnp.take_along_axis(logq_all, teacher.indices, axis=-1)
    logq_tail = _log_tail(student_logits, _topk_mask(teacher.indices, student_logits.shape[-1]))
    per = (jnp.sum(_xlogx_ratio(teacher.logprobs.astype(jnp.float32), logq), axis=-1)
           + _xlogx_ratio(teacher.log_tail.astype(jnp.float32), logq_tail))
    return masked_mean(per, mask)


# --- hidden states -------------------------------------------------------------------------------

def init_projection(key: jax.Array, student_dim: int, teacher_dim: int) -> jax.Array:
    """A learned ``[student_dim, teacher_dim]`` map for matching hidden states of different width
    (train it with the student: put it in the trainable params)."""
    return jax.random.normal(key, (student_dim, teacher_dim), jnp.float32) / jnp.sqrt(student_dim)


def hidden_state_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                      mask: jax.Array | None = None, *, projection: jax.Array | None = None,
                      kind: str = "mse") -> jax.Array:
    """Match hidden states ``[B, T, d]``: ``"mse"`` (mean over features) or ``"cosine"``
    (``1 - cos``, scale-free: for students whose norms drift from the teacher's).

    ``projection [d_student, d_teacher]`` maps the student's states first.
    """
    s = student_hidden.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
    if projection is not None:
        s = s @ projection.astype(jnp.float32)
    if s.shape != t.shape:
        raise ValueError(f"hidden_state_loss: student {s.shape} vs teacher {t.shape}; pass a "
                         "projection [d_student, d_teacher] to match widths")
    if kind == "mse":
        per = jnp.mean((s - t) ** 2, axis=-1)
    elif kind == "cosine":
        eps = 1e-8
        dot = jnp.sum(s * t, axis=-1)
        norm = jnp.sqrt(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1) + eps)
        per = 1.0 - dot / norm
    else:
        raise ValueError(f"hidden_state_loss: kind must be 'mse' or 'cosine', got {kind!r}")
    return masked_mean(per, mask)
