"""Pruning: unstructured and N:M sparsity, and structured pruning (jaxq.prune.structured)."""
