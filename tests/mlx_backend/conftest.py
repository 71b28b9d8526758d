"""Make tests/export/_exportkit.py (the tiny llama shared with the GGUF tests) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
