"""Low-rank compression: a factored leaf run as two matmuls, truncated (activation-aware) SVD
with rank allocation under a whole-model budget, and low-rank correction of quantization
error (see docs/lowrank.md)."""

from jaxq.lowrank.correction import QuantLowRankCorrection
from jaxq.lowrank.leaf import LowRank, QuantLowRank
from jaxq.lowrank.svd import LowRankSVD, allocate_ranks

__all__ = ["LowRank", "LowRankSVD", "QuantLowRank", "QuantLowRankCorrection", "allocate_ranks"]
