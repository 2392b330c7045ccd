"""softalign encode: a model -> an embeddings file for ``softalign eval``.

    softalign encode --model runs/sop_student --benchmark sop --root data/Stanford_Online_Products --out sop.safetensors
    softalign encode --model open_clip:ViT-B-32/openai --benchmark inshop --root data/inshop --out inshop.safetensors
    softalign encode --model timm:convnext_tiny --weights convnext_tiny.safetensors --images photos/ --out photos.safetensors

``--model``: a ``softalign train`` output directory (or its checkpoints/last.pt), ``open_clip:<arch>[/<pretrained>]``
or ``timm:<name>``; see :mod:`softalign.eval.encode`. The file holds ``image`` [N, D] (L2-normalised) and, for a
benchmark, ``image_labels`` (and In-Shop's ``query_indices`` / ``gallery_indices``): ``softalign eval --embeddings``
reports the DML metrics (R@1/2/4/8, MAP@R, R-Precision) of such an image-only file.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and images")
    g.add_argument("--model", help="softalign train output directory (or checkpoints/last.pt), "
                                   "open_clip:<arch>[/<pretrained>] or timm:<name>")
    g.add_argument("--weights", default=None, help="local weights file for a timm:<name> model")
    g.add_argument("--heads", choices=("cross", "uni"), default="cross",
                   help="softalign runs: the joint embeddings (cross, default) or USA's uni-modal heads (uni)")
    g.add_argument("--benchmark", choices=("cub", "cars", "sop", "inshop", "inaturalist"), default=None,
                   help="encode a DML benchmark's evaluation split (with --root: the data set's own folder)")
    g.add_argument("--root", default=None, help="the benchmark's folder, as downloaded")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("encode", help="embed images with a trained model, for softalign eval",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--images", default=None, help="a folder of images, or a text file with one image path per line")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=run)
    return p


def _image_list(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return files
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        missing = next((ln for ln in lines if not Path(ln).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"--images {spec}: listed image {missing} does not exist")
        return lines
    raise FileNotFoundError(f"--images {spec}: no such folder or list file")


def encode_from_args(args, images: str | None = None) -> dict[str, Any]:
    """The embeddings (and benchmark labels / query-gallery indices) that ``args`` ask for."""
    import torch

    from softalign.eval.encode import check_model_spec, encode_images, image_encoder

    if not args.model:
        raise ValueError("--model is required (a softalign train output directory, open_clip:<arch>[/<pretrained>] "
                         "or timm:<name>)")
    check_model_spec(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    out: dict[str, Any] = {}
    if args.benchmark:
        from softalign.data.dml import load_dml_benchmark

        if not args.root:
            raise ValueError(f"--benchmark {args.benchmark} needs --root (the data set's folder)")
        bench = load_dml_benchmark(args.benchmark, args.root, check_files=True)
        paths = bench.paths
        out["image_labels"] = torch.as_tensor(bench.labels, dtype=torch.long)
        if bench.query is not None and bench.gallery is not None:
            out["query_indices"] = torch.as_tensor(bench.query, dtype=torch.long)
            out["gallery_indices"] = torch.as_tensor(bench.gallery, dtype=torch.long)
    elif images:
        paths = _image_list(images)
    else:
        raise ValueError("nothing to encode: pass --benchmark NAME --root DIR, or --images DIR|LIST")
    encoder = image_encoder(args.model, heads=args.heads, weights=args.weights)
    out["image"] = encode_images(encoder, paths, batch_size=args.batch_size, progress=not args.no_progress)
    return out


def run(args) -> int:
    from softalign.io import atomic_write

    out_path = Path(args.out)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: expected a .safetensors file name")
    data = encode_from_args(args, images=args.images)

    def write(tmp):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, write)
    print(f"wrote {out_path}: {data['image'].shape[0]} x {data['image'].shape[1]} image embeddings"
          + (", labels" if "image_labels" in data else ""))
    return 0
