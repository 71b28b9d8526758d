"""jaxq: JAX-native model compression.

Transforms over parameter pytrees (quantization, pruning, low-rank), model-agnostic calibration
and compressed execution, Pallas low-bit kernels, and exporters to MLX and GGUF.
"""

from jaxq.calib import apply, calibrate, discover_sites, fuse_siblings
from jaxq.core import (
    Chain,
    LeafTransform,
    QArray,
    Transform,
    chain,
    default_rule,
    dequantize,
    is_qarray,
    pack,
    quantize,
    register_format,
    select,
    unpack,
)
from jaxq.kernels import qmatmul
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
    llama_scale_groups,
    rtn_quantize,
    w8a8_matmul,
)

__version__ = "0.1.0"

__all__ = [
    "AWQ", "FP8", "GPTQ", "MX", "NF4", "RTN", "W8A8", "Chain", "LeafTransform", "QArray",
    "ScaleGroup", "SmoothQuant", "Transform", "apply", "calibrate", "chain", "default_rule",
    "dequantize", "discover_sites", "fuse_siblings", "gptq_quantize", "is_qarray",
    "llama_scale_groups", "pack", "qmatmul", "quantize", "register_format", "rtn_quantize",
    "select", "unpack", "w8a8_matmul",
]
