"""Core data types: QArray and packing, formats, tree paths and where-rules, transforms."""

from jaxq.core.formats import quantize, register_format
from jaxq.core.packing import pack, unpack
from jaxq.core.qarray import QArray, dequantize, is_qarray
from jaxq.core.transform import Chain, LeafTransform, Transform, chain
from jaxq.core.tree import default_rule, select

__all__ = [
    "Chain", "LeafTransform", "QArray", "Transform", "chain", "default_rule", "dequantize",
    "is_qarray", "pack", "quantize", "register_format", "select", "unpack",
]
