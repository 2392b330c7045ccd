"""What the cache's integrity checks cost, measured side by side in one run (A/B interleaved, repeated).

1. **Image fingerprint** per image: ``--image-hash stat`` (path + size) vs ``content`` (SHA-256 of the file, the
   default) vs what a build does with every image anyway: decoding it (PIL) and the image teacher's forward
   (EfficientNet-Lite0 when its package is installed). Images are JPEGs of COCO's typical size (640 x 480,
   quality 90, about 100-150 KB), written to a temporary directory.
2. **Loading a cache**: ``TeacherCache.load(verify=False)`` vs ``verify=True`` (SHA-256 of each table + a NaN
   scan), on a synthetic cache of ``--captions`` x 384 fp16 text rows and a fifth as many 1280-d image rows.

    python benchmarks/bench_fingerprint.py [--images 64] [--captions 200000] [--repeats 5]

Prints min / median over the repeats and the ratios. The page cache is warm after the first repeat (as on a
machine that has just built or used the cache); the first repeat shows the cold case.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _jpegs(directory: Path, n: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth noise compresses like a photo (a flat image would be unrealistically small)
        base = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        p = directory / f"{i:06d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    return paths


def _time(fn, repeats, names):
    """Interleaved: each repeat runs every variant once, in order."""
    times = {k: [] for k in names}
    for _ in range(repeats):
        for k in names:
            t0 = time.perf_counter()
            fn[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_images(n: int, repeats: int) -> None:
    from softalign.teachers.inputs import ImageSource, load_image

    with tempfile.TemporaryDirectory() as tmp:
        paths = _jpegs(Path(tmp), n)
        size = sum(Path(p).stat().st_size for p in paths) / n
        src = ImageSource(paths)
        fns = {
            "stat (path + size)": lambda: src.fingerprint("stat"),
            "content (SHA-256)": lambda: src.fingerprint("content"),
            "decode (PIL)": lambda: [load_image(p, i) for i, p in enumerate(paths)],
        }
        teacher = None
        try:
            from softalign.teachers import resolve_image_teacher

            teacher = resolve_image_teacher("offline-efficientnet-lite0", device="cpu")
            images = [load_image(p, i) for i, p in enumerate(paths)]

            def encode():
                with torch.inference_mode():
                    for s in range(0, n, 32):
                        teacher.encode(images[s : s + 32])

            fns["teacher forward (Lite0)"] = encode
        except ImportError as err:
            print(f"(no image teacher: {err})")
        times = _time(fns, repeats, list(fns))
        print(f"image fingerprint, {n} JPEGs of {size / 1e3:.0f} KB, {repeats} repeats:")
        for k, t in times.items():
            print(f"  {k:<26} {1e3 * min(t) / n:8.3f} ms/image min  {1e3 * statistics.median(t) / n:8.3f} median")
        med = {k: statistics.median(t) for k, t in times.items()}
        content = med["content (SHA-256)"]
        print(f"  content / stat   = {content / med['stat (path + size)']:.1f}x")
        print(f"  content / decode = {content / med['decode (PIL)']:.3f}x (decoding happens in every build)")
        if "teacher forward (Lite0)" in med:
            work = med["decode (PIL)"] + med["teacher forward (Lite0)"]
            print(f"  content / (decode + teacher) = {content / work:.4f}x: what content hashing adds to a build")


def bench_load(captions: int, repeats: int) -> None:
    from softalign.teachers import TeacherCache
    from softalign.teachers.importers import import_npy

    rng = np.random.default_rng(0)
    images = max(1, captions // 5)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cache"
        import_npy(
            out,
            rng.normal(size=(images, 1280)).astype(np.float32),
            [i // 5 for i in range(captions)],
            text_features=rng.normal(size=(captions, 384)).astype(np.float32),
            progress=False,
        )
        mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
        fns = {
            "verify=False": lambda: TeacherCache.load(out, verify=False),
            "verify=True": lambda: TeacherCache.load(out, verify=True),
        }
        times = _time(fns, repeats, list(fns))
        print(
            f"cache load, {captions} captions x 384 + {images} images x 1280 (fp16, {mb:.0f} MB), {repeats} repeats:"
        )
        for k, t in times.items():
            print(f"  {k:<14} {1e3 * min(t):9.1f} ms min  {1e3 * statistics.median(t):9.1f} median")
        a, b = (statistics.median(times[k]) for k in fns)
        print(f"  verify=True - verify=False = {1e3 * (b - a):.0f} ms ({(b - a) / (mb / 1e3):.2f} s per GB of tables)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--captions", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_images(args.images, args.repeats)
    bench_load(args.captions, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
