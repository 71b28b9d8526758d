"""Export to mlx-lm directories, import them back, and run them with mlx to verify.

:func:`export_mlx` and :func:`load_mlx_dir` need no mlx; :mod:`mlx_backend.verify` does.
"""

from mlx_backend.export import MLXExport, export_mlx
from mlx_backend.load import is_mlx_dir, load_mlx_dir

__all__ = ["MLXExport", "export_mlx", "is_mlx_dir", "load_mlx_dir"]
