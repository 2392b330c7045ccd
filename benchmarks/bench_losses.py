"""Forward+backward cost of the soft-label stack vs the base hinge loss alone, measured side by side.

    python benchmarks/bench_losses.py [--batch 128] [--dim 1024] [--repeats 30] [--device cpu]

Prints time per step (median of ``--repeats`` after warm-up) and the peak extra memory of one step, for:
base VSE++ hinge (max violation) alone, and base + CSA + USA (with its heads) + CMC, and their ratio.
Target (issue 2): full soft-label stack <= 3x the base loss alone at B=128, d=1024 on CPU.
Peak memory is measured in a fresh subprocess per variant from before its first step (CPU: growth of the peak
RSS, with glibc returning freed buffers; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from softalign.teacher_inputs import TeacherSimilarities

VARIANTS = {
    "base": "base: VSE++ hinge (max violation)",
    "full": "full: base+CSA+USA(d x d heads, as CUSA)+CMC",
    "full-no-heads": "full, USA on the embeddings (no heads)",
}


def build(variant: str, dim: int):
    from softalign.losses import SoftAlignLoss

    if variant == "base":
        return SoftAlignLoss(alpha=0.0, beta=0.0, gamma=0.0, base="vsepp")
    if variant == "full-no-heads":
        return SoftAlignLoss(embed_dim=None, alpha=0.1, beta=0.5, gamma=1.0, base="vsepp")
    return SoftAlignLoss(embed_dim=dim, alpha=0.1, beta=0.5, gamma=1.0, base="vsepp")


def run_variant(variant: str, batch: int, dim: int, repeats: int, device: str) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    img = torch.randn(batch, dim, device=device, requires_grad=True)
    txt = torch.randn(batch, dim, device=device, requires_grad=True)
    t_img = torch.nn.functional.normalize(torch.randn(batch, 1280, device=device), dim=1)
    t_txt = torch.nn.functional.normalize(torch.randn(batch, 384, device=device), dim=1)
    s_img, s_txt = t_img @ t_img.t(), t_txt @ t_txt.t()
    ids = torch.arange(batch, device=device) // 5
    loss_fn = build(variant, dim).to(device)

    def step():
        loss = loss_fn(img, txt, image_ids=ids, teacher=TeacherSimilarities(s_img, s_txt))
        loss.backward()
        img.grad = txt.grad = None
        loss_fn.zero_grad(set_to_none=True)

    # peak extra memory of a step, measured from before the first step (the child runs with
    # MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the resident set and the peak RSS tracks live memory)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {"variant": variant, "median_ms": 1000 * statistics.median(times), "peak_extra_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(run_variant(args._child, args.batch, args.dim, args.repeats, args.device)))
        return

    def child(variant, repeats, env):
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            variant,
            "--batch",
            str(args.batch),
            "--dim",
            str(args.dim),
            "--repeats",
            str(repeats),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(run.stdout.strip().splitlines()[-1])

    results = {}
    # timing: default allocator; variants interleaved twice so drift of a shared machine hits all alike
    for _round in range(2):
        for variant in VARIANTS:
            out = child(variant, args.repeats, dict(os.environ))
            if variant not in results or out["median_ms"] < results[variant]["median_ms"]:
                results[variant] = out
    # memory: a separate process per variant in which glibc returns freed buffers (mmap threshold 64 KiB), so the
    # growth of the peak resident set is the step's live memory (this setting slows the steps: not timed)
    for variant in VARIANTS:
        mem = child(variant, 2, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        results[variant]["peak_extra_bytes"] = mem["peak_extra_bytes"]
    base = results["base"]
    print(
        f"B={args.batch} d={args.dim} device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"{'variant':<46}{'fwd+bwd ms':>12}{'x base':>8}{'peak extra MiB':>16}")
    for variant, label in VARIANTS.items():
        r = results[variant]
        print(
            f"{label:<46}{r['median_ms']:>12.3f}{r['median_ms'] / base['median_ms']:>8.2f}"
            f"{r['peak_extra_bytes'] / 2**20:>16.2f}"
        )
    print("target (issue 2): full soft-label stack <= 3x the base loss alone")


if __name__ == "__main__":
    main()
