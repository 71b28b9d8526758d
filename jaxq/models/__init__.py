"""Reference model architectures (Llama family) and loaders for GGUF and HF safetensors."""

from jaxq.core.checks import ModelLoadError  # noqa: I001  (first: the loaders import it from here)

from jaxq.models.default import default_model_path, load_default, load_model  # noqa: E402
from jaxq.models.gguf_loader import load_gguf  # noqa: E402, I001
from jaxq.models.hf_loader import load_hf_dir  # noqa: E402
from jaxq.models.llama import (  # noqa: E402
    LlamaConfig,
    convert_rope_layout,
    decode_step,
    forward,
    generate,
    init_cache,
    init_params,
    make_apply_fn,
    param_count,
)
from jaxq.models.tokenizer import Tokenizer  # noqa: E402

__all__ = [
    "LlamaConfig",
    "ModelLoadError",
    "Tokenizer",
    "convert_rope_layout",
    "decode_step",
    "default_model_path",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "load_default",
    "load_gguf",
    "load_hf_dir",
    "load_model",
    "make_apply_fn",
    "param_count",
]
