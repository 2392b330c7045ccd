"""softalign encode: a model -> an embeddings file for ``softalign eval``.

    softalign encode --model runs/sop_student --benchmark sop --root data/Stanford_Online_Products --out sop.safetensors
    softalign encode --model open_clip:ViT-B-32/openai --benchmark inshop --root data/inshop --out inshop.safetensors
    softalign encode --model timm:convnext_tiny --weights convnext_tiny.safetensors --images photos/ --out photos.safetensors
    softalign encode --model runs/coco_clip --karpathy dataset_coco.json --image-root coco/ --split test --out coco5k.safetensors
    softalign encode --model st:all-MiniLM-L6-v2 --captions captions.txt --caption-labels labels.txt --out t2t.safetensors

``--model``: a ``softalign train`` output directory (or one of its checkpoints), ``open_clip:<arch>[/<pretrained>]``,
``timm:<name>`` or ``st:<sentence-transformers name or path>``; see :mod:`softalign.commands.encoders`. The file holds ``image`` [N, D] (L2-normalised) and, for a
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
    g.add_argument(
        "--model",
        help="softalign train output directory (or one of its checkpoints), "
        "open_clip:<arch>[/<pretrained>], timm:<name> or st:<sentence-transformers "
        "name or path>",
    )
    g.add_argument("--weights", default=None, help="local weights file for a timm:<name> model")
    g.add_argument(
        "--heads",
        choices=("cross", "uni"),
        default="cross",
        help="softalign runs: the joint embeddings (cross, default) or USA's uni-modal heads (uni)",
    )
    g.add_argument(
        "--benchmark",
        choices=("cub", "cars", "sop", "inshop", "inaturalist"),
        default=None,
        help="encode a DML benchmark's evaluation split (with --root: the data set's own folder)",
    )
    g.add_argument("--root", default=None, help="the benchmark's folder, as downloaded")
    g.add_argument(
        "--karpathy",
        default=None,
        help="a Karpathy-split JSON (with --image-root and --split): encode "
        "its images and captions, for cross-modal evaluation",
    )
    g.add_argument("--image-root", default=None, help="the images of --karpathy")
    g.add_argument("--split", default="test", help="the --karpathy split (default test)")
    g.add_argument("--images", default=None, help="a folder of images, or a text file with one image path per line")
    g.add_argument(
        "--captions",
        default=None,
        help="a text file, one caption per line (with --images and "
        "--captions-per-image: captions k*N .. k*N+N-1 describe image k)",
    )
    g.add_argument(
        "--caption-labels",
        default=None,
        help="with --captions alone: one label per line (text-text retrieval of the captions)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode",
        help="embed images with a trained model, for softalign eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--captions-per-image", type=int, default=None, help="with --captions: captions per image")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=run)
    return p


def _lines(path: str, flag: str) -> list[str]:
    from softalign.io import read_lines

    return read_lines(path, f"{flag} file")


def _image_list(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return files
    if path.is_file():
        lines = _lines(spec, "--images")
        missing = next((ln for ln in lines if not Path(ln).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"--images {spec}: listed image {missing} does not exist")
        return lines
    raise FileNotFoundError(f"--images {spec}: no such folder or list file")


def encode_from_args(args) -> dict[str, Any]:
    """The embeddings (and benchmark labels / query-gallery indices) that ``args`` ask for."""
    import torch

    from softalign.commands.encoders import check_model_spec, encode_images, encode_texts, load_encoders

    if not args.model:
        raise ValueError(
            "--model is required (a softalign train output directory, open_clip:<arch>[/<pretrained>] or timm:<name>)"
        )
    check_model_spec(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    out: dict[str, Any] = {}
    captions: list[str] | None = None
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
    elif getattr(args, "karpathy", None):
        from softalign.data.karpathy import load_karpathy

        if not args.image_root:
            raise ValueError(f"--karpathy {args.karpathy} needs --image-root (the folder of its images)")
        split = load_karpathy(args.karpathy, args.image_root, args.split, captions_per_image=None)
        paths, captions = list(split.images), list(split.captions)
        out["caption_to_image"] = torch.as_tensor(split.caption_to_image, dtype=torch.long)
        out["row_order"] = "karpathy"  # rows as the Karpathy JSON lists them (checked by --positives)
    elif args.images:
        paths = _image_list(args.images)
    elif getattr(args, "captions", None):  # captions alone: text-text retrieval by their labels
        return _captions_only(args)
    else:
        raise ValueError(
            "nothing to encode: pass --benchmark NAME --root DIR, --karpathy JSON --image-root DIR, "
            "--images DIR|LIST, or --captions FILE"
        )
    if captions is None and getattr(args, "captions", None):
        captions, out["caption_to_image"] = _captions(args, len(paths))
    encode_image, encode_text = load_encoders(args.model, heads=args.heads, weights=args.weights)
    if captions is not None and encode_text is None:
        raise ValueError(f"--model {args.model} is an image model (no text tower): it cannot encode captions")
    out["image"] = encode_images(encode_image, paths, batch_size=args.batch_size, progress=not args.no_progress)
    if captions is not None:
        assert encode_text is not None
        out["text"] = encode_texts(encode_text, captions, progress=not args.no_progress)
    return out


def _captions_only(args) -> dict[str, Any]:
    import torch

    from softalign.commands.encoders import encode_texts, load_encoders

    captions = _lines(args.captions, "--captions")
    out: dict[str, Any] = {}
    if args.caption_labels:
        labels = _lines(args.caption_labels, "--caption-labels")
        if len(labels) != len(captions):
            raise ValueError(
                f"--caption-labels {args.caption_labels}: {len(labels)} labels for {len(captions)} captions"
            )
        codes = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
        out["text_labels"] = torch.tensor([codes[lab] for lab in labels], dtype=torch.long)
    _, encode_text = load_encoders(args.model, heads=args.heads, weights=args.weights)
    if encode_text is None:
        raise ValueError(f"--model {args.model} is an image model (no text tower): it cannot encode captions")
    out["text"] = encode_texts(encode_text, captions, progress=not args.no_progress)
    return out


def _captions(args, n_images: int):
    import torch

    captions = _lines(args.captions, "--captions")
    k = args.captions_per_image
    if k is None or k < 1 or len(captions) != k * n_images:
        raise ValueError(
            f"--captions {args.captions}: {len(captions)} captions for {n_images} images; pass "
            f"--captions-per-image K with K x {n_images} captions (got K = {k})"
        )
    return captions, torch.arange(n_images).repeat_interleave(k)


def run(args) -> int:
    from softalign.io import atomic_write

    out_path = Path(args.out)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: expected a .safetensors file name")
    data = encode_from_args(args)

    def write(tmp):
        from safetensors.torch import save_file

        meta = {k: v for k, v in data.items() if isinstance(v, str)}  # row_order: safetensors metadata
        save_file(
            {k: v.contiguous() for k, v in data.items() if not isinstance(v, str)}, str(tmp), metadata=meta or None
        )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, write)
    parts = [f"{data[k].shape[0]} x {data[k].shape[1]} {k} embeddings" for k in ("image", "text") if k in data]
    print(
        f"wrote {out_path}: {', '.join(parts)}"
        + (", labels" if "image_labels" in data or "text_labels" in data else "")
    )
    return 0
