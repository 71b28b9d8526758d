"""The one tiny random Llama of the unit tests: small defaults, overridden per test where its
assertions depend on a size. Importable from any test file: tests/conftest.py puts tests/ on
sys.path (pytest's default prepend import mode)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxq.models.llama import LlamaConfig, Params, init_params

DEFAULTS = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16)


def tiny_config(**overrides: Any) -> LlamaConfig:
    """The default tiny config with ``overrides`` (any LlamaConfig field) applied."""
    return LlamaConfig(**{**DEFAULTS, **overrides})


def tiny_params(config: LlamaConfig, seed: int = 0, *, scale: float = 0.02,
                dtype: Any = jnp.float32) -> Params:
    """Random params of ``config`` from ``jax.random.key(seed)`` (std ``scale``)."""
    return init_params(jax.random.key(seed), config, dtype=dtype, scale=scale)


def tiny_llama(seed: int = 0, *, scale: float = 0.02, dtype: Any = jnp.float32,
               **overrides: Any) -> tuple[LlamaConfig, Params]:
    """``(config, params)``: ``tiny_config(**overrides)`` and its ``tiny_params``."""
    cfg = tiny_config(**overrides)
    return cfg, tiny_params(cfg, seed, scale=scale, dtype=dtype)
