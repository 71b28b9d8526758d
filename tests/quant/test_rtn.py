"""RTN: clipping search beats min-max, group fallback, importance weighting."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.quant.rtn import fallback_group_size, search_clip


def heavy_tailed(shape, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.standard_t(3, size=shape).astype(np.float32))


@pytest.mark.parametrize("bits,gain", [(2, 0.8), (3, 0.9), (4, 0.97)])
def test_mse_clip_reduces_error(bits, gain):
    w = heavy_tailed((64, 256))
    err = lambda q: float(jnp.mean((q.dequantize() - w) ** 2))
    minmax = jaxq.rtn_quantize(w, bits=bits, group_size=64)
    mse = jaxq.rtn_quantize(w, bits=bits, group_size=64, clip="mse", clip_grid=40)
    assert err(mse) < gain * err(minmax)


def test_search_clip_matches_brute_force():
    w = heavy_tailed((4, 64), seed=3)
    ratios = np.asarray(search_clip(w, bits=3, group_size=32, grid=11, min_ratio=0.5))
    grid = np.linspace(1.0, 0.5, 11)
    wg = np.asarray(w, np.float64).reshape(4, 2, 32)
    for i in range(4):
        for g in range(2):
            errs = []
            for r in grid:
                q = jaxq.quantize(jnp.asarray(wg[i, g][None]), bits=3, group_size=32,
                                  clip_ratio=float(r))
                errs.append(np.sum((np.asarray(q.dequantize(), np.float64) - wg[i, g]) ** 2))
            assert np.isclose(ratios[i, g], grid[int(np.argmin(errs))], atol=1e-6)


def test_importance_weighting_shifts_error_to_unimportant_channels():
    w = heavy_tailed((32, 64), seed=5)
    imp = jnp.concatenate([jnp.full((32,), 100.0), jnp.full((32,), 0.01)])
    r_plain = search_clip(w, bits=2, group_size=64, grid=30, min_ratio=0.3)
    r_imp = search_clip(w, imp, bits=2, group_size=64, grid=30, min_ratio=0.3)
    weighted = lambda r: float(jnp.sum(imp * (jaxq.quantize(
        w, bits=2, group_size=64, clip_ratio=r).dequantize() - w) ** 2))
    # Importance must change the choice (most rows here) and cut the weighted error clearly:
    # a search that ignored it would give r_imp == r_plain and the same error.
    assert int(jnp.sum(r_imp != r_plain)) >= r_imp.size // 2
    assert weighted(r_imp) < 0.9 * weighted(r_plain)


def test_group_fallback():
    assert fallback_group_size(576, 128, (128, 64, 32)) == 64
    assert fallback_group_size(1536, 128, (128, 64, 32)) == 128
    assert fallback_group_size(96, 128, (128, 64, 32)) == 32
    params = {"w": {"weight": jnp.ones((8, 576))}}
    q = jaxq.RTN(bits=4, group_size=128, group_fallback=(128, 64, 32))(params)
    assert q["w"]["weight"].group_size == 64


def test_bad_clip_mode():
    with pytest.raises(ValueError, match="clip"):
        jaxq.RTN(clip="percentile")
