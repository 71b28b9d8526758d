"""Orbax checkpoints of a whole :class:`~jaxq.train.step.TrainState` plus the data position.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save (``kill -9``) leaves the previous checkpoint as the latest one. The state is
stored as its flat list of arrays and restored into the structure of a freshly initialised
state, which carries everything static (compressed leaves' formats, optimizer structure) and,
under a mesh, the target shardings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np


class Checkpointer:
    """Save every ``every`` steps to ``directory`` (keeping the last ``keep``), restore latest."""

    def __init__(self, directory: str | Path, *, every: int, keep: int = 2) -> None:
        if every < 1:
            raise ValueError(f"Checkpointer: every must be >= 1, got {every}")
        self.directory = Path(directory).absolute()
        self.every = every
        import orbax.checkpoint as ocp  # heavy: imported only when checkpointing

        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        leaves = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` into the structure (and shardings) of ``like``."""
        like_leaves, treedef = jax.tree.flatten(like)

        def abstract(x: Any) -> Any:
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        target = {f"{i:05d}": abstract(x) for i, x in enumerate(like_leaves)}
        ocp = self._ocp
        got = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        leaves = got["state"]
        if sorted(leaves) != sorted(target):
            raise ValueError(f"checkpoint {self.directory}/{step} holds {len(leaves)} arrays, "
                             f"the state being resumed has {len(target)}: not the same model")
        return jax.tree.unflatten(treedef, [leaves[k] for k in sorted(target)]), got["meta"]

    def close(self) -> None:
        self._mgr.close()
