"""Knowledge distillation: losses (Hinton KD, forward/reverse KL, generalized JSD, top-k with a
tail bucket, hidden-state matching), all padding-aware, and teachers (a frozen apply function,
or its top-k logits cached on disk once and streamed)."""

from jaxq.distill.losses import (
    TopK,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    hinton_kd,
    init_projection,
    kl_per_position,
    masked_mean,
    reverse_kl,
    teacher_topk,
    topk_kd,
)
from jaxq.distill.teacher import Teacher, TopKCache, cache_topk, frozen_teacher

__all__ = [
    "Teacher", "TopK", "TopKCache", "cache_topk", "cross_entropy", "forward_kl", "frozen_teacher",
    "generalized_jsd", "hidden_state_loss", "hinton_kd", "init_projection", "kl_per_position",
    "masked_mean", "reverse_kl", "teacher_topk", "topk_kd",
]
