"""Quantization-aware training: straight-through estimators, LSQ/LSQ+ learned steps, learned
clipping, per-token activation fake quantization; ``QAT(...).init / apply / convert`` shaped
like optax."""

from jaxq.qat.act import ActQuant, fake_quant_act
from jaxq.qat.estimators import fake_quant_affine, scale_grad, straight_through
from jaxq.qat.qat import (
    ESTIMATORS,
    FORMATS,
    QAT,
    QuantizerState,
    convert_leaf,
    fake_quant,
    labels,
    latent_from,
    partition,
    trainable,
)

__all__ = [
    "ESTIMATORS", "FORMATS", "QAT", "ActQuant", "QuantizerState", "convert_leaf", "fake_quant",
    "fake_quant_act", "fake_quant_affine", "labels", "latent_from", "partition", "scale_grad",
    "straight_through", "trainable",
]
