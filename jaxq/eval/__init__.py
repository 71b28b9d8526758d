"""Evaluation: the perplexity protocol and its Penn Treebank data."""

from jaxq.eval.data import calibration_windows, eval_windows, ptb_text, token_windows
from jaxq.eval.perplexity import DEFAULT_BATCH_SIZE, PerplexityResult, perplexity, token_nll

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PerplexityResult",
    "calibration_windows",
    "eval_windows",
    "perplexity",
    "ptb_text",
    "token_nll",
    "token_windows",
]
