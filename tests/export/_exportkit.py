"""Shared by tests/export and tests/mlx_backend: a tiny llama with a real byte-level BPE.

Everything is small enough that an export, a load in mlx-lm and a forward take well under a
second, so the format and layout checks run in the fast suite; the real SmolLM2 runs are slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _tinyllama import tiny_llama

import jaxq
from jaxq.models.llama import LlamaConfig, Params
from jaxq.models.tokenizer import Tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog. 12 cats and 345 dogs ran home. "
        "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump! ") * 20


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    """A trained byte-level BPE (smollm-style digit splitting) with three special tokens."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r"\p{N}"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT], trainer)
    return Tokenizer(backend, bos_id=1, eos_id=2, pad_id=2, unk_id=0,
                     chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def export_llama(seed: int = 0) -> tuple[LlamaConfig, Params]:
    """The tiny llama on this tokenizer: 128 wide (room for g64/g128 blocks), GQA, interleaved
    RoPE (GGUF's layout), tied head."""
    return tiny_llama(seed, scale=0.08, vocab_size=tiny_tokenizer().vocab_size, hidden_size=128,
                      intermediate_size=256, head_dim=32, tie_word_embeddings=True,
                      rope_interleaved=True, bos_token_id=1, eos_token_id=2)


def dequantized(params):
    return jax.tree.map(jaxq.dequantize, params, is_leaf=jaxq.is_leaf)


def prompt_ids(n: int = 12) -> np.ndarray:
    return np.asarray(tiny_tokenizer().encode(TEXT)[:n], np.int32)


def jaxq_logits(params, config, tokens) -> np.ndarray:
    from jaxq.models.llama import forward

    return np.asarray(forward(dequantized(params), jnp.asarray(tokens)[None], config))[0]


def jaxq_greedy(params, config, prompt, steps: int) -> list[int]:
    from jaxq.models.llama import generate

    return np.asarray(generate(dequantized(params), config, jnp.asarray(prompt), steps,
                               stop_at_eos=False)).tolist()
