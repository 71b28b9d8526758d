"""The NF4 codebook (QLoRA, Dettmers et al. 2023) and a gather-free decoder.

It lives in core because both the format (jaxq.quant.float_formats) and the kernels read it.

Pallas Triton has no gather, so :func:`nf4_decode` walks a 4-level select tree over the code
bits: 15 selects per element, exact, and the same code runs in XLA, Triton and Mosaic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 levels exactly as bitsandbytes defines them (quantiles of N(0, 1), rescaled to
# [-1, 1], with an exact zero). Code ``i`` decodes to ``NF4_CODEBOOK[i] * absmax``.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


def nf4_decode(q: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Map unsigned codes (values < 16) to NF4 levels in ``dtype`` without a gather."""
    q = q.astype(jnp.uint32)
    level = [jnp.full(q.shape, v, dtype) for v in NF4_CODEBOOK.tolist()]
    for bit in range(4):
        take_hi = ((q >> bit) & 1) == 1
        level = [jnp.where(take_hi, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
    return level[0]


def nf4_lookup(q: jax.Array) -> jax.Array:
    """Gather-based decode (float32) for plain XLA code paths, where a gather is cheap."""
    return jnp.asarray(NF4_CODEBOOK)[q.astype(jnp.int32)]
