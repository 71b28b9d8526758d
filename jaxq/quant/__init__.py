"""Quantization methods: RTN, GPTQ, AWQ, SmoothQuant (W8A8) and the NF4 / FP8 / MX formats."""

from jaxq.quant.awq import AWQ, ScaleGroup, apply_scales, awq_search
from jaxq.quant.float_formats import FP8, MX, NF4, fp8_quantize, mx_quantize, nf4_quantize
from jaxq.quant.gptq import GPTQ, gptq_qarray, gptq_quantize
from jaxq.quant.rtn import RTN, rtn_quantize, search_clip
from jaxq.quant.smoothquant import (
    W8A8,
    SmoothQuant,
    int8_matmul,
    smooth_scales,
    w8a8_matmul,
    w8a8_quantize,
)

__all__ = [
    "AWQ", "FP8", "GPTQ", "MX", "NF4", "RTN", "W8A8", "ScaleGroup", "SmoothQuant", "apply_scales",
    "awq_search", "fp8_quantize", "gptq_qarray", "gptq_quantize", "int8_matmul",
    "mx_quantize", "nf4_quantize", "rtn_quantize", "search_clip",
    "smooth_scales", "w8a8_matmul", "w8a8_quantize",
]
