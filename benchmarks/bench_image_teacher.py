"""CPU cost per image of the EfficientNet-Lite teachers: channels-last micro-batches of 8 (what
``EfficientNetLiteTeacher.features`` does on CPU) vs one contiguous forward of the whole batch, interleaved.

    python benchmarks/bench_image_teacher.py [--batch 32] [--repeats 3] [--variants lite0 lite2]

Prints ms per image (min / median over repeats, A and B alternating in each repeat) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["lite0", "lite2"], choices=["lite0", "lite2"])
    args = p.parse_args()
    from softalign.teachers import resolve_image_teacher

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    for v in args.variants:
        teacher = resolve_image_teacher(f"offline-efficientnet-{v}")
        size = teacher.preprocessing.size
        x = torch.randn(args.batch, 3, size[0], size[1])

        def micro():
            return teacher.features(x)

        def whole():
            return teacher.model.extract_features(x.contiguous()).mean(dim=(2, 3))

        times = {"micro-batch 8, channels-last": [], f"one batch of {args.batch}": []}
        with torch.inference_mode():
            torch.testing.assert_close(micro(), whole(), rtol=1e-3, atol=1e-3)  # same features
            for _ in range(args.repeats):
                for name, fn in zip(times, (micro, whole)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(1000 * (time.perf_counter() - t0) / args.batch)
        a, b = (times[k] for k in times)
        for name, t in times.items():
            print(f"{v}: {name:<30} {min(t):7.1f} ms/image min, {statistics.median(t):7.1f} median")
        print(f"{v}: whole / micro (median) = {statistics.median(b) / statistics.median(a):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
