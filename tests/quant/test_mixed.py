"""Mixed precision by sensitivity: the Fisher diagonal, the size model, the allocator, the plan."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.core import formats
from jaxq.core.leaf import nbytes as leaf_bytes
from jaxq.core.qarray import QArray
from jaxq.eval.size import size_report
from jaxq.quant import GPTQ, RTN
from jaxq.quant.mixed import (
    MixedPrecision,
    allocate,
    candidate_bits,
    fisher_diagonal,
    resolve_mixed,
)


def test_fisher_matches_float64_analytic_gradient():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5))
    batches = [(rng.normal(size=(7, 5)), rng.normal(size=(7, 3))) for _ in range(4)]

    def loss(params, x, y):
        return jnp.mean((x @ params["w"].T - y) ** 2)

    got = fisher_diagonal(loss, {"w": jnp.asarray(w, jnp.float32)},
                          [(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
                           for x, y in batches])
    # d/dW mean((XWᵀ - Y)²) = 2/(n·out) (XWᵀ - Y)ᵀ X
    want = np.mean([(2 / y.size * (x @ w.T - y).T @ x) ** 2 for x, y in batches], axis=0)
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-4)


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 64), (4, 128), (5, 64), (8, 64)])
def test_candidate_bits_is_the_stored_size(bits, gs):
    w = jnp.asarray(np.random.default_rng(1).normal(size=(48, 384)), jnp.float32)
    qa = formats.quantize(w, bits=bits, group_size=gs, scale_dtype=jnp.float16)
    assert candidate_bits(w.shape, -1, bits, gs) == 8 * leaf_bytes(qa)


def _brute(options, budget):
    keys = list(options)
    best = None
    for combo in itertools.product(*(range(len(options[k])) for k in keys)):
        bits = sum(options[k][c][2] for k, c in zip(keys, combo))
        err = sum(options[k][c][1] for k, c in zip(keys, combo))
        if bits <= budget and (best is None or err < best):
            best = err
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocate_is_near_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    options = {}
    for k in range(6):  # error falling roughly 4x per extra bit, sizes and weights varying
        n, weight = int(rng.integers(1, 9)) * 1000, float(rng.lognormal(0, 2))
        options[f"l{k}"] = [(b, weight * 4.0 ** -b * rng.uniform(0.7, 1.3), n * (b + 0.5))
                            for b in (2, 3, 4, 6, 8)]
    budget = sum(o[0][2] for o in options.values()) * rng.uniform(1.1, 2.5)
    choice = allocate(options, budget)
    used = sum(next(o for o in options[k] if o[0] == c)[2] for k, c in choice.items())
    err = sum(next(o for o in options[k] if o[0] == c)[1] for k, c in choice.items())
    assert used <= budget
    assert err <= 1.15 * _brute(options, budget)


def test_allocate_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="below the smallest"):
        allocate({"a": [(2, 1.0, 100)]}, 99)


def _toy():
    rng = np.random.default_rng(2)
    params = {f"l{i}": {"proj": {"weight": jnp.asarray(rng.normal(size=(64, 256)),
                                                       jnp.float32)}} for i in range(4)}
    params["norm"] = {"weight": jnp.ones((256,), jnp.float32)}
    # layer 0 matters 1000x more to the loss than the others
    stats = {f"l{i}/proj/weight": {"fisher": jnp.full((64, 256), 1000.0 if i == 0 else 1.0)}
             for i in range(4)}
    return params, stats


@pytest.mark.parametrize("budget", [3.0, 4.25, 6.0])
def test_mixed_precision_meets_its_budget_and_favours_the_sensitive_layer(budget):
    params, stats = _toy()
    t = MixedPrecision(budget_bpw=budget, quantizers=(RTN(scale_dtype=jnp.float16),),
                       candidates=((2, 64), (3, 64), (4, 64), (6, 64), (8, 64)))
    q = t(params, stats=stats)
    assert size_report(q).bits_per_weight <= budget
    assert size_report(q).bits_per_weight > budget - 1.0  # the budget is used, not ignored
    plan = t.plan(params, stats)
    for i in range(4):
        leaf = q[f"l{i}"]["proj"]["weight"]
        assert isinstance(leaf, QArray)
        assert (leaf.bits, leaf.group_size) == plan[f"l{i}/proj/weight"]
    assert plan["l0/proj/weight"][0] > max(plan[f"l{i}/proj/weight"][0] for i in (1, 2, 3))


def test_resolve_mixed_gives_plain_quantizers_for_sequential_calibration():
    params, stats = _toy()
    t = MixedPrecision(budget_bpw=4.0, quantizers=(GPTQ(scale_dtype=jnp.float16),),
                       candidates=((2, 64), (4, 64), (8, 64)))
    resolved = resolve_mixed(t, params, stats)
    assert "fisher" not in resolved.required_stats("l0/proj/weight",
                                                   params["l0"]["proj"]["weight"])
    assert resolved.required_stats("l0/proj/weight", params["l0"]["proj"]["weight"]) == {"gram"}
    x = np.random.default_rng(3).normal(size=(512, 256)).astype(np.float32)
    x[:, :8] *= 10  # a few loud input channels: GPTQ's codes differ from RTN's
    gram = {f"l{i}/proj/weight": {"gram": jnp.asarray(x.T @ x)} for i in range(4)}
    q = resolved(params, stats=gram)
    plan = t.plan(params, stats)
    assert len(set(plan.values())) > 1  # a plan of one width would prove nothing
    checked = set()
    for i in range(4):
        path = f"l{i}/proj/weight"
        leaf, w = q[f"l{i}"]["proj"]["weight"], params[f"l{i}"]["proj"]["weight"]
        bits, gs = plan[path]
        assert isinstance(leaf, QArray) and (leaf.bits, leaf.group_size) == (bits, gs), path
        if (bits, gs) in checked:
            continue
        checked.add((bits, gs))
        # one leaf per width: exactly GPTQ's codes at that width, run alone, and not RTN's
        alone = GPTQ(bits=bits, group_size=gs, scale_dtype=jnp.float16).transform_leaf(
            path, w, axis=-1, stats=gram[path])
        np.testing.assert_array_equal(np.asarray(leaf.packed), np.asarray(alone.packed))
        rtn = RTN(bits=bits, group_size=gs, scale_dtype=jnp.float16).transform_leaf(
            path, w, axis=-1, stats=None)
        assert not np.array_equal(np.asarray(leaf.packed), np.asarray(rtn.packed)), path
    assert q["norm"]["weight"] is params["norm"]["weight"]  # not selected: left as it was


def test_awq_then_gptq_takes_the_planned_widths():
    """A quantizer with a nested ``then`` (AWQ then GPTQ): the search and the final GPTQ both
    work at each leaf's planned width."""
    from jaxq.quant.awq import AWQ

    params, stats = _toy()
    t = MixedPrecision(budget_bpw=4.0, quantizers=(AWQ(then=GPTQ(scale_dtype=jnp.float16),
                                                       scale_dtype=jnp.float16),),
                       candidates=((2, 64), (4, 64), (8, 64)))
    plan = t.plan(params, stats)
    assert len({b for b, _ in plan.values()}) > 1
    x = np.abs(np.random.default_rng(4).normal(size=(512, 256))).astype(np.float32)
    calib = {f"l{i}/proj/weight": {"gram": jnp.asarray(x.T @ x),
                                   "mean_abs": jnp.asarray(x.mean(0))} for i in range(4)}
    q = t.planned(params, stats)(params, stats=calib)
    for i in range(4):
        leaf = q[f"l{i}"]["proj"]["weight"]
        assert (leaf.bits, leaf.group_size) == plan[f"l{i}/proj/weight"]
        assert leaf.input_scale is not None  # AWQ ran: no op to fold its scale into


def test_missing_fisher_names_the_leaf():
    params, _ = _toy()
    t = MixedPrecision(budget_bpw=4.0, quantizers=(RTN(),))
    with pytest.raises(ValueError, match="l0/proj/weight"):
        t(params, stats={})
