"""Exporters: GGUF (llama.cpp) here; mlx-lm directories in the top-level ``mlx_backend``."""

from jaxq.export.common import ExportError, ExportWarning
from jaxq.export.gguf import export_gguf, kquant

__all__ = ["ExportError", "ExportWarning", "export_gguf", "kquant"]
