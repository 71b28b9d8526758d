"""Training helpers (not a framework): a train step with a params transform (QAT) and its
state, gradient accumulation and a compute dtype; a small fit loop with data-parallel/FSDP
sharding over a mesh, atomic orbax checkpoints and exact resume; a deterministic data source."""

from jaxq.train.checkpoint import Checkpointer
from jaxq.train.data import TokenWindows
from jaxq.train.fit import (
    FitResult,
    auto_mesh,
    batch_shardings,
    fit,
    fsdp_spec,
    tree_shardings,
)
from jaxq.train.step import (
    TrainState,
    all_floats,
    cast_floats,
    init_state,
    make_train_step,
    state_params,
)

__all__ = [
    "Checkpointer", "FitResult", "TokenWindows", "TrainState", "all_floats", "auto_mesh",
    "batch_shardings", "cast_floats", "fit", "fsdp_spec", "init_state", "make_train_step",
    "state_params", "tree_shardings",
]
