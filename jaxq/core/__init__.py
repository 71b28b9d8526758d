"""Core data types: QArray and packing, formats, tree paths and where-rules, transforms."""

from jaxq.core.formats import quantize, register_format
from jaxq.core.leaf import (
    Leaf,
    combine,
    is_leaf,
    mask,
    materialize,
    partition,
    register_leaf,
    register_matmul,
)
from jaxq.core.packing import pack, unpack
from jaxq.core.qarray import QArray, dequantize
from jaxq.core.transform import Chain, LeafTransform, Transform, chain
from jaxq.core.tree import default_rule, select

__all__ = [
    "Chain", "Leaf", "LeafTransform", "QArray", "Transform", "chain", "combine", "default_rule",
    "dequantize", "is_leaf", "mask", "materialize", "pack", "partition", "quantize",
    "register_format", "register_leaf", "register_matmul", "select", "unpack",
]
