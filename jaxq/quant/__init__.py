"""Quantization methods: RTN, the float formats (NF4, FP8, MX), GPTQ, AWQ, SmoothQuant."""

from jaxq.quant.float_formats import FP8, MX, NF4, fp8_quantize, mx_quantize, nf4_quantize
from jaxq.quant.rtn import RTN, rtn_quantize, search_clip

__all__ = ["FP8", "MX", "NF4", "RTN", "fp8_quantize", "mx_quantize", "nf4_quantize",
           "rtn_quantize", "search_clip"]
