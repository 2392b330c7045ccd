"""softalign eval: retrieval metrics from saved embeddings.

    softalign eval --embeddings emb.safetensors [--protocol plain|coco1k|coco5k|coco|f30k]
                   [--labels labels.safetensors] [--ks 1 5 10] [--chunk-size 512] --out DIR
    softalign eval --image-emb img.npy --text-emb txt.npy --captions-per-image 5 --out DIR
    softalign eval --model RUN_DIR|open_clip:<arch>[/<pretrained>]|timm:<name>|st:<name> --benchmark sop --root DATA --out DIR

The safetensors file holds "image" [Ni, D], "text" [Nt, D], "caption_to_image" [Nt] int64 and
optionally "image_labels" [Ni] / "text_labels" [Nt] (uni-modal i2i / t2t metrics). Writes
DIR/metrics.json, DIR/metrics.md and DIR/recall_at_k.png.

COCO 5K with extended positives (false negatives of COCO's five captions; ECCV Caption, CxC):
    softalign eval --embeddings emb.safetensors --protocol coco5k --positives eccv cxc --out DIR

Protocols (--protocol):
  plain   the embeddings as given, evaluated at once (any size)
  coco1k  MS-COCO 1K: mean over 5 folds of 1,000 consecutive images and their captions (needs the
          5,000-image Karpathy test split)
  coco5k  MS-COCO 5K: all 5,000 images x their captions at once (needs 5,000 images)
  coco    both coco1k and coco5k (keys prefixed coco1k/ and coco5k/; needs 5,000 images)
  f30k    Flickr30K 1K test split (needs 1,000 images)
The recall@K curve (metrics.json "recall_curve", recall_at_k.png) is measured the same way: the fold
mean for coco1k, the whole gallery otherwise; its "gallery" entry says which.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)

__all__ = ["add_subcommand", "run", "load_inputs", "evaluate_inputs"]


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="cross-modal (i2t/t2i) and uni-modal retrieval metrics from embeddings",
        description=__doc__.replace("softalign eval: retrieval", "Retrieval", 1),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    from softalign.commands.encode import add_model_arguments

    src = p.add_argument_group("inputs (--embeddings, --image-emb/--text-emb, or --model with --benchmark)")
    src.add_argument(
        "--embeddings", help="safetensors with image, text, caption_to_image[, image_labels, text_labels]"
    )
    src.add_argument("--image-emb", help=".npy [Ni, D] image embeddings")
    src.add_argument("--text-emb", help=".npy [Nt, D] text embeddings")
    src.add_argument("--captions-per-image", type=int, help="captions k*N..k*N+N-1 belong to image k")
    src.add_argument("--caption-to-image", help=".npy [Nt] int image index of each caption")
    src.add_argument(
        "--labels",
        help="labels (integers or names) overriding the embeddings file's: .npz / .safetensors "
        "with image_labels and/or text_labels, or one label per image (.txt lines, .json "
        "list, .npy); the captions then take their image's label",
    )
    p.add_argument(
        "--protocol",
        default="plain",
        choices=["plain", "coco1k", "coco5k", "coco", "f30k"],
        help="test protocol (default plain: the embeddings as given). coco1k = mean over 5 folds of "
        "1K images, needs the 5000-image COCO test split; coco5k = all 5000 images at once; coco = both; "
        "f30k = Flickr30K 1K test, needs 1000 images",
    )
    p.add_argument(
        "--positives",
        nargs="+",
        choices=["eccv", "cxc", "original"],
        default=None,
        help="COCO 5K with extended positives (needs --protocol coco5k or coco and the 5,000-image Karpathy "
        "test split; the eccv-caption package's annotations): eccv = ECCV Caption mAP@R, R-Precision, "
        "R@1 (Chun et al., ECCV 2022); cxc = CxC R@K (Parekh et al., EACL 2021); original = COCO's "
        "five captions, for comparison. Rows follow the Karpathy order unless the embeddings file "
        "holds coco_caption_ids / coco_image_ids (the COCO id of each text / image row)",
    )
    p.add_argument(
        "--row-order",
        choices=["karpathy"],
        default=None,
        help="with --positives and a file without coco_caption_ids / coco_image_ids: state that caption "
        "row i is COCO caption coco_test_ids.npy[i] (the Karpathy 5K order, 5 consecutive captions "
        "per image). `--model ... --karpathy` encodes in that order by itself",
    )
    uni = p.add_argument_group("universal retrieval (CUSA's layout: --model with --universal)")
    uni.add_argument(
        "--universal",
        action="store_true",
        help="report the model's uni-modal scores as CUSA does: image->image R@1 on each --dml "
        "benchmark, STS Spearman on each --sts set, and their averages; for a softalign run both "
        "USA's heads (uni) and the joint space (cross), side by side -> universal.json, .md, .png",
    )
    uni.add_argument(
        "--dml",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="DML benchmarks for --universal, e.g. sop=data/Stanford_Online_Products cub=data/CUB_200_2011 "
        "(names: cub, cars, sop, inshop, inaturalist)",
    )
    uni.add_argument(
        "--sts",
        nargs="+",
        default=[],
        metavar="SET",
        help="STS sets for --universal: a local .csv/.tsv/.jsonl/.json/.parquet with the columns "
        "sentence1, sentence2, score, or a Hub set (stsb, sts12 .. sts16, sickr, or a Hub id; "
        "needs internet)",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs (default 1 5 10)")
    p.add_argument("--chunk-size", type=int, default=512, help="images per score tile (memory bound)")
    p.add_argument("--no-normalize", action="store_true", help="use raw dot products instead of cosine")
    p.add_argument("--no-plot", action="store_true", help="skip recall_at_k.png")
    p.add_argument(
        "--title",
        default="softalign eval",
        help="heading of metrics.md and title of recall_at_k.png (default 'softalign eval')",
    )
    p.add_argument("--out", required=True, help="output directory")
    add_model_arguments(p)


def _load_array(path: str, flag: str):
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # pickled, truncated or not a .npy at all
        raise ValueError(f"{flag} {path}: not a plain .npy array ({str(err).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{flag} {path}: expected one .npy array, got an .npz archive")
    return torch.from_numpy(arr)


def _load_mapping(path: str, flag: str) -> dict[str, Any]:
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: file not found")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{flag} {path}: not a readable .npz archive ({str(err).splitlines()[0]})") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data: dict[str, Any] = load_file(path)
        from safetensors import safe_open

        with safe_open(path, "pt") as f:  # softalign encode --karpathy states the row order in the metadata
            if (f.metadata() or {}).get("row_order") == "karpathy":
                data["row_order"] = "karpathy"
        return data
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{flag} {path}: not a safetensors file ({str(err).splitlines()[0]}); write it with "
            "safetensors.torch.save_file({'image': ..., 'text': ..., 'caption_to_image': ...})"
        ) from None


def check_inputs(data: dict[str, Any], source: str) -> None:
    """Shapes, dtypes and maps of the evaluation inputs; every error names the key and ``source``."""
    import torch

    for key in ("image", "text"):
        t = data[key]
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{source}: {key!r} must be a non-empty [N, D] matrix, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{source}: {key!r} must hold floating-point embeddings, got {t.dtype}")
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"{source}: {key!r} row {int((~finite).nonzero()[0])} holds NaN/inf")
    n_img, n_txt = data["image"].shape[0], data["text"].shape[0]
    if data["image"].shape[1] != data["text"].shape[1]:
        raise ValueError(
            f"{source}: 'image' is {data['image'].shape[1]}-d but 'text' is {data['text'].shape[1]}-d; "
            "both must live in one joint space"
        )
    from softalign.ids import check_caption_to_image

    try:
        data["caption_to_image"] = check_caption_to_image(
            data["caption_to_image"], n_txt, n_img, every_image_captioned=True
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    for key, n in (("image_labels", n_img), ("text_labels", n_txt)):
        if key in data:
            t = data[key]
            if t.dim() != 1 or t.shape[0] != n or t.is_floating_point():
                raise ValueError(
                    f"{source}: {key!r} must be {n} integer labels, got {t.dtype} of shape {tuple(t.shape)}"
                )
    for key, ref in (("image_uni", "image"), ("text_uni", "text")):
        if key in data and (data[key].dim() != 2 or data[key].shape[0] != data[ref].shape[0]):
            raise ValueError(
                f"{source}: {key!r} must have one row per {ref!r} row ({data[ref].shape[0]}), got shape "
                f"{tuple(data[key].shape)}"
            )


def check_one_modality(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A one-modality input: ``image`` [N, D] with ``image_labels`` [N] (a DML benchmark; optional
    ``query_indices`` / ``gallery_indices``), or ``text`` [N, D] with ``text_labels`` [N] (text-text retrieval);
    every error names the key and ``source``."""
    import torch

    key = "image" if "image" in data else "text"
    emb = data[key]
    if emb.dim() != 2 or emb.shape[0] == 0 or not emb.is_floating_point():
        raise ValueError(
            f"{source}: {key!r} must be a non-empty floating-point [N, D] matrix, got {tuple(emb.shape)} {emb.dtype}"
        )
    finite = torch.isfinite(emb).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{source}: {key!r} row {int((~finite).nonzero()[0])} holds NaN/inf")
    other = "text" if key == "image" else "image"
    if f"{key}_labels" not in data:
        raise ValueError(
            f"{source}: no {other!r} and no '{key}_labels': a one-modality file is evaluated by its "
            "labels (uni-modal retrieval)"
        )
    labels = torch.as_tensor(data[f"{key}_labels"])
    if labels.shape != (emb.shape[0],):
        raise ValueError(f"{source}: '{key}_labels' has shape {tuple(labels.shape)}, expected ({emb.shape[0]},)")
    data[f"{key}_labels"] = labels
    if ("query_indices" in data) != ("gallery_indices" in data):
        raise ValueError(f"{source}: give both 'query_indices' and 'gallery_indices' (query vs gallery), or neither")
    for name in ("query_indices", "gallery_indices"):
        if name in data:
            idx = torch.as_tensor(data[name]).long()
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= emb.shape[0]:
                raise ValueError(f"{source}: '{name}' must hold row indices in [0, {emb.shape[0]})")
            data[name] = idx
    return data


def _positives(args, data: dict[str, Any]) -> None:
    if getattr(args, "positives", None):
        named = f"--positives {' '.join(args.positives)}"
        if args.protocol not in ("coco5k", "coco"):
            raise ValueError(
                f"{named}: extended positives are for COCO 5K; add --protocol coco5k (got --protocol {args.protocol})"
            )
        has_ids = "coco_caption_ids" in data and "coco_image_ids" in data
        if not has_ids and getattr(args, "row_order", None) != "karpathy" and data.get("row_order") != "karpathy":
            raise ValueError(
                f"{named}: the rows carry no COCO ids (coco_caption_ids / coco_image_ids), so nothing "
                "shows which caption each text row is; rows in another order (e.g. sorted by COCO id) "
                "would be scored against the wrong positives. Store the ids in the file, or pass "
                "--row-order karpathy if the rows follow the Karpathy 5K test order"
            )
        data["positives"] = list(args.positives)


def load_inputs(args) -> dict[str, Any]:
    """Read the CLI inputs into {"image", "text", "caption_to_image", "image_labels"?, "text_labels"?}, or an
    image-only {"image", "image_labels", "query_indices"?, "gallery_indices"?} (``--model --benchmark``, or an
    embeddings file without "text")."""
    import torch

    if getattr(args, "model", None):
        if args.embeddings or args.image_emb or args.text_emb:
            raise ValueError("pass either --model (with --benchmark and --root) or embeddings, not both")
        from softalign.commands.encode import encode_from_args

        data = encode_from_args(args)
        if "text" not in data or "image" not in data:
            return check_one_modality(data, f"--model {args.model}")
        _positives(args, data)
        check_inputs(data, f"--model {args.model}")
        return data
    if args.embeddings:
        if args.image_emb or args.text_emb:
            raise ValueError("pass either --embeddings or --image-emb/--text-emb, not both")
        data = _load_mapping(args.embeddings, "--embeddings")
        if ("image" in data) != ("text" in data) and ("image_labels" in data or "text_labels" in data):
            return check_one_modality(data, f"--embeddings {args.embeddings}")
        missing = [k for k in ("image", "text") if k not in data]
        if missing:
            raise ValueError(
                f"--embeddings {args.embeddings}: missing key(s) {missing} (it has {sorted(data)}); "
                "expected 'image', 'text', 'caption_to_image'"
            )
        source = f"--embeddings {args.embeddings}"
    else:
        if not (args.image_emb and args.text_emb):
            raise ValueError("pass --embeddings FILE.safetensors, or both --image-emb and --text-emb (.npy)")
        data = {"image": _load_array(args.image_emb, "--image-emb"), "text": _load_array(args.text_emb, "--text-emb")}
        source = f"--image-emb {args.image_emb} / --text-emb {args.text_emb}"
    n_img, n_txt = data["image"].shape[0], data["text"].shape[0]
    if args.caption_to_image:
        data["caption_to_image"] = _load_array(args.caption_to_image, "--caption-to-image")
    elif args.captions_per_image is not None:
        n = args.captions_per_image
        if n < 1 or n_txt != n * n_img:
            raise ValueError(
                f"--captions-per-image {n}: {n_img} images x {n} = {n * n_img} captions expected, got {n_txt}"
            )
        data["caption_to_image"] = torch.arange(n_img).repeat_interleave(n)
    if "caption_to_image" not in data:
        raise ValueError(
            "no caption_to_image: store it in the embeddings file or pass --captions-per-image / --caption-to-image"
        )
    if args.labels:  # integers or names, in any of the label formats (softalign.labels)
        from softalign.labels import read_label_file

        data.update({k: torch.from_numpy(v) for k, v in read_label_file(args.labels, "--labels").items()})
        if "image_labels" in data and "text_labels" not in data and data["image_labels"].shape[0] == n_img:
            data["text_labels"] = data["image_labels"][torch.as_tensor(data["caption_to_image"]).long()]
    _positives(args, data)
    check_inputs(data, source)
    return data


def evaluate_inputs(
    data: dict[str, Any], protocol: str = "plain", ks=(1, 5, 10), chunk_size=512, normalize=True
) -> dict[str, Any]:
    import torch

    from softalign.eval.crossmodal import recall_curve
    from softalign.eval.protocols import protocol_recall_curve
    from softalign.eval.recall import cross_modal_recall
    from softalign.eval.unimodal import uni_modal_metrics

    if "text" not in data or "image" not in data:
        return _evaluate_one_modality(data, normalize)
    img, txt = data["image"].float(), data["text"].float()
    if normalize:
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    c2i = data["caption_to_image"]
    metrics: dict[str, Any] = {"protocol": protocol, "num_images": img.shape[0], "num_captions": txt.shape[0]}
    if protocol == "plain":
        m = cross_modal_recall(
            image_emb=img, text_emb=txt, caption_to_image=c2i, ks=ks, chunk_size=chunk_size, return_ranks=True
        )
        i2t, t2i = m.pop("i2t_ranks"), m.pop("t2i_ranks")
        ck = [k for k in CURVE_KS if k <= max(img.shape[0], txt.shape[0])]
        curve = {
            "k": ck,
            "i2t": recall_curve(i2t, ck),
            "t2i": recall_curve(t2i, ck),
            "gallery": f"all {img.shape[0]} images x {txt.shape[0]} captions (plain)",
        }
    else:
        m = cross_modal_recall(
            image_emb=img, text_emb=txt, caption_to_image=c2i, protocol=protocol, ks=ks, chunk_size=chunk_size
        )
        # measured like the metrics: the fold mean for coco1k, not the whole 5K gallery
        curve = protocol_recall_curve(protocol, img, txt, c2i, CURVE_KS, chunk_size=chunk_size)
    metrics.update(m)
    metrics["recall_curve"] = curve

    def skipped(prefix, labels):  # a small test split: the cross-modal metrics still stand
        key = "image_labels" if prefix == "i2i_" else "text_labels"
        print(
            f"softalign eval: {prefix[:-1]} skipped: every one of {len(labels)} {key} occurs once "
            "(leave-one-out retrieval needs a label shared by >= 2 items)",
            file=sys.stderr,
        )

    # i2i_* / t2t_* on USA's heads (image_uni / text_uni) when the file has them, *_xm_* on the joint embeddings
    metrics.update(
        uni_modal_metrics(
            img,
            txt,
            data.get("image_labels"),
            data.get("text_labels"),
            data.get("image_uni"),
            data.get("text_uni"),
            skipped=skipped,
        )
    )
    if data.get("positives"):
        from softalign.eval.extended_positives import extended_positive_metrics

        metrics.update(
            extended_positive_metrics(
                img,
                txt,
                positives=data["positives"],
                ks=ks,
                caption_ids=data.get("coco_caption_ids"),
                image_ids=data.get("coco_image_ids"),
                caption_to_image=c2i,
                chunk_size=chunk_size,
                normalize=normalize,
            )
        )
    return metrics


def _evaluate_one_modality(data: dict[str, Any], normalize: bool) -> dict[str, Any]:
    """DML metrics of a one-modality input: R@1/2/4/8, MAP@R, R-Precision (query vs gallery when given, else
    leave-one-out), through pytorch-metric-learning's AccuracyCalculator (percent); ``i2i_*`` for images,
    ``t2t_*`` for captions."""
    from softalign.eval.unimodal import unimodal_retrieval

    key, prefix = ("image", "i2i_") if "image" in data else ("text", "t2t_")
    emb, labels = data[key].float(), data[f"{key}_labels"]
    if normalize:
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    metrics: dict[str, Any] = {
        "protocol": "unimodal",
        f"num_{'images' if key == 'image' else 'captions'}": emb.shape[0],
    }
    if "query_indices" in data:
        q, g = data["query_indices"], data["gallery_indices"]
        metrics["num_gallery"] = int(g.numel())
        metrics.update(unimodal_retrieval(emb[q], labels[q], gallery=emb[g], gallery_labels=labels[g], prefix=prefix))
    else:
        metrics.update(unimodal_retrieval(emb, labels, prefix=prefix))
    return metrics


def run(args) -> int:
    from softalign.eval.report import write_report

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(
            f"--out {args.out}: is a file; --out names the directory for metrics.json, metrics.md and recall_at_k.png"
        )
    if any(k < 1 for k in args.ks):
        raise ValueError(f"--ks must be positive recall cut-offs, got {args.ks}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be a positive number of images, got {args.chunk_size}")
    if args.universal or args.dml or args.sts:
        return _run_universal(args)
    data = load_inputs(args)
    metrics = evaluate_inputs(data, args.protocol, tuple(args.ks), args.chunk_size, not args.no_normalize)
    paths = write_report(metrics, args.out, title=args.title, plot=not args.no_plot and "recall_curve" in metrics)
    from softalign.eval.report import markdown_table

    print(markdown_table(metrics, title=args.title))
    print("wrote " + ", ".join(paths.values()))
    return 0


def _run_universal(args) -> int:
    from softalign.commands.universal import universal_report
    from softalign.eval.universal import parse_dml, universal_table, write_universal_report

    if not args.universal:
        raise ValueError("--dml / --sts are the inputs of the universal report: add --universal")
    if not args.model:
        raise ValueError("--universal evaluates a model: pass --model RUN_DIR|open_clip:<arch>|st:<name>|timm:<name>")
    if args.embeddings or args.image_emb or args.text_emb or args.benchmark:
        raise ValueError("--universal takes its benchmarks from --dml and --sts, not --embeddings / --benchmark")
    report = universal_report(
        args.model,
        parse_dml(args.dml),
        args.sts,
        weights=args.weights,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    title = args.title if args.title != "softalign eval" else "softalign universal retrieval"
    paths = write_universal_report(report, args.out, title=title, plot=not args.no_plot)
    print(universal_table(report))
    print("wrote " + ", ".join(paths.values()))
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m softalign.commands.eval``); ``softalign eval`` is the usual way."""
    p = argparse.ArgumentParser(prog="softalign eval")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
