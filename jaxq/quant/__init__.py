"""Quantization methods: RTN now; GPTQ, AWQ, SmoothQuant and the float formats beside it."""

from jaxq.quant.rtn import RTN, rtn_quantize, search_clip

__all__ = ["RTN", "rtn_quantize", "search_clip"]
