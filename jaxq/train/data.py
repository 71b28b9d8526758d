"""A data source with a deterministic position, so a resumed run continues where it stopped."""

from __future__ import annotations

import numpy as np


class TokenWindows:
    """Fixed-length windows of token ids, served in a seeded shuffle, one epoch after another.

    ``windows(step)`` is the batch of global position ``step * batch_size``: a pure function of
    ``(seed, step)``, so resuming at a checkpointed step replays exactly the batches an
    uninterrupted run would have seen. Each batch is ``{"tokens": [B, T] int32, "index": [B]}``
    (``index``: the windows' row numbers, the key into a :class:`jaxq.distill.TopKCache`).
    """

    def __init__(self, windows: np.ndarray, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        windows = np.asarray(windows)
        if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
            raise ValueError(f"TokenWindows: windows must be [N, T] integer token ids, got "
                             f"{windows.dtype}{list(windows.shape)}")
        if not 0 < batch_size:
            raise ValueError(f"TokenWindows: batch_size must be positive, got {batch_size}")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    @classmethod
    def from_stream(cls, tokens: np.ndarray, seq_len: int, batch_size: int, **kw
                    ) -> TokenWindows:
        """Cut a 1-D token stream into non-overlapping ``seq_len`` windows (the tail dropped)."""
        tokens = np.asarray(tokens).reshape(-1)
        n = tokens.size // seq_len
        if n == 0:
            raise ValueError(f"TokenWindows: {tokens.size} tokens make no window of {seq_len}")
        return cls(tokens[: n * seq_len].reshape(n, seq_len), batch_size, **kw)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.windows.shape[1]

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.windows)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def position(self, step: int) -> int:
        """Number of windows consumed before ``step``."""
        return step * self.batch_size

    def indices(self, step: int) -> np.ndarray:
        n = len(self.windows)
        pos = np.arange(self.position(step), self.position(step + 1))
        epochs, offsets = np.divmod(pos, n)
        orders = {int(e): self._order(int(e)) for e in np.unique(epochs)}
        return np.array([orders[int(e)][o] for e, o in zip(epochs, offsets, strict=True)])

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {"tokens": self.windows[idx].astype(np.int32), "index": idx}
