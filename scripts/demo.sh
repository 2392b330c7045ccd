#!/usr/bin/env bash
# Sets up .venv and runs the offline demo: teacher cache -> train base and +CUSA -> evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
softalign demo "$@"
