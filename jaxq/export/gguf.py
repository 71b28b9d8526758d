"""Export a jaxq llama-family model to a GGUF file that llama.cpp runs.

jaxq's affine layout maps onto llama.cpp's legacy block types by re-layout alone:

=====================================  =========  ===========================================
QArray                                 GGUF       condition for a bit-exact copy
=====================================  =========  ===========================================
affine 4-bit, group a multiple of 32   Q4_1       scales and biases representable in float16
symmetric 4-bit (bias = -8 * scale)    Q4_0       scale representable in float16
affine 5-bit / symmetric 5-bit         Q5_1/Q5_0  as above
symmetric 8-bit (bias = -128 * scale)  Q8_0       scale representable in float16
mxfp4                                  MXFP4      always (same E8M0 byte, same E2M1 codes)
nvfp4 without global scale             NVFP4      rows a multiple of 64
=====================================  =========  ===========================================

A group of 64 or 128 is written as 2 or 4 blocks of 32 sharing its scale and bias. Anything
else (asymmetric 8-bit, 2/3/6-bit, NF4, FP8, act-order ``perm``, ``input_scale``, float32 scales
that float16 cannot hold) is requantized from its dequantized values to the nearest GGUF type
or written as float (``fallback=``), with a warning naming the layers. 1-D tensors (norms) are
F32 and float matrices ``float_type`` (F16 by default), as llama.cpp's own converter does.

llama.cpp's llama architecture expects Q/K rows permuted for interleaved RoPE: jaxq models
loaded from GGUF already are (``rope_interleaved=True``); HF-order ones are permuted here
(a lossless row reorder, also for QArrays).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.core.finite import check_finite
from jaxq.core.io import OutputKind, has_magic
from jaxq.core.qarray import QArray
from jaxq.export.common import (
    ExportError,
    atomic_output,
    flat_params,
    set_rope_layout,
    warn_layers,
)

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
              "lm_head": "output"}
#: Preferred llama.cpp pre-tokenizer names, tried before the other aliases.
_CANONICAL_PRE = ("smollm", "gpt-2", "llama-bpe", "qwen2")
_FLOAT_TYPES = ("f16", "bf16", "f32")
#: What the GGUF exporters write; ``overwrite`` replaces only a file with the GGUF magic.
GGUF_FILE = OutputKind(name="a GGUF file", is_dir=False, test=has_magic(b"GGUF"))


@dataclasses.dataclass
class GGUFExport:
    """What an export wrote: file, size, GGUF type per tensor, and what was not bit-exact."""

    path: Path
    bytes: int
    types: dict[str, str]
    requantized: list[str]
    rerounded: list[str]
    seconds: float = 0.0


def gguf_name(key: str) -> str:
    """llama.cpp tensor name of a flat jaxq key (``model.layers.3.mlp.up_proj.weight``)."""
    module, _, field = key.rpartition(".")
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        sub = ".".join(parts[3:])
        if sub in _LAYER_NAMES:
            return f"blk.{int(parts[2])}.{_LAYER_NAMES[sub]}.{field}"
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{field}"
    raise ExportError(f"{key}: no llama.cpp tensor name for this parameter")


# --- block encoders ----------------------------------------------------------------------------

def _f16_exact(x: np.ndarray) -> bool:
    x32 = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x32.astype(np.float16).astype(np.float32), x32))


def _blocks(qa: QArray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes ``[rows, nb, block]`` (uint8) with per-block scales/biases ``[rows, nb]`` (f32)."""
    codes = np.asarray(qa.codes()).astype(np.uint8)
    rows = codes.shape[0]
    rep = qa.group_size // block
    scales = np.repeat(np.asarray(qa.scales.astype(jnp.float32)), rep, axis=-1)
    biases = (None if qa.biases is None
              else np.repeat(np.asarray(qa.biases.astype(jnp.float32)), rep, axis=-1))
    return codes.reshape(rows, -1, block), scales, biases


def _nibbles(q: np.ndarray) -> np.ndarray:
    """ggml's 4-bit packing of blocks of 32: byte j holds element j (low) and j + 16 (high)."""
    return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _enc_q4_1(q: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16_bytes(s), _f16_bytes(b), _nibbles(q)], axis=-1)


def _enc_q4_0(q: np.ndarray, s: np.ndarray, b: Any) -> np.ndarray:
    return np.concatenate([_f16_bytes(s), _nibbles(q)], axis=-1)


def _qh(q: np.ndarray) -> np.ndarray:
    """The fifth bits of a block of 32 codes as 4 little-endian bytes (bit j = element j)."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _enc_q5_1(q: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16_bytes(s), _f16_bytes(b), _qh(q), _nibbles(q)], axis=-1)


def _enc_q5_0(q: np.ndarray, s: np.ndarray, b: Any) -> np.ndarray:
    return np.concatenate([_f16_bytes(s), _qh(q), _nibbles(q)], axis=-1)


def _enc_q8_0(q: np.ndarray, s: np.ndarray, b: Any) -> np.ndarray:
    signed = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(s), signed], axis=-1)


#: GGUF type -> (bits, symmetric zero point or None, block size, encoder).
_AFFINE_TYPES = {
    "Q4_1": (4, None, 32, _enc_q4_1), "Q4_0": (4, 8, 32, _enc_q4_0),
    "Q5_1": (5, None, 32, _enc_q5_1), "Q5_0": (5, 16, 32, _enc_q5_0),
    "Q8_0": (8, 128, 32, _enc_q8_0),
}


def _is_symmetric(qa: QArray, zero: int) -> bool:
    s = np.asarray(qa.scales.astype(jnp.float32))
    b = np.asarray(qa.biases.astype(jnp.float32))
    return bool(np.array_equal(b, np.float32(-zero) * s))


def lossless_type(qa: QArray) -> str | None:
    """The GGUF type that holds ``qa``'s codes exactly (scales possibly re-rounded), or None."""
    if qa.perm is not None or qa.input_scale is not None or qa.ndim != 2 or qa.axis != -1:
        return None
    if qa.fmt == "mxfp4" and qa.group_size == 32:
        return "MXFP4"
    if qa.fmt == "nvfp4" and qa.group_size == 16 and qa.biases is None and qa.size % 64 == 0:
        return "NVFP4"
    if qa.fmt != "affine" or qa.group_size % 32 or qa.biases is None:
        return None
    if qa.scales.shape != (qa.shape[0], qa.n_groups):
        return None
    for name, (bits, zero, _, _) in _AFFINE_TYPES.items():
        if bits == qa.bits and (zero is None or _is_symmetric(qa, zero)):
            if zero is None and bits == 4 and _is_symmetric(qa, 8):
                return "Q4_0"  # the smaller type when the bias is the symmetric one
            if zero is None and bits == 5 and _is_symmetric(qa, 16):
                return "Q5_0"
            return name
    return None


def _f16_rerounded(qa: QArray) -> bool:
    if qa.fmt != "affine":
        return False
    return not (_f16_exact(np.asarray(qa.scales.astype(jnp.float32)))
                and _f16_exact(np.asarray(qa.biases.astype(jnp.float32))))


def encode_qarray(qa: QArray, qtype: str) -> np.ndarray:
    """GGUF block bytes ``[rows, row_bytes]`` (uint8) of ``qa`` in ``qtype`` (see lossless_type)."""
    if qtype in _AFFINE_TYPES:
        _, _, block, enc = _AFFINE_TYPES[qtype]
        q, s, b = _blocks(qa, block)
        return enc(q, s, b).reshape(q.shape[0], -1)
    codes = np.asarray(qa.codes()).astype(np.uint8)
    rows = codes.shape[0]
    scales = np.asarray(qa.scales).astype(np.uint8)
    if qtype == "MXFP4":
        q = codes.reshape(rows, -1, 32)
        return np.concatenate([scales[..., None], _nibbles(q)], axis=-1).reshape(rows, -1)
    if qtype == "NVFP4":  # super-blocks of 64: 4 E4M3 scales, then 4 x 8 bytes (k | k+8 << 4)
        q = codes.reshape(rows, -1, 4, 16)
        qs = (q[..., :8] & 0xF) | ((q[..., 8:] & 0xF) << 4)
        sc = scales.reshape(rows, -1, 4)
        return np.concatenate([sc, qs.reshape(rows, -1, 32)], axis=-1).reshape(rows, -1)
    raise ExportError(f"no encoder for GGUF type {qtype}")


def decode_blocks(raw: np.ndarray, qtype: str, cols: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_qarray` for the affine types: codes and per-block d (and m).

    Lets tests check a round trip bit for bit: ``codes [rows, cols]`` (uint8), ``d`` and ``m``
    ``[rows, cols // 32]`` (float16; ``m`` only for Q4_1/Q5_1).
    """
    bits, zero, block, _ = _AFFINE_TYPES[qtype]
    rows = raw.shape[0]
    nb = cols // block
    blk = raw.reshape(rows, nb, -1)
    out = {"d": blk[..., 0:2].copy().view(np.float16)[..., 0]}
    pos = 2
    if zero is None:
        out["m"] = blk[..., 2:4].copy().view(np.float16)[..., 0]
        pos = 4
    if qtype == "Q8_0":
        q = (blk[..., pos:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        high = None
        if bits == 5:
            high = np.unpackbits(blk[..., pos:pos + 4], axis=-1, bitorder="little")
            pos += 4
        qs = blk[..., pos:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
        if high is not None:
            q = q | (high << 4)
    out["codes"] = q.reshape(rows, cols)
    return out


# --- fallbacks ---------------------------------------------------------------------------------

def nearest_type(qa: QArray) -> str:
    """The GGUF type a non-mappable QArray is requantized to (by its bit width)."""
    bits = {"nf4": 4, "nf4_dq": 4, "mxfp8": 8}.get(qa.fmt, qa.bits)
    if qa.fmt.startswith("fp8"):
        bits = 8
    return "Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else "Q8_0"


def _float_tensor(w: Any, float_type: str) -> tuple[np.ndarray, str]:
    w = np.asarray(jnp.asarray(w, jnp.float32))
    if w.ndim == 1 or float_type == "f32":
        return w, "F32"
    if float_type == "bf16":
        import gguf

        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16), "BF16"
    return w.astype(np.float16), "F16"


def tensor_data(key: str, leaf: Any, *, float_type: str, fallback: str
                ) -> tuple[np.ndarray, str, str]:
    """``(data, GGUF type, how)`` for one leaf; ``how`` is exact, reround or requantize."""
    import gguf

    if not isinstance(leaf, QArray):
        data, qtype = _float_tensor(leaf, float_type)
        return data, qtype, "exact"
    qtype = lossless_type(leaf)
    if qtype is not None:
        return encode_qarray(leaf, qtype), qtype, "reround" if _f16_rerounded(leaf) else "exact"
    w = np.asarray(leaf.dequantize(jnp.float32))
    if fallback in _FLOAT_TYPES:
        data, qtype = _float_tensor(w, fallback)
        return data, qtype, "requantize"
    qtype = nearest_type(leaf)
    if w.shape[-1] % 32:
        data, qtype = _float_tensor(w, "f16")
        return data, qtype, "requantize"
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]), qtype, "requantize"


# --- tokenizer metadata ------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer's split rules."""
    from jaxq.models.tokenizer import _GPT2, PRE_TOKENIZER_REGEXES

    pre = json.loads(tokenizer.to_json_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pat = step.get("pattern", {})
            regexes.append(pat.get("Regex") or pat.get("String"))
        elif kind == "Digits" and step.get("individual_digits"):
            regexes.append(r"\p{N}")
        elif kind == "ByteLevel" and step.get("use_regex", True):
            regexes.append(_GPT2)
    names = [*_CANONICAL_PRE, *PRE_TOKENIZER_REGEXES]
    for name in names:
        if tuple(PRE_TOKENIZER_REGEXES.get(name, ())) == tuple(regexes):
            return name
    warn_layers("unknown pre-tokenizer; writing 'gpt-2' (pass pre= to choose)",
                [json.dumps(pre)[:200]])
    return "gpt-2"


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges, special ids, add_bos/eos and chat template."""
    spec = json.loads(tokenizer.to_json_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError("GGUF export supports byte-level BPE tokenizers only")
    n = tokenizer.vocab_size
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(n)]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [(3 if added[i].get("special") else 4) if i in added else 1 for i in range(n)]
    if vocab_size > n:  # embedding rows past the tokenizer: unused padding tokens
        tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
        types += [5] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    plain = tokenizer.encode("a")
    with_special = tokenizer.encode("a", add_special_tokens=True)
    meta: dict[str, Any] = {"tokens": tokens[:vocab_size], "types": types[:vocab_size],
                            "merges": merges,
                            "add_bos": len(with_special) > len(plain) and
                            with_special[0] == tokenizer.bos_id,
                            "add_eos": len(with_special) > len(plain) and
                            with_special[-1] == tokenizer.eos_id}
    for name in ("bos", "eos", "pad", "unk"):
        meta[name] = getattr(tokenizer, f"{name}_id", None)
    meta["chat_template"] = getattr(tokenizer, "chat_template", None)
    return meta


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> None:
    meta = tokenizer_metadata(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(tokenizer))
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if meta[name] is not None:
            add(int(meta[name]))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


def _write_hparams(writer: Any, config: Any, name: str, file_type: int) -> None:
    c = config
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)
    if c.head_dim * c.num_heads != c.hidden_size:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _file_type(types: dict[str, str]) -> int:
    """general.file_type: ``MOSTLY_<commonest matrix type>``."""
    import gguf

    common = collections.Counter(t for k, t in types.items() if not k.endswith("norm.weight"))
    top = common.most_common(1)[0][0] if common else "F32"
    name = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "MXFP4": "MOSTLY_MXFP4_MOE"}.get(
        top, f"MOSTLY_{top}")
    return int(getattr(gguf.LlamaFileType, name, gguf.LlamaFileType.GUESSED))


# --- entry points ------------------------------------------------------------------------------

def export_gguf(params: Any, config: Any, tokenizer: Any, path: str | Path, *,
                float_type: str = "f16", fallback: str = "nearest", name: str = "jaxq model",
                pre: str | None = None, overwrite: bool = False,
                allow_nonfinite: bool | None = None) -> GGUFExport:
    """Write ``params`` (QArray or float leaves) as a llama GGUF file, atomically.

    ``float_type``: f16, bf16 or f32 for float matrices (norms are always F32).
    ``fallback``: ``"nearest"`` requantizes QArrays that no GGUF type holds exactly to Q4_1 /
    Q5_1 / Q8_0 by width; f16/bf16/f32 writes them as float instead. ``pre`` overrides the
    detected llama.cpp pre-tokenizer name.

    NaN/Inf in ``params``, or in what the file would hold (a float16 tensor or block scale
    past float16's range), is a :class:`~jaxq.core.finite.NonFiniteError` naming the tensor,
    unless ``allow_nonfinite`` lets it through with a warning (None: the enclosing
    :func:`jaxq.core.finite.allowing` block's setting).
    """
    import gguf

    if float_type not in _FLOAT_TYPES or fallback not in (*_FLOAT_TYPES, "nearest"):
        raise ExportError(f"float_type must be one of {_FLOAT_TYPES} and fallback 'nearest' "
                          f"or one of them; got {float_type!r}, {fallback!r}")
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer (llama.cpp reads it from "
                          "the file)")
    t0 = time.perf_counter()
    check_finite(params, "weight", allow=allow_nonfinite)
    flat = set_rope_layout(flat_params(params), config, True)
    if config.tie_word_embeddings:
        flat.pop("lm_head.weight", None)
    tensors, types, how = {}, {}, {}
    for key, leaf in flat.items():
        gname = gguf_name(key)
        tensors[gname], types[gname], how[gname] = tensor_data(
            key, leaf, float_type=float_type, fallback=fallback)
    check_finite(_written_floats(tensors, types, flat), "GGUF tensor", allow=allow_nonfinite)
    requant = [k for k, h in how.items() if h == "requantize"]
    reround = [k for k, h in how.items() if h == "reround"]
    warn_layers("no GGUF type holds these layers exactly; requantized from their dequantized "
                f"values ({'nearest GGUF type' if fallback == 'nearest' else fallback})", requant)
    warn_layers("scales or biases not representable in float16, re-rounded", reround)
    with atomic_output(path, GGUF_FILE, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _write_hparams(writer, config, name, _file_type(types))
        _write_tokenizer(writer, tokenizer, config.vocab_size, pre)
        for gname, data in tensors.items():
            qtype = gguf.GGMLQuantizationType[types[gname]]
            raw = None if qtype in (gguf.GGMLQuantizationType.F32,
                                    gguf.GGMLQuantizationType.F16) else qtype
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    out = Path(path).absolute()
    return GGUFExport(out, out.stat().st_size, types, requant, reround,
                      time.perf_counter() - t0)


def _written_floats(tensors: dict[str, np.ndarray], types: dict[str, str],
                    flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """The float values the file will hold, by GGUF name: float tensors and the float16 block
    scales of the affine types (either may overflow where the source was finite)."""
    cols = {gguf_name(k): leaf.size if isinstance(leaf, QArray) else np.shape(leaf)[-1]
            for k, leaf in flat.items()}
    out = {}
    for name, data in tensors.items():
        if types[name] in ("F32", "F16"):
            out[name] = data
        elif types[name] in _AFFINE_TYPES:  # d (and m) lead each block, as float16
            _, zero, block, _ = _AFFINE_TYPES[types[name]]
            head_bytes = 2 if zero is not None else 4
            head = data.reshape(data.shape[0], cols[name] // block, -1)[..., :head_bytes]
            out[f"{name}/scales"] = np.ascontiguousarray(head).view(np.float16)
    return out


#: llama.cpp K-quant file types accepted by :func:`kquant`.
KQUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                "Q6_K")


def kquant(src: str | Path, dst: str | Path, ftype: str = "Q4_K_M", *, threads: int = 0,
           overwrite: bool = False) -> Path:
    """Re-quantize a GGUF file to a llama.cpp K-quant type (needs llama-cpp-python).

    llama.cpp dequantizes each tensor of ``src`` (exactly, for the legacy types jaxq writes) and
    quantizes it with its own K-quant mixes. Atomic like the exports.
    """
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError("K-quant post-processing needs llama-cpp-python (see "
                          "docs/llama-cpp.md)") from e
    if ftype not in KQUANT_TYPES:
        raise ExportError(f"ftype must be one of {KQUANT_TYPES}, got {ftype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.allow_requantize = True
    with atomic_output(dst, GGUF_FILE, overwrite=overwrite) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                            llama_cpp.byref(params))
        if rc != 0:
            raise ExportError(f"llama_model_quantize failed with status {rc}")
    return Path(dst).absolute()
