"""Peak memory per process of one SoftAlignLoss forward + backward under multi-process training: every process
building the global ``[B, B]`` matrices (``loss.local_rows = False``, the old path) vs this process's rows against
the gathered columns (``local_rows = True``, the default), measured side by side in one run, with the loss values
and input gradients compared.

    python benchmarks/bench_local_rows.py [--world 2] [--batches 1024 2048 4096] [--dim 256] [--loss softalign|clip]

CPU, gloo. Each (path, batch) runs in fresh processes; the peak is the growth of the peak RSS from just before the
step (glibc returns freed buffers with MALLOC_MMAP_THRESHOLD_=65536, so RSS tracks live memory). The loss is the
full stack: VSE++ hinge + CSA + USA (heads) + CMC, teacher embeddings of 384 / 1280 dims; ``--loss clip``:
open_clip_train's drop-in ``SoftAlignClipLoss`` (CLIP contrastive with the model's logit_scale + CSA + USA) with
the teacher features open_clip passes as ``dist_image_features`` / ``dist_text_features``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys
import torch, torch.distributed as dist
rank, world, batch, dim, local, init = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
kind = sys.argv[7]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
from softalign.losses import SoftAlignLoss
b = batch // world
g = torch.Generator().manual_seed(rank)
img = torch.randn(b, dim, generator=g, requires_grad=True)
txt = torch.randn(b, dim, generator=g, requires_grad=True)
e_img = torch.randn(b, 1280, generator=g)
e_txt = torch.randn(b, 384, generator=g)
ids = torch.arange(b) + rank * b
torch.manual_seed(0)  # the same USA heads in every process (as after DDP broadcast)
if kind == "clip":
    from softalign.integrations.open_clip import SoftAlignClipLoss
    loss = SoftAlignClipLoss(embed_dim=dim, teacher_temperature=0.1, diagnostics_every=0)
    loss.soft.local_rows = local
    scale = torch.tensor(2.5, requires_grad=True)
    call = lambda: loss(img, txt, scale.exp(), dist_image_features=e_img, dist_text_features=e_txt)
else:
    loss = SoftAlignLoss(embed_dim=dim, alpha=3.0, beta=3.0, gamma=0.5, teacher_temperature=0.1, diagnostics_every=0)
    loss.local_rows = local
    call = lambda: loss(img, txt, image_ids=ids, teacher_image_emb=e_img, teacher_text_emb=e_txt)
dist.barrier()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = call()
out.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
grad = img.grad.norm().item()
dist.barrier()
print(json.dumps({"rank": rank, "peak_kib": peak, "loss": out.item(), "grad_norm": grad}))
dist.destroy_process_group()
"""


def run(world: int, batch: int, dim: int, local: bool, kind: str = "softalign") -> list:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/init"
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(r),
                    str(world),
                    str(batch),
                    str(dim),
                    "1" if local else "0",
                    init,
                    kind,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(world)
        ]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(err[-3000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return sorted(outs, key=lambda o: o["rank"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--loss", choices=["softalign", "clip"], default="softalign")
    args = p.parse_args()
    print(
        f"{args.world} processes (gloo, CPU), d={args.dim}, --loss {args.loss}; peak extra RSS per process of one "
        "forward + backward"
    )
    print(f"{'global B':>9} {'global [B,B] MiB':>17} {'local rows MiB':>15} {'ratio':>6}  same loss / grads")
    for batch in args.batches:
        full = run(args.world, batch, args.dim, local=False, kind=args.loss)
        rows = run(args.world, batch, args.dim, local=True, kind=args.loss)
        a = max(o["peak_kib"] for o in full) / 1024
        b = max(o["peak_kib"] for o in rows) / 1024
        same = all(
            abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"]))
            and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * max(1e-3, abs(x["grad_norm"]))
            for x, y in zip(full, rows)
        )
        print(f"{batch:>9} {a:>17.1f} {b:>15.1f} {a / max(b, 1e-9):>6.2f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
