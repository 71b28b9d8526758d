"""jaxq: JAX-native model compression.

Transforms over parameter pytrees (quantization, pruning, low-rank), model-agnostic calibration
and compressed execution, Pallas low-bit kernels, and exporters to MLX and GGUF.
"""

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
from jaxq.calib import apply, calibrate, discover_sites
from jaxq.quant import FP8, MX, NF4, RTN, rtn_quantize

__version__ = "0.1.0"

__all__ = [
    "apply", "calibrate", "discover_sites",
    "FP8", "MX", "NF4", "RTN", "Chain", "LeafTransform", "QArray", "Transform", "chain", "default_rule",
    "dequantize", "is_qarray", "pack", "quantize", "register_format", "rtn_quantize", "select",
    "unpack",
]
