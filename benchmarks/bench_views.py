"""Benchmark: augmentation-aware teacher views (softalign.teachers.views) against the clean teacher cache, side by
side in one run.

    python benchmarks/bench_views.py            # 128 Twemoji images, K = 4
    python benchmarks/bench_views.py --quick    # 32 images

1. build: ``TeacherCache.build`` of the images' clean teacher embeddings (image side only matters here: the same
   EfficientNet-Lite0 teacher) vs ``ViewCache.build`` of K augmented views per image. Expected about K x.
2. lookup per training batch of 128 (interleaved rounds, min / median): the clean cache's image + text
   embeddings vs the views' image embeddings (image id, view) + the cache's text embeddings, as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import fmt, interleaved  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--views", type=int, default=4)
    args = ap.parse_args()
    from softalign.data.demo import build_demo_data
    from softalign.teachers import TeacherCache
    from softalign.teachers.views import ViewCache

    n = 32 if args.quick else 128
    train, _ = build_demo_data(captions_per_image=1, test_fraction=0.2, max_images=int(n / 0.8) + 1)
    images, captions = train.images[:n], train.captions[:n]
    c2i = list(range(len(images)))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = TeacherCache.build(Path(tmp) / "clean", captions, images, c2i, progress=False)
        t_clean = time.perf_counter() - t0
        t0 = time.perf_counter()
        views = ViewCache.build(Path(tmp) / "views", images, args.views, progress=False)
        t_views = time.perf_counter() - t0
        print(
            f"[1] build, {len(images)} images (EfficientNet-Lite0; the clean build also encodes {len(captions)} "
            f"captions with MiniLM), 2 CPU threads: clean cache {t_clean:.2f} s, {args.views} views per image "
            f"{t_views:.2f} s ({t_views / t_clean:.2f}x)"
        )
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randint(len(images), (128,), generator=g), torch.randint(args.views, (128,), generator=g))
            for _ in range(16)
        ]
        it = iter(range(10**9))

        def clean():
            ids, _ = batches[next(it) % 16]
            cache.embeddings(ids)

        def with_views():
            ids, k = batches[next(it) % 16]
            views.image_embeddings(ids, k)
            cache.embeddings(ids)

        r = interleaved({"clean": clean, "views": with_views}, rounds=7, inner=50, warmup=5)
        print(
            f"[2] lookup per batch of 128, ms (min / median): clean cache {fmt(r['clean'], 1e3)}, views + text "
            f"{fmt(r['views'], 1e3)} ({r['views']['median'] / r['clean']['median']:.2f}x)"
        )


if __name__ == "__main__":
    main()
