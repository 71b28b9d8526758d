"""SmolLM2's tokenizer rebuilt from GGUF metadata: known ids, round trips, export."""

from __future__ import annotations

import pytest
import tokenizers

from jaxq.eval.data import ptb_text
from jaxq.models import Tokenizer
from jaxq.models.tokenizer import TokenizerError


def test_known_encodings(smollm):
    tok: Tokenizer = smollm[2]
    vocab = tok.backend.get_vocab()
    # Byte-level BPE: a leading space becomes "Ġ"; both words are single tokens in the vocab.
    assert tok.encode("Hello world") == [vocab["Hello"], vocab["Ġworld"]]
    # The "smollm" pre-tokenizer splits digits one by one before the GPT-2 regex.
    assert tok.encode(" 2024") == [vocab["Ġ"], vocab["2"], vocab["0"], vocab["2"], vocab["4"]]
    assert tok.encode("<|im_start|>user") == [1, vocab["user"]]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.encode("Hello", add_special_tokens=True) == tok.encode("Hello")  # no BOS added
    assert "<|im_start|>" in tok.chat_template


def test_round_trip_ptb_and_unicode(smollm):
    tok: Tokenizer = smollm[2]
    text = ptb_text("test")[:200_000]
    assert tok.decode(tok.encode(text)) == text
    for s in ["naïve café — “quotes” ½ ∑ 日本語テキスト 🤖🚀", "  leading\tand\r\ntrailing  ",
              "<|im_start|>system\nHi<|im_end|>\n", "x" * 1000, ""]:
        assert tok.decode(tok.encode(s)) == s, s


def test_json_export_reloads_identically(smollm):
    tok: Tokenizer = smollm[2]
    again = tokenizers.Tokenizer.from_str(tok.to_json_str())
    text = ptb_text("valid")[:20_000] + " <|im_end|> 12345 ünïcode"
    assert again.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert again.get_vocab_size() == tok.vocab_size


def _tiny_meta(**kw) -> dict:
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet, "Ġa", "Ġab"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ a", "Ġa b"],
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    meta.update(kw)
    return meta


def test_gguf_metadata_options():
    tok = Tokenizer.from_gguf_metadata(_tiny_meta())
    ab = tok.token_to_id("Ġab")
    assert tok.encode(" ab") == [ab]
    assert tok.encode(" ab", add_special_tokens=True) == [0, ab]  # add_bos_token honoured
    # llama3's pre-tokenizer groups digits by three.
    digits = tok.encode("12345")
    assert tok.decode(digits) == "12345" and len(digits) == 5  # no merges: one byte each
    assert tok.backend.pre_tokenizer.pre_tokenize_str("12345")[0][0] == "123"
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(_tiny_meta(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf_metadata(_tiny_meta(**{"tokenizer.ggml.model": "llama"}))
