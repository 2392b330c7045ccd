"""Peak memory per process of one loss forward + backward under multi-process training: open_clip's
``DistillClipLoss(local_loss=True, gather_with_grad=True)`` and softalign's ``SoftAlignClipLoss`` (open_clip_train's
drop-in) with CSA only (``beta=0``: the same terms as ``DistillClipLoss``, a contrastive term and a soft-label term
per direction) and with CSA + USA, on the same features and the same 768-d teacher features, side by side in one run.

    python benchmarks/bench_local_rows.py [--worlds 2 4] [--batches 4096 8192] [--dim 256] [--teacher-dim 768]

CPU, gloo, one thread per process. Each (loss, world, batch) runs in fresh processes; the peak is the growth of the
peak RSS from just before the step (glibc returns freed buffers with MALLOC_MMAP_THRESHOLD_=65536, so RSS tracks
live memory), the largest over the processes. ``block`` is one fp32 ``[b, B]`` matrix (``b = B / world`` rows of
this process), the unit in which both losses' memory is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys
import torch, torch.distributed as dist
import torch.nn.functional as F
rank, world, batch, dim, tdim, init, kind = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                             int(sys.argv[5]), sys.argv[6], sys.argv[7])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
b = batch // world
g = torch.Generator().manual_seed(rank)
img = F.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_()
txt = F.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_()
t_img = F.normalize(torch.randn(b, tdim, generator=g), dim=1)
t_txt = F.normalize(torch.randn(b, tdim, generator=g), dim=1)
scale = torch.tensor(2.5, requires_grad=True)
torch.manual_seed(0)  # the same USA heads in every process (as after DDP's broadcast)
if kind == "open_clip":
    from open_clip.loss import DistillClipLoss
    loss = DistillClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    call = lambda: sum(loss(img, txt, scale.exp(), t_img, t_txt, torch.tensor(100.0), output_dict=True).values())
else:
    from softalign.integrations.open_clip import SoftAlignClipLoss
    beta = 0.0 if kind == "csa" else None
    loss = SoftAlignClipLoss(embed_dim=dim, beta=beta, teacher_temperature=0.1, diagnostics_every=0)
    call = lambda: loss(img, txt, scale.exp(), dist_image_features=t_img, dist_text_features=t_txt)
dist.barrier()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = call()
out.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
dist.barrier()
print(json.dumps({"rank": rank, "peak_kib": peak, "loss": out.item()}))
dist.destroy_process_group()
"""


def run(kind: str, world: int, batch: int, dim: int, teacher_dim: int) -> float:
    """The largest peak RSS growth (MiB) over the processes."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/init"
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        args = [str(world), str(batch), str(dim), str(teacher_dim), init, kind]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(r), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(world)
        ]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise RuntimeError(err[-3000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return max(o["peak_kib"] for o in outs) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--teacher-dim", type=int, default=768)
    args = p.parse_args()
    import torch

    print(
        f"gloo, CPU, d={args.dim}, teacher d={args.teacher_dim}, torch {torch.__version__}; peak extra RSS per "
        "process of one forward + backward (MiB, and in [b, B] fp32 blocks)"
    )
    print(
        f"{'world':>5} {'global B':>8} {'block':>7} {'open_clip Distill':>18} {'CSA only':>15} {'CSA + USA':>15} "
        f"{'ratio CSA':>9} {'ratio CSA+USA':>13}"
    )
    for world in args.worlds:
        for batch in args.batches:
            block = (batch // world) * batch * 4 / 2**20
            ref = run("open_clip", world, batch, args.dim, args.teacher_dim)
            csa = run("csa", world, batch, args.dim, args.teacher_dim)
            both = run("csa_usa", world, batch, args.dim, args.teacher_dim)
            cells = [f"{m:8.0f} ({m / block:4.1f})" for m in (ref, csa, both)]
            print(
                f"{world:>5} {batch:>8} {block:>7.0f} {cells[0]:>18} {cells[1]:>15} {cells[2]:>15} "
                f"{csa / ref:>9.2f} {both / ref:>13.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
