"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M, jointly with quantization) and
OWL's non-uniform layer sparsities, over the calibration interpreter; sparse leaves."""

from jaxq.core.sparse import NMSparse, Sparse, mask_from_zeros, nm_mask, to_sparse
from jaxq.prune.base import Prune, unstructured_mask
from jaxq.prune.magnitude import Magnitude, magnitude_mask
from jaxq.prune.owl import OWL, outlier_ratio, owl_sparsities, plan
from jaxq.prune.sparsegpt import SparseGPT, sparsegpt_prune
from jaxq.prune.wanda import Wanda, wanda_mask

__all__ = [
    "OWL", "Magnitude", "NMSparse", "Prune", "Sparse", "SparseGPT", "Wanda", "magnitude_mask",
    "mask_from_zeros", "nm_mask", "outlier_ratio", "owl_sparsities", "plan",
    "sparsegpt_prune", "to_sparse", "unstructured_mask", "wanda_mask",
]
