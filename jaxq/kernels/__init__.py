"""Quantized matmul kernels: ``qmatmul`` dispatch, Pallas GPU/TPU kernels, repack, autotune."""

from jaxq.core.nf4 import NF4_CODEBOOK
from jaxq.kernels.autotune import KernelConfig
from jaxq.kernels.qmatmul import dequant_weight, qmatmul, qmatmul_xla
from jaxq.kernels.repack import (
    PackedForKernel,
    cached_repack,
    prepare,
    repack,
    unsupported_reason,
)

__all__ = [
    "NF4_CODEBOOK",
    "KernelConfig",
    "PackedForKernel",
    "cached_repack",
    "dequant_weight",
    "prepare",
    "qmatmul",
    "qmatmul_xla",
    "repack",
    "unsupported_reason",
]
