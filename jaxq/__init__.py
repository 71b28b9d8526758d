"""jaxq: JAX-native model compression.

Transforms over parameter pytrees (quantization, pruning, low-rank), model-agnostic calibration
and compressed execution, Pallas low-bit kernels, and exporters to MLX and GGUF.
"""

from jaxq import distill, prune, qat, train
from jaxq.calib import apply, calibrate, discover_sites, fuse_siblings
from jaxq.core import (
    Chain,
    Leaf,
    LeafTransform,
    QArray,
    Transform,
    chain,
    combine,
    default_rule,
    dequantize,
    is_leaf,
    mask,
    materialize,
    pack,
    partition,
    quantize,
    register_format,
    register_leaf,
    select,
    unpack,
)
from jaxq.core.serialize import load, save
from jaxq.kernels import qmatmul
from jaxq.models.llama import llama_scale_groups
from jaxq.qat import QAT
from jaxq.quant import (
    AWQ,
    FP8,
    GPTQ,
    MX,
    NF4,
    RTN,
    W8A8,
    ScaleGroup,
    SmoothQuant,
    gptq_quantize,
    rtn_quantize,
    w8a8_matmul,
)

__version__ = "0.1.0"

__all__ = [
    "AWQ", "Chain", "FP8", "GPTQ", "Leaf", "LeafTransform", "MX", "NF4", "QAT", "QArray", "RTN",
    "ScaleGroup", "SmoothQuant", "Transform", "W8A8", "apply", "calibrate", "chain", "combine",
    "default_rule", "dequantize", "discover_sites", "distill", "fuse_siblings", "gptq_quantize",
    "is_leaf", "llama_scale_groups", "load", "mask", "materialize", "pack", "partition",
    "prune", "qat", "qmatmul", "quantize", "register_format", "register_leaf", "rtn_quantize",
    "save", "select", "train", "unpack", "w8a8_matmul",
]
