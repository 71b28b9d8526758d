"""Distillation losses against float64 numpy references, and their masking and limit cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import distill

B, T, V = 3, 5, 11


def _logits(seed: int, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, T, V)) * scale


def _np_logsoftmax(x: np.ndarray, temp: float = 1.0) -> np.ndarray:
    x = x.astype(np.float64) / temp
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    return (np.exp(logp) * (logp - logq)).sum(-1)


def _np_mean(per: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(per.mean())
    return float((per * mask).sum() / mask.sum())


MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.float32)
s, t = _logits(0), _logits(1)
labels = np.random.default_rng(2).integers(0, V, size=(B, T))


@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_kl_family_matches_float64(mask, temp):
    m = None if mask is None else jnp.asarray(mask)
    lp, lq = _np_logsoftmax(t, temp), _np_logsoftmax(s, temp)
    np.testing.assert_allclose(distill.forward_kl(s, t, m, temperature=temp),
                               _np_mean(_np_kl(lp, lq), mask), rtol=2e-5)
    np.testing.assert_allclose(distill.reverse_kl(s, t, m, temperature=temp),
                               _np_mean(_np_kl(lq, lp), mask), rtol=2e-5)
    for beta in (0.1, 0.5, 0.9):
        mix = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
        ref = beta * _np_kl(lp, mix) + (1 - beta) * _np_kl(lq, mix)
        np.testing.assert_allclose(
            distill.generalized_jsd(s, t, m, beta=beta, temperature=temp),
            _np_mean(ref, mask), rtol=2e-5)
    ce = -np.take_along_axis(_np_logsoftmax(s), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(distill.cross_entropy(s, labels, m), _np_mean(ce, mask), rtol=2e-5)
    alpha = 0.3
    ref = alpha * temp**2 * _np_mean(_np_kl(lp, lq), mask) + (1 - alpha) * _np_mean(ce, mask)
    np.testing.assert_allclose(distill.hinton_kd(s, t, labels, m, temperature=temp, alpha=alpha),
                               ref, rtol=2e-5)


@pytest.mark.parametrize("temp", [0.5, 1.0, 4.0])
def test_hinton_alpha0_is_ce_at_any_temperature(temp):
    np.testing.assert_allclose(distill.hinton_kd(s, t, labels, temperature=temp, alpha=0.0),
                               distill.cross_entropy(s, labels), rtol=1e-6)


def test_hinton_t2_keeps_gradient_scale():
    """The softened KL's gradient shrinks as 1/T^2 at large T (Hinton et al.); times T^2 it
    stays put, so doubling T leaves the gradient norm unchanged (it would quarter without)."""
    g = [jnp.linalg.norm(jax.grad(lambda x, tt=tt: distill.hinton_kd(
        x, t, None, temperature=tt, alpha=1.0))(jnp.asarray(s, jnp.float32)))
        for tt in (8.0, 16.0)]
    assert 0.9 < float(g[1] / g[0]) < 1.1


@jax.jit
def _all_losses(st, tt, mask):
    topk = distill.teacher_topk(tt, 4)
    h = distill.hidden_state_loss(st, tt, mask)
    return [distill.forward_kl(st, tt, mask), distill.reverse_kl(st, tt, mask),
            distill.generalized_jsd(st, tt, mask), distill.cross_entropy(st, labels, mask),
            distill.hinton_kd(st, tt, labels, mask, temperature=2.0, alpha=0.5),
            distill.topk_kd(st, topk, mask), h,
            distill.hidden_state_loss(st, tt, mask, kind="cosine")]


def test_masks_remove_padded_positions():
    pad = MASK == 0
    noise = np.random.default_rng(9).normal(size=(B, T, V)) * 50
    s2 = np.where(pad[..., None], s + noise, s)
    t2 = np.where(pad[..., None], t - noise, t)
    m = jnp.asarray(MASK)
    base, moved = _all_losses(s, t, m), _all_losses(s2, t2, m)
    for a, b in zip(base, moved, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # and the mask matters: without it the same change moves every loss
    for a, b in zip(_all_losses(s, t, None), _all_losses(s2, t2, None), strict=True):
        assert abs(float(a) - float(b)) > 1e-3
    # padded positions get exactly zero gradient
    g = jax.grad(lambda x: distill.forward_kl(x, t, m))(jnp.asarray(s, jnp.float32))
    assert float(jnp.abs(g[pad]).max()) == 0.0 and float(jnp.abs(g[~pad]).max()) > 0


def _np_topk_kd(student, teacher, k):
    lp, lq = _np_logsoftmax(teacher), _np_logsoftmax(student)
    idx = np.argsort(-teacher, axis=-1)[..., :k]
    p_k, q_k = np.take_along_axis(np.exp(lp), idx, -1), np.take_along_axis(np.exp(lq), idx, -1)
    p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    return (p_k * np.log(p_k / q_k)).sum(-1) + p_tail * np.log(p_tail / q_tail)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_matches_float64(k):
    got = distill.topk_kd(s, distill.teacher_topk(t, k), jnp.asarray(MASK))
    np.testing.assert_allclose(got, _np_mean(_np_topk_kd(s, t, k), MASK), rtol=5e-5)


def test_topk_is_a_proper_distribution_and_bounds():
    top = distill.teacher_topk(t, 3)
    total = jnp.exp(jax.nn.logsumexp(top.logprobs, -1)) + jnp.exp(top.log_tail)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    # data processing inequality: merging outcomes can only lower KL
    assert float(distill.topk_kd(s, top)) <= float(distill.forward_kl(s, t)) + 1e-6
    # identical student and teacher: zero loss
    np.testing.assert_allclose(distill.topk_kd(t, top), 0.0, atol=1e-6)


def test_topk_full_vocab_equals_full_kl_with_finite_grads():
    top = distill.teacher_topk(t, V)
    assert bool(jnp.all(jnp.isneginf(top.log_tail)))
    loss_fn = lambda x: distill.topk_kd(x, top, jnp.asarray(MASK))  # noqa: E731
    np.testing.assert_allclose(loss_fn(s), distill.forward_kl(s, t, jnp.asarray(MASK)),
                               rtol=1e-5)
    g = jax.grad(loss_fn)(jnp.asarray(s, jnp.float32))
    g_ref = jax.grad(lambda x: distill.forward_kl(x, t, jnp.asarray(MASK)))(
        jnp.asarray(s, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


def test_topk_tail_is_exact_when_tiny():
    """The tail is a logsumexp, not 1 - sum(top-k): tiny tails keep their relative precision."""
    x = np.zeros((1, 1, 6))
    x[..., 0] = 40.0  # tail mass ~5e-17, invisible to 1 - sum in float32
    top = distill.teacher_topk(x, 1)
    np.testing.assert_allclose(top.log_tail, np.log(5.0) - 40.0, rtol=1e-5)


def test_hidden_state_losses_match_numpy():
    rng = np.random.default_rng(4)
    hs, ht = rng.normal(size=(B, T, 6)), rng.normal(size=(B, T, 8))
    proj = distill.init_projection(jax.random.key(0), 6, 8)
    ps = hs @ np.asarray(proj, np.float64)
    np.testing.assert_allclose(
        distill.hidden_state_loss(hs, ht, jnp.asarray(MASK), projection=proj),
        _np_mean(((ps - ht) ** 2).mean(-1), MASK), rtol=1e-5)
    cos = (ps * ht).sum(-1) / np.linalg.norm(ps, axis=-1) / np.linalg.norm(ht, axis=-1)
    np.testing.assert_allclose(
        distill.hidden_state_loss(hs, ht, jnp.asarray(MASK), projection=proj, kind="cosine"),
        _np_mean(1 - cos, MASK), rtol=1e-5)
    # the projection is learnable: it gets a gradient, the teacher does not
    g_proj, g_t = jax.grad(lambda p, h: distill.hidden_state_loss(hs, h, projection=p),
                           argnums=(0, 1))(proj, jnp.asarray(ht, jnp.float32))
    assert float(jnp.abs(g_proj).max()) > 0 and float(jnp.abs(g_t).max()) == 0
    with pytest.raises(ValueError, match="projection"):
        distill.hidden_state_loss(hs, ht)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="beta"):
        distill.generalized_jsd(s, t, beta=1.0)
    with pytest.raises(ValueError, match="labels"):
        distill.hinton_kd(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        distill.forward_kl(s, t, jnp.ones((B, T + 1)))


def test_losses_jit():
    f = jax.jit(lambda a, b, m: distill.topk_kd(a, distill.teacher_topk(b, 4), m)
                + distill.hinton_kd(a, b, None, m, alpha=1.0))
    assert np.isfinite(float(f(s, t, MASK)))
