"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M, jointly with quantization) and
OWL's non-uniform layer sparsities, over the calibration interpreter; sparse leaves; structured
pruning of heads, neurons and blocks that shrinks the model."""

from jaxq.core.sparse import NMSparse, Sparse, mask_from_zeros, nm_mask, to_sparse
from jaxq.prune.base import Prune, unstructured_mask
from jaxq.prune.magnitude import Magnitude, magnitude_mask
from jaxq.prune.owl import OWL, outlier_ratio, owl_sparsities, plan
from jaxq.prune.sparsegpt import SparseGPT, sparsegpt_prune
from jaxq.prune.structured import (
    DropBlocks,
    Slice,
    StructuredPrune,
    UnitGroup,
    block_distances,
    choose_blocks,
    contribution_scores,
    plan_counts,
    refit_columns,
)
from jaxq.prune.wanda import Wanda, wanda_mask

__all__ = [
    "OWL", "DropBlocks", "Magnitude", "NMSparse", "Prune", "Slice", "Sparse", "SparseGPT",
    "StructuredPrune", "UnitGroup", "Wanda", "block_distances", "choose_blocks",
    "contribution_scores", "magnitude_mask", "mask_from_zeros", "nm_mask", "outlier_ratio",
    "owl_sparsities", "plan", "plan_counts", "refit_columns", "sparsegpt_prune", "to_sparse",
    "unstructured_mask", "wanda_mask",
]
