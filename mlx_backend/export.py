"""Export a jaxq llama-family model to an mlx-lm directory, without importing mlx.

jaxq's canonical QArray layout *is* MLX's (uint32 words, codes least-significant-bit first along
the input axis, ``w = scale * q + bias`` per group), so a representable QArray is written as its
``weight`` (packed), ``scales`` and ``biases`` unchanged. The directory holds:

- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json`` past ``max_shard_bytes``), keyed by mlx-lm's module paths
  after its ``sanitize`` step (``model.layers.0.self_attn.q_proj.weight`` / ``.scales`` /
  ``.biases``);
- ``config.json`` with the llama hyper-parameters, ``rope_traditional`` and a ``quantization``
  block (defaults, then an entry for every module that differs: its parameters, or ``false``
  for a float one), duplicated into ``quantization_config`` as mlx-lm itself does;
- ``tokenizer.json`` and ``tokenizer_config.json``.

Not representable in MLX, and therefore dequantized and requantized (with a warning naming the
layers): QArrays with an act-order ``perm`` or an unfolded ``input_scale``, widths MLX lacks
(7 bits), group sizes other than 32/64/128, codebook formats (NF4, FP8) and NVFP4 with a global
scale (mlx-lm's QuantizedLinear has none).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.core import formats
from jaxq.core.io import OutputKind
from jaxq.core.qarray import QArray
from jaxq.export.common import (
    ExportError,
    atomic_output,
    flat_params,
    set_rope_layout,
    unflatten,
    warn_layers,
)

#: Affine widths and group sizes mlx.core.quantize accepts (mlx 0.32).
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
#: Microscaling modes: (bits, group size). Scales are uint8, there are no biases.
MX_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
DEFAULT_SHARD_BYTES = 5 * 10**9

QuantSpec = dict[str, Any]  # {"group_size", "bits", "mode"}


def is_mlx_export(path: Path) -> bool:
    """config.json beside safetensors weights tagged ``{"format": "mlx"}``: what
    :func:`export_mlx` (and mlx-lm) writes; an HF checkpoint's are tagged ``pt``."""
    from safetensors import safe_open

    weights = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not weights:
        return False
    try:
        with safe_open(str(weights[0]), framework="np") as fh:
            return (fh.metadata() or {}).get("format") == "mlx"
    except Exception:  # unreadable: not something export_mlx wrote
        return False


#: What :func:`export_mlx` writes; ``overwrite`` replaces only an earlier mlx-lm export.
MLX_DIR = OutputKind(name="an mlx-lm export", is_dir=True, test=is_mlx_export)


@dataclasses.dataclass
class MLXExport:
    """What an export wrote: paths, sizes, quantization block and the layers it requantized."""

    path: Path
    files: dict[str, int]
    quantization: dict[str, Any] | None
    requantized: list[str]
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


# --- which QArrays MLX can hold as they are ----------------------------------------------------

def mlx_spec(leaf: QArray) -> QuantSpec | None:
    """The mlx quantization parameters a QArray is stored with, or None if MLX cannot hold it."""
    if leaf.perm is not None or leaf.input_scale is not None:
        return None
    if leaf.ndim != 2 or leaf.axis != -1 or leaf.scales.shape != (leaf.shape[0], leaf.n_groups):
        return None
    if leaf.fmt == "affine":
        float_scales = jnp.issubdtype(leaf.scales.dtype, jnp.floating)
        if (leaf.bits in AFFINE_BITS and leaf.group_size in GROUP_SIZES and float_scales
                and leaf.biases is not None and leaf.biases.dtype == leaf.scales.dtype):
            return {"group_size": leaf.group_size, "bits": leaf.bits, "mode": "affine"}
        return None
    if leaf.fmt in MX_MODES and (leaf.bits, leaf.group_size) == MX_MODES[leaf.fmt]:
        if leaf.biases is None and leaf.scales.dtype == jnp.uint8:
            return {"group_size": leaf.group_size, "bits": leaf.bits, "mode": leaf.fmt}
    return None


def fallback_spec(leaf: QArray) -> QuantSpec | None:
    """The nearest layout MLX can hold (None: keep the layer in float)."""
    size = leaf.shape[-1]
    if leaf.fmt in MX_MODES:
        bits, group = MX_MODES[leaf.fmt]
        return {"group_size": group, "bits": bits, "mode": leaf.fmt} if size % group == 0 else None
    bits = {"nf4": 4, "nf4_dq": 4}.get(leaf.fmt, 8 if leaf.fmt.startswith("fp8") else leaf.bits)
    bits = min(b for b in AFFINE_BITS if b >= bits) if bits <= 8 else 8
    wanted = leaf.group_size if leaf.group_size in GROUP_SIZES else 64
    for group in (wanted, *sorted(GROUP_SIZES, key=lambda g: abs(g - wanted))):
        if size % group == 0:
            return {"group_size": group, "bits": bits, "mode": "affine"}
    return None


def requantize(leaf: QArray, spec: QuantSpec | None, name: str) -> Any:
    """Dequantize ``leaf`` and quantize it again with ``spec`` (or return float32)."""
    w = leaf.dequantize(jnp.float32)
    if spec is None:
        return w
    if spec["mode"] == "affine":
        scale_dtype = (leaf.scales.dtype if jnp.issubdtype(leaf.scales.dtype, jnp.floating)
                       and leaf.fmt == "affine" else jnp.float16)
        return formats.quantize(w, bits=spec["bits"], group_size=spec["group_size"],
                                scale_dtype=scale_dtype, name=name)
    from jaxq.quant.float_formats import mx_quantize

    return mx_quantize(w, mode=spec["mode"], name=name)


def prepare_params(params: Any, config: Any, *, rope_traditional: bool = False
                   ) -> tuple[dict[str, Any], Any, list[str]]:
    """Flat params exactly as they will be written, the matching config, requantized layers.

    ``rope_traditional=False`` writes Q/K rows in the HF (half-split) order mlx-lm's converted
    models use; ``True`` keeps llama.cpp's interleaved order and sets ``rope_traditional``.
    """
    flat = set_rope_layout(flat_params(params), config, rope_traditional)
    config = dataclasses.replace(config, rope_interleaved=rope_traditional)
    if config.tie_word_embeddings:
        flat.pop("lm_head.weight", None)
    requantized = []
    for key, leaf in flat.items():
        if isinstance(leaf, QArray) and mlx_spec(leaf) is None:
            flat[key] = requantize(leaf, fallback_spec(leaf), key)
            requantized.append(key)
    warn_layers("MLX cannot store these layers as they are; dequantized and requantized to "
                "the nearest MLX layout", requantized)
    return flat, config, requantized


def prepared_tree(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested params pytree of :func:`prepare_params`' output (for jaxq's forward)."""
    return unflatten(flat)


# --- tensors and config ------------------------------------------------------------------------

def _numpy(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def mlx_tensors(flat: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, QuantSpec | bool]]:
    """safetensors tensors and the quantization of each linear/embedding module."""
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, QuantSpec | bool] = {}
    for key, leaf in flat.items():
        module, _, field = key.rpartition(".")
        if isinstance(leaf, QArray):
            spec = mlx_spec(leaf)
            if spec is None or field != "weight":
                raise ExportError(f"{key}: {leaf!r} is not storable in MLX")
            tensors[key] = _numpy(leaf.packed).astype(np.uint32)
            tensors[f"{module}.scales"] = _numpy(leaf.scales)
            if leaf.biases is not None:
                tensors[f"{module}.biases"] = _numpy(leaf.biases)
            modules[module] = spec
        else:
            tensors[key] = _numpy(leaf)
            if field == "weight" and jnp.ndim(leaf) == 2:
                modules[module] = False
    return tensors, modules


def quantization_block(modules: dict[str, QuantSpec | bool]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` dict: the commonest spec as defaults, then every exception."""
    specs = [tuple(sorted(s.items())) for s in modules.values() if s]
    if not specs:
        return None
    default = dict(collections.Counter(specs).most_common(1)[0][0])
    block: dict[str, Any] = {"group_size": default["group_size"], "bits": default["bits"],
                             "mode": default["mode"]}
    for module, spec in modules.items():
        if spec != default:
            block[module] = spec
    return block


def mlx_config(config: Any, quantization: dict[str, Any] | None) -> dict[str, Any]:
    """config.json for mlx-lm's ``llama`` model (plus the HF keys other readers expect)."""
    c = config
    out: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_traditional": bool(c.rope_interleaved),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "attention_bias": bool(c.attention_bias),
        "mlp_bias": bool(c.mlp_bias),
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": "silu",
    }
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(c, name) is not None:
            out[name] = getattr(c, name)
    if quantization is not None:
        out["quantization"] = quantization
        out["quantization_config"] = dict(quantization)
    return out


def tokenizer_config(tokenizer: Any, config: Any) -> dict[str, Any]:
    """tokenizer_config.json for transformers' fast tokenizer (what mlx_lm.load builds)."""
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    }
    out.update(tokenizer.special_config())
    return out


# --- writing -----------------------------------------------------------------------------------

def shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (one tensor may exceed it)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    return shards


def write_weights(out: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards and model.safetensors.index.json."""
    from safetensors.numpy import save_file

    shards = shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_mlx(params: Any, config: Any, tokenizer: Any, out: str | Path, *,
               rope_traditional: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               overwrite: bool = False, allow_nonfinite: bool | None = None) -> MLXExport:
    """Write an mlx-lm directory for a jaxq llama model (QArray or float leaves), atomically.

    ``tokenizer`` is a :class:`jaxq.models.Tokenizer` (or None: no tokenizer files, and
    mlx_lm.load will then refuse the directory). See the module docstring for the layout.
    NaN/Inf in ``params`` or in a tensor to be written (float16 scales of a requantized layer)
    is a :class:`~jaxq.core.finite.NonFiniteError` naming it, unless ``allow_nonfinite`` lets
    it through with a warning (None: the enclosing :func:`jaxq.core.finite.allowing` block's).
    """
    import time

    from jaxq.core.finite import check_finite

    t0 = time.perf_counter()
    check_finite(params, "weight", allow=allow_nonfinite)
    flat, cfg, requantized = prepare_params(params, config, rope_traditional=rope_traditional)
    tensors, modules = mlx_tensors(flat)
    check_finite(tensors, "MLX tensor", allow=allow_nonfinite)
    quant = quantization_block(modules)
    with atomic_output(out, MLX_DIR, overwrite=overwrite) as tmp:
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(mlx_config(cfg, quant), indent=2))
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_json_str())
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(tokenizer_config(tokenizer, cfg), indent=2))
    path = Path(out).absolute()
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    return MLXExport(path, files, quant, requantized, time.perf_counter() - t0)
