"""The interpreter's contract beyond plain feed-forward models: loops, branches, repeated and
tied weights, custom_vjp, error messages, statistics reduction, and the qmatmul dispatch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import dequantized, mlp_case

import jaxq
from jaxq.calib import apply, calibrate, discover_sites

RTN = jaxq.RTN(bits=3, group_size=8, where=".*w")


def _normal(i, shape, scale=0.3):
    return jax.random.normal(jax.random.key(i), shape) * scale


@jax.custom_vjp
def _cvjp_matmul(x, w):
    return x @ w


_cvjp_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


def loop_apply(p, x):
    """A weight re-read by every iteration of a while loop, inside a custom_vjp."""
    def body(c):
        h, i = c
        return jnp.tanh(_cvjp_matmul(h, p["rec"]["w"])), i + 1
    h, _ = jax.lax.while_loop(lambda c: c[1] < 3, body, (x @ p["inp"]["w"], 0))
    return h @ p["out"]["w"]


def loop_params():
    return {"inp": {"w": _normal(0, (8, 16))}, "rec": {"w": _normal(1, (16, 16))},
            "out": {"w": _normal(2, (16, 8))}}


def test_while_accumulates_all_iterations_then_compresses():
    params = loop_params()
    xs = [_normal(10 + i, (4, 8), 1.0) for i in range(2)]
    sites = discover_sites(loop_apply, params, xs[0])
    assert {p: s.axis for p, s in sites.items()} == {"inp/w": -2, "rec/w": -2, "out/w": -2}
    qp, stats = calibrate(loop_apply, params, xs, RTN, collectors=["gram", "count"],
                          progress=False)
    deq = dequantized(qp)
    want = 0
    for x in xs:
        h = x @ deq["inp"]["w"]  # "inp" was quantized before the loop ran
        for _ in range(3):  # "rec" stays float until the loop exits
            want = want + h.T @ h
            h = jnp.tanh(h @ params["rec"]["w"])
    np.testing.assert_allclose(stats["rec/w"]["gram"], want, rtol=1e-4, atol=1e-4)
    assert float(stats["rec/w"]["count"]) == 3 * 4 * len(xs)
    # ... but "out" sees the loop's output with "rec" quantized.
    h = xs[0] @ deq["inp"]["w"]
    for _ in range(3):
        h = jnp.tanh(h @ deq["rec"]["w"])
    got = jax.jit(apply(loop_apply))(qp, xs[0])
    np.testing.assert_allclose(got, h @ deq["out"]["w"], rtol=1e-5, atol=1e-5)


def test_weight_used_twice_accumulates_both_uses_before_compression():
    params = {"w": _normal(0, (16, 16)), "v": _normal(1, (16, 8))}

    def f(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["v"]

    xs = [_normal(5, (4, 16), 1.0)]
    site = discover_sites(f, params, xs[0])["w"]
    assert site.uses == 2 and site.axis == -2
    qp, stats = calibrate(f, params, xs, RTN, collectors=["gram"], progress=False)
    x = xs[0]
    h1 = jnp.tanh(x @ params["w"])  # the second use still runs on the float weight
    np.testing.assert_allclose(stats["w"]["gram"], x.T @ x + h1.T @ h1, rtol=1e-4, atol=1e-4)
    w = dequantized(qp)["w"]
    h2 = jnp.tanh(jnp.tanh(x @ params["w"]) @ w)  # its output uses the compressed weight
    np.testing.assert_allclose(stats["v"]["gram"], h2.T @ h2, rtol=1e-4, atol=1e-4)


def test_tied_embedding_gather_and_head():
    params = {"embed": _normal(0, (32, 16), 1.0), "mid": {"w": _normal(1, (16, 16))}}

    def f(p, tokens):
        h = jnp.tanh(p["embed"][tokens] @ p["mid"]["w"])
        return h @ p["embed"].T

    toks = [jax.random.randint(jax.random.key(i), (2, 5), 0, 32) for i in range(2)]
    sites = discover_sites(f, params, toks[0])
    assert sites["embed"].axis == -1 and sites["embed"].uses == 1
    rtn = dataclasses.replace(RTN, where="embed|mid")
    qp, stats = calibrate(f, params, toks, rtn, collectors=["gram"], progress=False)
    assert isinstance(qp["embed"], jaxq.QArray) and qp["embed"].axis == -1
    deq = dequantized(qp)
    # The gather ran on the float table (its sites complete later, at the head).
    h = [jnp.tanh(params["embed"][t] @ deq["mid"]["w"]).reshape(-1, 16) for t in toks]
    np.testing.assert_allclose(stats["embed"]["gram"], sum(x.T @ x for x in h), rtol=1e-4,
                               atol=1e-4)
    got = jax.jit(apply(f))(qp, toks[0])
    np.testing.assert_allclose(got, f(deq, toks[0]), rtol=1e-5, atol=1e-5)


def test_work_past_the_last_site_is_skipped(monkeypatch):
    """The pass's outputs are thrown away: the head's logits and what follows them (inside a
    jit, too) never run, yet the head's statistics are still collected."""
    from jaxq.calib import interpreter

    ran = []
    real = interpreter.compiled
    monkeypatch.setattr(interpreter, "compiled",
                        lambda eqn: ran.append(eqn.primitive.name) or real(eqn))
    params = {"a": {"w": _normal(0, (8, 8))}, "head": {"w": _normal(1, (8, 6))}}

    @jax.jit
    def f(p, x):
        h = jnp.tanh(x @ p["a"]["w"])
        return jax.nn.log_softmax(h @ p["head"]["w"]), jnp.sin(x)

    xs = [_normal(i + 2, (3, 8), 1.0) for i in range(2)]
    _, stats = calibrate(f, params, xs, collectors=["gram"], progress=False)
    h = [jnp.tanh(x @ params["a"]["w"]) for x in xs]
    np.testing.assert_allclose(stats["head/w"]["gram"],
                               sum(x.T @ x for x in h), rtol=1e-5, atol=1e-5)
    assert "tanh" in ran and ran.count("dot_general") == 1
    assert not {"sin", "exp", "log", "reduce_max"} & set(ran)


def test_collect_stats_serves_every_transform_in_one_pass():
    from jaxq.calib import collect_stats

    params = {"a": {"w": _normal(0, (8, 8))}, "head": {"w": _normal(1, (6, 8))}}

    def f(p, x):
        return jnp.tanh(x @ p["a"]["w"]) @ p["head"]["w"].T

    xs = [_normal(i + 2, (3, 8), 1.0) for i in range(2)]
    gptq = jaxq.GPTQ(bits=4, group_size=8, where="a/")
    smooth = jaxq.SmoothQuant(where="head")
    stats, axes = collect_stats(f, params, xs, [gptq, smooth], progress=False)
    assert set(stats["a/w"]) == set(stats["head/w"]) == {"gram", "absmax"}  # the union
    assert axes == {"a/w": -2, "head/w": -1}
    np.testing.assert_allclose(stats["a/w"]["gram"], sum(x.T @ x for x in xs), rtol=1e-5,
                               atol=1e-5)
    h = jnp.concatenate([jnp.tanh(x @ params["a"]["w"]) for x in xs])
    np.testing.assert_allclose(stats["head/w"]["absmax"], jnp.abs(h).max(0), rtol=1e-6)


def test_cond_batches_take_their_own_branch():
    params = {"a": {"w": _normal(0, (8, 8))}, "b": {"w": _normal(1, (8, 8))},
              "never": {"w": _normal(2, (8, 8))}}

    def f(p, x):
        i = jnp.where(x[0, 0] > 0, 0, 1)
        return jax.lax.switch(i, [lambda h: h @ p["a"]["w"], lambda h: h @ p["b"]["w"],
                                  lambda h: h @ p["never"]["w"]], x)

    pos = jnp.abs(_normal(3, (4, 8), 1.0))
    neg = -jnp.abs(_normal(4, (4, 8), 1.0))
    qp, stats = calibrate(f, params, [pos, neg, pos], RTN, collectors=["gram"], progress=False)
    np.testing.assert_allclose(stats["a/w"]["gram"], 2 * pos.T @ pos, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["b/w"]["gram"], neg.T @ neg, rtol=1e-5, atol=1e-5)
    assert "never/w" not in stats and isinstance(qp["never"]["w"], jaxq.QArray)
    fn = jax.jit(apply(f))
    for x in (pos, neg):
        np.testing.assert_allclose(fn(qp, x), f(dequantized(qp), x), rtol=1e-5, atol=1e-5)


def test_missing_statistics_name_the_leaf():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NeedsGram(jaxq.RTN):
        needs = frozenset({"gram"})

    c = mlp_case()
    with pytest.raises(ValueError, match=r"'l1/b'.*no matmul or convolution"):
        calibrate(c.apply_fn, c.params, c.batches, NeedsGram(bits=4, group_size=8,
                                                      where=lambda path, leaf: True),
                  progress=False)
    with pytest.raises(ValueError, match="unknown statistic 'hessian'"):
        calibrate(c.apply_fn, c.params, c.batches, collectors=["hessian"], progress=False)
    # Where every selected leaf is a site, the transform receives its statistics.
    seen = {}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Spy(jaxq.RTN):
        needs = frozenset({"sq_norm", "mean_abs", "absmax"})

        def transform_leaf(self, path, leaf, *, axis, stats):
            seen[path] = {k: np.asarray(v) for k, v in stats.items()}
            return super().transform_leaf(path, leaf, axis=axis, stats=stats)

    calibrate(c.apply_fn, c.params, c.batches, Spy(bits=4, group_size=8), progress=True)
    x = np.concatenate([np.asarray(b).reshape(-1, 16) for b in c.batches])
    np.testing.assert_allclose(seen["l1/w"]["sq_norm"], (x**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(seen["l1/w"]["mean_abs"], np.abs(x).mean(0), rtol=1e-5)
    np.testing.assert_allclose(seen["l1/w"]["absmax"], np.abs(x).max(0), rtol=1e-6)
    assert set(seen) == {"l1/w", "l2/w", "head/w"}


def test_reduce_stats_hook_sees_raw_states():
    c = mlp_case()
    hows = set()

    def fake_two_hosts(state, how):
        hows.add(how)
        return state * 2 if how == "sum" else state

    _, one = calibrate(c.apply_fn, c.params, c.batches, collectors=["gram", "mean_abs",
                                                                  "absmax"], progress=False)
    _, two = calibrate(c.apply_fn, c.params, c.batches, collectors=["gram", "mean_abs",
                                                                  "absmax"],
                       progress=False, reduce_stats=fake_two_hosts)
    assert hows == {"sum", "max"}
    np.testing.assert_allclose(two["l2/w"]["gram"], 2 * one["l2/w"]["gram"], rtol=1e-6)
    np.testing.assert_allclose(two["l2/w"]["mean_abs"], one["l2/w"]["mean_abs"], rtol=1e-6)
    np.testing.assert_allclose(two["l2/w"]["absmax"], one["l2/w"]["absmax"])


def test_apply_calls_qmatmul_at_sites(monkeypatch):
    import sys

    kernel_module = sys.modules["jaxq.kernels.qmatmul"]  # QArray's registered site op calls it
    calls = []
    real = kernel_module.qmatmul

    def spy(x, w, **kw):
        calls.append((x.shape, w.shape))
        return real(x, w, **kw)

    monkeypatch.setattr(kernel_module, "qmatmul", spy)
    c = mlp_case()
    qp, _ = calibrate(c.apply_fn, c.params, c.batches, c.transform, progress=False)
    got = apply(c.apply_fn)(qp, c.batches[0])
    assert calls == [((2, 4, 16), (32, 16)), ((2, 4, 32), (24, 32)), ((2, 4, 24), (8, 24))]
    np.testing.assert_allclose(got, c.apply_fn(dequantized(qp), c.batches[0]), rtol=1e-5,
                               atol=1e-5)


def test_default_site_op_matches_dequantized_matmul():
    w = jaxq.quantize(_normal(0, (24, 32)), bits=4, group_size=8)
    x = _normal(1, (3, 32), 1.0)
    np.testing.assert_allclose(jaxq.Leaf.matmul(w, x), x @ w.dequantize().T, rtol=1e-5,
                               atol=1e-5)


def test_ragged_batches_must_trace_alike():
    """Batches of other shapes are fine; a model that branches on shape is a clear error."""
    c = mlp_case()
    _, stats = calibrate(c.apply_fn, c.params, [c.batches[0], c.batches[0][:1]],
                         collectors=["count"], progress=False)
    assert float(stats["l1/w"]["count"]) == 8 + 4

    def branchy(p, x):
        return x @ p["w"] if x.shape[0] > 1 else jnp.tanh(x) @ p["w"]

    with pytest.raises(ValueError, match="trace to different programs"):
        calibrate(branchy, {"w": jnp.ones((16, 4))}, [jnp.ones((2, 16)), jnp.ones((1, 16))],
                  collectors=["count"], progress=False)
