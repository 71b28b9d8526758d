"""Structure of the Llama family for structured pruning (jaxq.prune.structured).

What the generic algorithm cannot know: which slices of which leaves form one unit, which
projection's input holds them, where the blocks are, and how a shrunk tree maps back to a
:class:`~jaxq.models.llama.LlamaConfig`.

- A query head ``h`` is rows ``[h*d, (h+1)*d)`` of ``q_proj`` (and its bias) and the same
  columns of ``o_proj``; heads ``[k*g, (k+1)*g)`` share KV head ``k`` (``g`` = heads per KV
  head), so they form one class and every KV head keeps as many query heads (GQA stays valid;
  K/V are untouched). Both RoPE row layouts keep a head's rows contiguous.
- A neuron ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` (and biases) and column ``j``
  of ``down_proj``.
- A block is an item of ``model/layers``.

``head_dim`` never changes: after pruning ``hidden_size != num_heads * head_dim``, so configs
(and the MLX ``head_dim`` field, GGUF's ``attention.key_length``) must carry it explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxq.models.llama import LlamaConfig, Params, residual_stream
from jaxq.prune.structured import Slice, UnitGroup, block_distances

#: The output projections whose input Gram scores heads and neurons.
SCORE_SITES = r"(self_attn/o_proj|mlp/down_proj)/weight$"
#: The list of decoder blocks.
BLOCKS = "model/layers"
#: What "the layers' parameters" means for a pruning budget.
LAYER_PARAMS = r"^model/layers/"


def llama_units(params: Params, *, head_dim: int | None) -> list[UnitGroup]:
    """Heads (one class per KV head) and neurons of every layer, as unit groups."""
    if head_dim is None:
        raise ValueError("llama structured pruning needs the model's head_dim")
    groups = []
    for i, layer in enumerate(params["model"]["layers"]):
        pre = f"model/layers/{i}/"
        attn, mlp = layer["self_attn"], layer["mlp"]
        heads = np.shape(attn["q_proj"]["weight"])[0] // head_dim
        kv = np.shape(attn["k_proj"]["weight"])[0] // head_dim
        o = Slice(pre + "self_attn/o_proj/weight", 1, head_dim)
        q = [Slice(pre + f"self_attn/q_proj/{k}", 0, head_dim) for k in attn["q_proj"]]
        groups.append(UnitGroup(kind="heads", name=pre + "self_attn", n=heads,
                                slices=(*q, o), score=o, classes=kv))
        down = Slice(pre + "mlp/down_proj/weight", 1, 1)
        rows = [Slice(pre + f"mlp/{p}/{k}", 0, 1) for p in ("gate_proj", "up_proj")
                for k in mlp[p]]
        groups.append(UnitGroup(kind="neurons", name=pre + "mlp",
                                n=np.shape(mlp["down_proj"]["weight"])[1],
                                slices=(*rows, down), score=down))
    return groups


def config_for_params(params: Params, config: LlamaConfig) -> LlamaConfig:
    """``config`` with layer count, head counts and intermediate size read off ``params``
    (``head_dim`` kept); every layer must agree, as llama.cpp and mlx-lm need."""
    d = config.head_dim
    shapes = set()
    for i, layer in enumerate(params["model"]["layers"]):
        attn = layer["self_attn"]
        q, k = (_rows(attn[p]["weight"]) for p in ("q_proj", "k_proj"))
        if q % d or k % d:
            raise ValueError(f"model/layers/{i}: q/k rows {q}/{k} are not heads of {d}")
        shapes.add((q // d, k // d, _rows(layer["mlp"]["gate_proj"]["weight"])))
    if len(shapes) != 1:
        raise ValueError(f"layers differ in (heads, kv heads, intermediate size): "
                         f"{sorted(shapes)}; llama configs need one shape for all layers")
    heads, kv, inter = shapes.pop()
    return dataclasses.replace(config, num_layers=len(params["model"]["layers"]),
                               num_heads=heads, num_kv_heads=kv, intermediate_size=inter)


def _rows(w: Any) -> int:
    return int(w.shape[0])


def llama_block_distances(params: Params, config: LlamaConfig,
                          batches: Iterable[Any]) -> np.ndarray:
    """Mean angular distances between the residual stream's positions (Gromov et al.)."""
    return block_distances(functools.partial(_hidden, config=config), params, batches)


def _hidden(params: Params, tokens: Any, *, config: LlamaConfig) -> Any:
    return residual_stream(params, tokens, config)
