"""Cost of the per-call finite check of the loss value (``softalign.losses._inputs.assert_finite``, a
``torch._assert_async``): forward + backward of each loss module with the check and with it switched off, measured
side by side in one run (interleaved rounds; min / median).

    python benchmarks/bench_finite_guard.py [--batch 128] [--dim 1024] [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import fmt, interleaved  # noqa: E402

import softalign.losses._inputs as inputs  # noqa: E402
import softalign.losses.combined as combined  # noqa: E402
from softalign.losses import InfoNCELoss, SoftAlignLoss, VSEHingeLoss  # noqa: E402
from softalign.teacher_inputs import TeacherSimilarities


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=20)
    a = p.parse_args()
    torch.manual_seed(0)
    img = torch.randn(a.batch, a.dim, requires_grad=True)
    txt = torch.randn(a.batch, a.dim, requires_grad=True)
    t = torch.nn.functional.normalize(torch.randn(a.batch, 64), dim=1)
    teacher = dict(teacher=TeacherSimilarities(t @ t.T, t @ t.T))
    losses = {
        "VSEHingeLoss": (VSEHingeLoss(), {}),
        "InfoNCELoss": (InfoNCELoss(), {}),
        "SoftAlignLoss (vsepp + CSA + USA)": (SoftAlignLoss(diagnostics_every=0), teacher),
    }
    real = inputs.assert_finite

    def step(loss, kw, guard):
        inputs.assert_finite = combined.assert_finite = real if guard else (lambda *_: None)
        loss(img, txt, **kw).backward()
        img.grad = txt.grad = None

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.batch}, d={a.dim}; ms per fwd+bwd, "
        "min / median"
    )
    for name, (loss, kw) in losses.items():
        res = interleaved(
            {"with": lambda: step(loss, kw, True), "without": lambda: step(loss, kw, False)},
            rounds=a.rounds,
            inner=a.inner,
            warmup=2,
        )
        ratio = res["with"]["median"] / res["without"]["median"]
        print(
            f"{name:34s} with check {fmt(res['with'], 1e3)}  without {fmt(res['without'], 1e3)}  "
            f"ratio (median) {ratio:.3f}"
        )
    inputs.assert_finite = combined.assert_finite = real


if __name__ == "__main__":
    main()
