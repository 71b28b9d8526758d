"""Models that are not Llama, through the public API only: the scale groups AWQ folds into are
found from the trace (norms, v -> o, up -> down, a fused QKV's value rows), and RTN, GPTQ and
AWQ run through ``jaxq.calibrate`` on each, AWQ folding where the graph allows and naming the
sites where it cannot."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from _zoo import ZOO

import jaxq
from jaxq.core.tree import flatten_with_paths


def _args(batch):
    return batch if isinstance(batch, tuple) else (batch,)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_scale_groups_found_from_the_trace(name):
    z = ZOO[name]()
    groups = jaxq.calib.scale_groups(z.apply_fn, z.params, *_args(z.batches[0]))
    assert {s: g.prev for g in groups for s in g.sites} == z.folded
    assert not set(z.unfolded) & {s for g in groups for s in g.sites}


def _rel_err(q, z):
    run = jaxq.apply(z.apply_fn)
    errs = []
    for b in z.batches:
        ref = z.apply_fn(z.params, *_args(b))
        errs.append(float(jnp.sum((run(q, *_args(b)) - ref) ** 2) / jnp.sum(ref**2)))
    return max(errs)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_rtn_gptq_awq_through_calibrate(name):
    z = ZOO[name]()
    kw = {} if z.where is None else {"where": z.where}
    cal = dict(mask=z.mask, progress=False)
    rtn, _ = jaxq.calibrate(z.apply_fn, z.params, z.batches,
                            jaxq.RTN(bits=4, group_size=16, **kw), **cal)
    gptq, _ = jaxq.calibrate(z.apply_fn, z.params, z.batches,
                             jaxq.GPTQ(bits=4, group_size=16, **kw), **cal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        awq, _ = jaxq.calibrate(z.apply_fn, z.params, z.batches,
                                jaxq.AWQ(bits=4, group_size=16, **kw), **cal)
    e_rtn, e_gptq, e_awq = _rel_err(rtn, z), _rel_err(gptq, z), _rel_err(awq, z)
    # 4-bit g16 on these widths: ~1e-3 relative output error; a wrong axis, a scale folded on
    # one side only or a lost input scale gives O(1).
    assert e_rtn < 2e-2 and e_gptq < 1e-2 and e_awq < 1e-2, (e_rtn, e_gptq, e_awq)
    assert e_gptq < e_rtn

    # AWQ folded: its sites carry no input scale; the others keep theirs and a warning names
    # them (and only them).
    leaves = dict(flatten_with_paths(awq)[0])
    assert all(leaves[site].input_scale is None for site in z.folded)
    assert all(leaves[site].input_scale is not None for site in z.unfolded)
    named = " ".join(str(w.message) for w in caught)
    assert all(site in named for site in z.unfolded), named
    assert not any(site in named for site in z.folded), named

    # The folding itself, in float: every producer and site changed, the model did not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled, _ = jaxq.calibrate(z.apply_fn, z.params, z.batches,
                                   jaxq.AWQ(bits=4, group_size=16, scale_only=True, **kw), **cal)
    before, now = dict(flatten_with_paths(z.params)[0]), dict(flatten_with_paths(scaled)[0])
    for path in {*z.folded, *z.folded.values()}:
        assert not np.allclose(now[path], before[path]), path
    for path in set(z.unfolded) - set(z.folded.values()):  # a producer may be unfolded itself
        np.testing.assert_array_equal(now[path], before[path], err_msg=path)
    for b in z.batches:
        ref = z.apply_fn(z.params, *_args(b))
        np.testing.assert_allclose(z.apply_fn(scaled, *_args(b)), ref, rtol=1e-3,
                                   atol=1e-4 * float(jnp.abs(ref).max()))
