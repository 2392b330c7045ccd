"""``softalign cache``: build, import and inspect teacher-similarity caches.

softalign cache build --captions captions.json --images images/ --out cache/coco
softalign cache import-npy --image-features train_unicom.npy --captions train.json --out cache/coco
softalign cache info cache/coco
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from softalign.io import read_json, read_text

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

_CAPTION_FORMATS = """\
caption file formats (--captions):
  .txt   one caption per line; caption id = line number (0-based). Give the images of the
         captions with --caption-to-image or --captions-per-image.
  .json  a list of strings (like .txt), or a list of records, e.g. CUSA/ALBEF's train.json:
           [{"caption": "A man on a moped.", "image": "train2014/COCO_train2014_000000000009.jpg"}, ...]
         The caption is the record's --caption-column (default "caption"), the image its
         --image-column (default "image"; for import-npy "image_id"); nothing is guessed, a record
         without them is refused naming the flag. An optional "id" per record must be unique.
  .jsonl / .csv / .tsv / .parquet   a table, one row per caption, read with datasets.load_dataset;
         the same --caption-column / --image-column name its columns.
         build: records name image files (paths under --images DIR); images are numbered in order
           of first appearance. An integer image reference (e.g. COCO's "image_id": 9) cannot name
           a file and is refused with --images DIR; with an explicit image list (--images
           list.txt / list.json / the files) an integer is the 0-based position in that list.
         import-npy: with CUSA's {image_id: array(1, D)} dict, every reference is a key of the dict,
           integers included ("image_id": 25 is the entry under key 25, never row 25); "25" and 25
           match each other. With a plain matrix an integer reference is a row index.
         A dict {"captions": [...], "caption_to_image": [...], "images": [...]} works as well.

caption->image map (--caption-to-image): .txt (one image index per line), .json list or .npy.
--captions-per-image K: caption i belongs to image i // K (COCO / Flickr30K with 5 captions each).
Image indices count from 0 in this order: for build, the image list as given, or with --images DIR
the image files under DIR sorted by relative path; for import-npy, the matrix rows, or the dict's
keys in --image-keys order (else the dict's own order).
"""


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache",
        help="build, import and inspect teacher-similarity caches",
        description="Teacher embeddings of every caption and image, computed once and looked up by caption id "
        "during training (safetensors + manifest.json). Start with `softalign cache build --help`.",
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    sub = parser.add_subparsers(
        dest="cache_command", metavar="{build,build-teran,import-npy,precomp-images,info,inspect}"
    )

    b = sub.add_parser(
        "build",
        help="encode captions and images with the teachers into a cache directory",
        description="Encode every caption with a text teacher and every image with an image teacher, in "
        "resumable chunks: if the build is interrupted, run the same command again and it continues. "
        "Offline defaults: text 'offline-minilm' (all-MiniLM-L6-v2, 384-d), image "
        "'offline-efficientnet-lite0' (1280-d). Run under `accelerate launch -m softalign cache build ...` to share the work across "
        "processes/GPUs.",
        epilog=_CAPTION_FORMATS
        + """
examples:
  softalign cache build --captions train.json --images /data/coco/images --out cache/coco_train
  softalign cache build --captions caps.txt --captions-per-image 5 --images imgs.txt --out cache/f30k \\
      --text-teacher sentence-transformers/all-mpnet-base-v2 --image-teacher timm:convnext_tiny
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_dataset_args(b, images_required=True)
    _add_teacher_args(b)
    _add_output_args(b)
    b.set_defaults(func=run_build)

    t = sub.add_parser(
        "build-teran",
        help="build the cache of TERAN's training split, in TERAN's caption order",
        description="mesnico/TERAN numbers its training captions itself (its data.py): for COCO, the annotation ids "
        "of coco_train_ids.npy (+ coco_restval_ids.npy) in captions_train2014.json / captions_val2014.json, which are "
        "not grouped by image; for Flickr30k, the sentences of the 'train' images of dataset_flickr30k.json. This "
        "command reads those files from TERAN's data directory and builds the cache with caption i = TERAN's id i "
        "and the right caption->image map (softalign.data.teran).",
        epilog="""
examples (the values of TERAN's config: dataset.data, dataset.name, dataset.images-path, dataset.restval):
  softalign cache build-teran --data data --dataset coco --images-path data/coco/images --out cache/teran_coco
  softalign cache build-teran --data data --dataset f30k --images-path data/f30k/images --out cache/teran_f30k
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--data", required=True, metavar="DIR", help="TERAN's dataset.data (holds coco/ or f30k/annotations)"
    )
    t.add_argument("--dataset", required=True, choices=("coco", "f30k"), help="TERAN's dataset.name")
    t.add_argument(
        "--images-path",
        required=True,
        metavar="DIR",
        help="TERAN's dataset.images-path (COCO: holds train2014/ and val2014/)",
    )
    t.add_argument(
        "--no-restval", action="store_true", help="COCO: leave out the restval part (TERAN's dataset.restval: False)"
    )
    _add_teacher_args(t)
    _add_output_args(t)
    t.set_defaults(func=run_build_teran)

    pi = sub.add_parser(
        "precomp-images",
        help="list the raw images of a VSE++/SCAN precomp split in train_ims.npy row order",
        description="The precomp folders hold features, not images; the image teacher needs the images in the order "
        "of the feature rows. {split}_ids.txt (shipped with the features) names the image of each row (one line per "
        "image, or one per caption); this writes one image path per line, for `softalign cache build --images "
        "LIST.txt` (softalign.data.precomp_images).",
        epilog="""
examples:
  softalign cache precomp-images --ids data/coco_precomp/train_ids.txt --ims data/coco_precomp/train_ims.npy \
      --coco-annotations annotations/captions_train2014.json annotations/captions_val2014.json \
      --images-root /data/coco --out coco_train_images.txt
  softalign cache precomp-images --ids data/f30k_precomp/train_ids.txt --pattern "{id}.jpg" \
      --images-root /data/flickr30k-images --out f30k_train_images.txt
  softalign cache build --captions data/coco_precomp/train_caps.txt --captions-per-image 5 \
      --images coco_train_images.txt --out cache/coco_train
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pi.add_argument("--ids", required=True, metavar="FILE", help="the split's {split}_ids.txt")
    pi.add_argument("--ims", default=None, metavar="FILE.npy", help="the split's {split}_ims.npy, to check the count")
    pi.add_argument("--images-root", required=True, metavar="DIR", help="where the raw images are")
    pi.add_argument(
        "--coco-annotations",
        nargs="+",
        default=[],
        metavar="JSON",
        help="COCO json files whose 'images' list maps image ids to file names",
    )
    pi.add_argument("--pattern", default=None, help="file name of an id, e.g. '{id}.jpg' (Flickr30k)")
    pi.add_argument("--captions-per-image", type=int, default=5, help="captions per image (default 5)")
    pi.add_argument("--out", required=True, metavar="FILE", help="image list to write (.txt, one path per line)")
    pi.set_defaults(func=run_precomp_images)

    m = sub.add_parser(
        "import-npy",
        help="turn existing teacher features (.npy) into a cache",
        description="Import image-teacher features from a .npy file: a plain matrix [num_images, D] (row i = "
        "image i) or CUSA's pickled {image_id: array(1, D)} dict. Text features come from --text-features "
        "(a [num_captions, D] .npy matrix) or are computed from --captions with --text-teacher. "
        "Pickled files can run code when loaded, so they need --allow-pickle: use it only for files you trust. "
        "Region features [N, regions, D] need --pool mean|max.",
        epilog=_CAPTION_FORMATS
        + """
with CUSA's dict, records' "image_id" (or "image") must be keys of the dict; images are numbered in
the order given by --image-keys (a .txt/.json list of keys), else the order of the dict.

examples:
  softalign cache import-npy --image-features coco_train_unicom.npy --captions train.json --out cache/coco
  softalign cache import-npy --image-features img.npy --text-features txt.npy --captions-per-image 5 --out c/
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--image-features", required=True, metavar="FILE.npy", help="image features (.npy)")
    m.add_argument(
        "--text-features",
        default=None,
        metavar="FILE.npy",
        help="text features [num_captions, D] (.npy); otherwise --captions are encoded",
    )
    m.add_argument(
        "--image-keys",
        default=None,
        metavar="FILE",
        help="order of the dict's image ids (.txt one per line, or .json list)",
    )
    _add_dataset_args(m, images_required=False)
    m.add_argument(
        "--text-teacher", default="offline-minilm", help="text teacher for --captions (default offline-minilm)"
    )
    m.add_argument(
        "--image-teacher-name",
        default=None,
        help="name recorded for the imported image features (default imported:<file name>)",
    )
    m.add_argument("--text-teacher-name", default=None, help="name recorded for --text-features")
    m.add_argument("--device", default=None, help="device for the text teacher")
    m.add_argument(
        "--pool",
        choices=("mean", "max"),
        default=None,
        help="pool region features [num_images, regions, D] (SCAN / bottom-up attention, e.g. "
        "[N, 36, 2048]) to one row per image: the mean or the element-wise max over the regions",
    )
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a pickled .npy (CUSA's {image_id: array(1, D)} dict). Off by default: unpickling "
        "can run code from the file, so use it only for files you trust",
    )
    _add_output_args(m)
    m.set_defaults(func=run_import)

    i = sub.add_parser(
        "info",
        help="summarise a cache directory (teachers, sizes, fingerprint)",
        description="Print what a cache holds and check that it is complete and readable.",
    )
    i.add_argument("cache_dir", metavar="DIR", help="cache directory (holds manifest.json)")
    i.add_argument("--json", action="store_true", help="print the manifest (without the caption->image map) as JSON")
    i.set_defaults(func=run_info)

    q = sub.add_parser(
        "inspect",
        help="soft-label diagnostics of a cache at a batch size: entropy, diagonal / same-label mass, "
        "calibrated tau_s",
        description="Check a teacher before training: on random batches of --batch-size (one caption per image) "
        "prints, for the image-image and text-text teacher matrices, what softmax(T / tau_s) looks like "
        "at several tau_s (normalised entropy, mass on the pair itself, share of the other mass on "
        "items of the same label) and the tau_s that teacher_temperature='auto' calibrates.",
    )
    q.add_argument("cache_dir", metavar="DIR", help="cache directory (holds manifest.json)")
    q.add_argument("--batch-size", type=int, default=128, help="training batch size (global batch under gather)")
    q.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="optional image labels: a text file with one label per image, in the cache's image order "
        "(any strings); adds the same-label share and its chance level",
    )
    q.add_argument(
        "--taus",
        type=float,
        nargs="+",
        default=[1.0, 0.3, 0.1, 0.05],
        help="fixed soft-label temperatures to report (default: 1.0 = CUSA, 0.3, 0.1, 0.05)",
    )
    q.add_argument(
        "--entropy",
        type=float,
        default=None,
        help="target normalised entropy of the calibration (default: the library's)",
    )
    q.add_argument("--num-batches", type=int, default=16, help="random batches to average over")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print the rows as JSON")
    q.set_defaults(func=run_inspect)
    return parser


def _add_teacher_args(b) -> None:
    b.add_argument(
        "--text-teacher",
        default="offline-minilm",
        help="'offline-minilm' (default, packaged), or any sentence-transformers name or local path",
    )
    b.add_argument(
        "--image-teacher",
        default="offline-efficientnet-lite0",
        help="'offline-efficientnet-lite0' (default, packaged) or 'timm:<model name>'",
    )
    b.add_argument(
        "--image-weights",
        default=None,
        metavar="FILE",
        help="local weights file for a timm / EfficientNet-Lite image teacher (no download)",
    )
    b.add_argument("--batch-size", type=int, default=64, help="text teacher batch size (default 64)")
    b.add_argument("--image-batch-size", type=int, default=32, help="image teacher batch size (default 32)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    b.add_argument(
        "--image-hash",
        choices=("content", "stat"),
        default="content",
        help="how image files enter the data fingerprint: 'content' (default: SHA-256 of every file, so "
        "an image edited in place is noticed) or 'stat' (path + size: faster on slow network "
        "storage, blind to same-size edits)",
    )


def _add_dataset_args(p, images_required: bool) -> None:
    p.add_argument(
        "--captions",
        required=images_required,
        metavar="FILE",
        help="captions: .txt (one per line), .json, or a .jsonl / .csv / .tsv / .parquet table (see formats below)",
    )
    if images_required:
        p.add_argument(
            "--images",
            nargs="+",
            required=True,
            metavar="DIR|FILE",
            help="an image directory, a .txt/.json list of image paths, or the image files themselves",
        )
    p.add_argument(
        "--caption-column",
        default=DEFAULT_CAPTION_COLUMN,
        metavar="NAME",
        help=f"record field / table column holding the caption (default {DEFAULT_CAPTION_COLUMN!r})",
    )
    default_image = DEFAULT_IMAGE_COLUMN["build" if images_required else "import-npy"]
    p.add_argument(
        "--image-column",
        "--image-field",
        dest="image_column",
        default=None,
        metavar="NAME",
        help=f"record field / table column naming the image (default {default_image!r}; --image-field is "
        "the old spelling)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--caption-to-image", default=None, metavar="FILE", help="image index of each caption (.txt / .json / .npy)"
    )
    g.add_argument(
        "--captions-per-image", type=int, default=None, metavar="K", help="caption i belongs to image i // K"
    )


def _add_output_args(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory to write")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="rows per resumable chunk; bounds memory while merging (default 4096)",
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype (default float16)",
    )
    p.add_argument("--fingerprint", default=None, help="record this dataset fingerprint instead of hashing the inputs")
    p.add_argument("--overwrite", action="store_true", help="replace a cache in --out built for other inputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# ---------------------------------------------------------------------------------------------- readers
def _read_list(path: Path, flag: str = "--images") -> list:
    if path.suffix == ".json":
        data = read_json(path, flag)
        if not isinstance(data, list):
            raise ValueError(f"{flag} {path}: expected a JSON list, got a {type(data).__name__}")
        return data
    if path.suffix == ".npy":
        import numpy as np

        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path}: file not found")
        try:
            return np.load(path, allow_pickle=False).tolist()
        except ValueError as err:
            raise ValueError(f"{flag} {path}: not a plain .npy array ({err})") from None
    return read_text(path, flag).splitlines()


def _read_image_indices(path: Path, flag: str = "--caption-to-image") -> list[int]:
    """One integer image index per caption (.txt lines, .json list or .npy); a non-integer entry names its line."""
    out: list[int] = []
    for line, x in enumerate(_read_list(path, flag)):
        j = len(out)  # the caption this entry maps (blank lines name no caption)
        if isinstance(x, str):
            if not x.strip():
                continue
            try:
                x = int(x.strip())
            except ValueError:
                raise ValueError(
                    f"{flag} {path}: caption {j} (line {line + 1}) is {x.strip()!r}, not an integer image index"
                ) from None
        elif isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and x != int(x)):
            raise ValueError(f"{flag} {path}: caption {j} is {x!r}, not an integer image index")
        if x < 0:
            raise ValueError(f"{flag} {path}: caption {j} is {x}, a negative image index")
        out.append(int(x))
    return out


def _groups_map(n_captions: int, k: int, num_images: int | None) -> list[int]:
    """``--captions-per-image K``: caption i -> image i // K, refused unless the captions split evenly."""
    if k < 1:
        raise ValueError(f"--captions-per-image must be a positive integer, got {k}")
    if n_captions % k:
        raise ValueError(
            f"--captions-per-image {k} does not divide the {n_captions} captions evenly "
            f"({n_captions} = {n_captions // k} x {k} + {n_captions % k}); give --caption-to-image FILE "
            "when images have different numbers of captions"
        )
    if num_images is not None and n_captions // k != num_images:
        raise ValueError(
            f"--captions-per-image {k} pairs the {n_captions} captions with {n_captions // k} images, but "
            f"{num_images} images were given; check --captions-per-image or the image list"
        )
    return [i // k for i in range(n_captions)]


#: the columns that name a record's caption and image, unless --caption-column / --image-column say otherwise
#: (CUSA / ALBEF records: {"caption": ..., "image": "train2014/...jpg", "image_id": ...})
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_IMAGE_COLUMN = {"build": "image", "import-npy": "image_id"}
#: table formats read through datasets.load_dataset (one row per caption)
_TABLE_BUILDERS = {".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _records(rows: list, path: Path, caption_column: str, image_column: str) -> tuple[list[str], list]:
    """Captions and image references of ``rows`` (dicts), from the named columns only (no guessing)."""
    captions: list[str] = []
    refs: list = []
    ids: dict = {}
    for j, rec in enumerate(rows):
        if not isinstance(rec, dict):
            raise ValueError(
                f"--captions {path}: record {j} is a {type(rec).__name__}; expected an object with {caption_column!r}"
            )
        if caption_column not in rec:
            raise ValueError(
                f"--captions {path}: record {j} has no {caption_column!r} field (keys: {sorted(rec)}); "
                "name the caption column with --caption-column NAME"
            )
        if image_column not in rec:
            raise ValueError(
                f"--captions {path}: record {j} has no {image_column!r} field (keys: {sorted(rec)}); "
                "name the image column with --image-column NAME"
            )
        cap, ref = rec[caption_column], rec[image_column]
        if isinstance(cap, list):
            raise ValueError(f"--captions {path}: record {j} holds a list of captions; give one record per caption")
        if not isinstance(cap, str):
            raise ValueError(f"--captions {path}: record {j}'s {caption_column!r} is a {type(cap).__name__}, not text")
        if "id" in rec:
            if rec["id"] in ids:
                raise ValueError(
                    f"--captions {path}: duplicate caption id {rec['id']!r} in records {ids[rec['id']]} and {j}"
                )
            ids[rec["id"]] = j
        captions.append(cap)
        refs.append(ref)
    return captions, refs


def _read_captions(
    path: Path, caption_column: str = DEFAULT_CAPTION_COLUMN, image_column: str = DEFAULT_IMAGE_COLUMN["build"]
) -> tuple[list[str], list | None, list | None]:
    """-> captions, image references per caption (or None), explicit images list (or None).

    ``.txt``: one caption per line. ``.json``: a list of captions, a list of records, or ``{"captions": [...],
    "caption_to_image": [...], "images": [...]}``. ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet``: a table read with
    ``datasets.load_dataset``, one row per caption. Records and tables name their caption and image by the columns
    given (``--caption-column`` / ``--image-column``)."""
    builder = _TABLE_BUILDERS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--captions {path}: file not found")
        import datasets

        kw = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad file
            raise ValueError(f"--captions {path}: cannot read it as {builder} ({str(err).splitlines()[0]})") from None
        for flag, col in (("--caption-column", caption_column), ("--image-column", image_column)):
            if col not in table.column_names:
                raise ValueError(
                    f"--captions {path}: no column {col!r} (columns: {table.column_names}); name it with {flag} NAME"
                )
        captions, refs = _records(
            table.select_columns(
                [caption_column, image_column] + (["id"] if "id" in table.column_names else [])
            ).to_list(),
            path,
            caption_column,
            image_column,
        )
        return captions, refs, None
    if path.suffix != ".json":
        return read_text(path, "--captions").splitlines(), None, None
    data = read_json(path, "--captions")
    if isinstance(data, dict):
        if "captions" not in data:
            raise ValueError(f"--captions {path}: a JSON object needs a 'captions' list")
        return list(data["captions"]), data.get("caption_to_image"), data.get("images")
    if not isinstance(data, list):
        raise ValueError(f"--captions {path}: expected a JSON list of captions or records")
    if all(isinstance(x, str) for x in data):
        return data, None, None
    captions, refs = _records(data, path, caption_column, image_column)
    return captions, refs, None


def _num_rows(path) -> int:
    import numpy as np

    return int(np.load(path, mmap_mode="r").shape[0])


def _refs_to_map(refs: list) -> tuple[list, list[int]]:
    order: dict = {}
    c2i: list[int] = []
    for r in refs:
        key = r if isinstance(r, (str, int)) else str(r)
        if key not in order:
            order[key] = len(order)
        c2i.append(order[key])
    return list(order), c2i


def _list_images(spec: list[str]) -> tuple[Path | None, list[str] | None]:
    """--images -> (root directory or None, explicit list of paths or None)."""
    for x in spec:
        if not Path(x).exists():
            raise FileNotFoundError(f"--images {x}: no such file or directory")
    if len(spec) == 1:
        p = Path(spec[0])
        if p.is_dir():
            return p, None
        if p.suffix in (".txt", ".json") and p.is_file():
            items = [str(x) for x in _read_list(p, "--images")]
            while items and not items[-1].strip():  # a trailing newline or blank lines at the end shift nothing
                items.pop()
            blank = next((j for j, x in enumerate(items) if not x.strip()), None)
            if blank is not None:
                where = f"line {blank + 1}" if p.suffix == ".txt" else f"entry {blank}"
                raise ValueError(
                    f"--images {p}: {where} is blank. Images are numbered by their position in the list "
                    "(--caption-to-image, --captions-per-image, integer image references), so a skipped "
                    "blank would pair every later image with the wrong captions: remove it"
                )
            return None, [x.strip() for x in items]
    return None, list(spec)


def _int_refs_to_positions(refs: list, root: Path | None) -> list[int]:
    """build: records naming their image by an integer. Positions in an explicit image list; refused with a
    directory (a sorted listing is not a numbering anyone chose, so ids would silently pick wrong files)."""
    from softalign.teachers.importers import is_integer_ref

    j = next(j for j, r in enumerate(refs) if is_integer_ref(r))
    if root is not None:
        raise ValueError(
            f"record {j} names its image by the integer {refs[j]!r}, but --images is the directory "
            f'{root}: an integer cannot name a file there. Name the image file in the records (e.g. "image": '
            '"train2014/COCO_train2014_000000000009.jpg", or --image-column NAME), or list the images in order with '
            "--images list.txt (integers are then 0-based positions in that list), or give --caption-to-image FILE"
        )
    bad = next((k for k, r in enumerate(refs) if not is_integer_ref(r)), None)
    if bad is not None:
        raise ValueError(
            f"records mix integer and named image references (record {j}: {refs[j]!r}, record {bad}: "
            f"{refs[bad]!r}); use one kind"
        )
    return list(refs)


def _dataset(args, need_images: bool):
    """-> captions, images (or None), caption->image indices (or None), image root (or None), and for
    import-npy the records' image references (or None; mapped through the feature dict's keys later)."""
    from softalign.teachers.importers import is_integer_ref

    image_column = args.image_column or DEFAULT_IMAGE_COLUMN["build" if need_images else "import-npy"]
    captions, refs, images = (
        _read_captions(Path(args.captions), args.caption_column, image_column) if args.captions else (None, None, None)
    )
    root, listed = _list_images(args.images) if need_images else (None, None)
    c2i = None
    if args.caption_to_image:
        c2i = _read_image_indices(Path(args.caption_to_image))
    elif args.captions_per_image is not None:
        if captions is None:
            n = _num_rows(args.text_features) if getattr(args, "text_features", None) else None
            if n is None:
                raise ValueError("--captions-per-image needs --captions (or use --caption-to-image)")
        else:
            n = len(captions)
        known = len(images) if images is not None else len(listed) if listed is not None else None
        c2i = _groups_map(n, args.captions_per_image, known)
    elif refs is not None:
        if not need_images:  # import-npy: keys of the feature dict (or matrix rows); import_npy maps them
            return captions, images, None, None, refs
        if any(is_integer_ref(r) for r in refs):
            c2i = _int_refs_to_positions(refs, root)
        else:  # records name their image: number images by first appearance
            names, c2i = _refs_to_map(refs)
            if images is None:
                images = names
    if not need_images:
        return captions, images, c2i, None, None
    if images is None:
        if listed is not None:
            images = listed
        else:
            assert root is not None  # _list_images gives a directory or a list
            images = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in _IMAGE_EXTS)
            if not images:
                raise ValueError(f"--images {root}: no image files ({', '.join(sorted(_IMAGE_EXTS))}) under it")
    if args.captions_per_image is not None and c2i is not None and len(images) != max(c2i) + 1:
        _groups_map(len(c2i), args.captions_per_image, len(images))  # raises, naming both counts
    if captions is None:
        raise ValueError("--captions is required")
    if c2i is None:
        if len(images) == len(captions):
            c2i = list(range(len(captions)))
        else:
            raise ValueError(
                f"{len(captions)} captions and {len(images)} images: say which image each caption "
                "describes with --caption-to-image FILE or --captions-per-image K"
            )
    return captions, images, c2i, root, None


def _command(args) -> str:
    """The command line that ran (``softalign cache ...``), kept so that an unfinished build can say how to resume."""
    import shlex

    argv = getattr(args, "argv", None) or sys.argv[1:]
    return " ".join(shlex.quote(a) for a in ["softalign", *argv])


# ---------------------------------------------------------------------------------------------- commands
def run_build(args) -> int:
    captions, images, c2i, root, _ = _dataset(args, need_images=True)
    return _build(args, captions, images, c2i, root)


def _build(args, captions, images, c2i, root=None) -> int:
    from softalign.teachers.cache import TeacherCache

    cache = TeacherCache.build(
        args.out,
        captions,
        images,
        c2i,
        text_teacher=args.text_teacher,
        image_teacher=args.image_teacher,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        fingerprint=args.fingerprint,
        batch_size=args.batch_size,
        image_batch_size=args.image_batch_size,
        device=args.device,
        image_root=str(root) if root else None,
        image_weights=args.image_weights,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        image_hash=args.image_hash,
        command=_command(args),
    )
    print(_summary(cache))
    return 0


def run_build_teran(args) -> int:
    from softalign.data.teran import teran_training_split

    captions, images, c2i = teran_training_split(
        args.data, args.dataset, args.images_path, restval=not args.no_restval
    )
    return _build(args, captions, images, c2i)


def run_precomp_images(args) -> int:
    from softalign.data.precomp_images import precomp_image_paths
    from softalign.io import atomic_write_text

    n = _num_rows(args.ims) if args.ims else None
    paths = precomp_image_paths(
        args.ids,
        images_root=args.images_root,
        coco_annotations=args.coco_annotations,
        pattern=args.pattern,
        captions_per_image=args.captions_per_image,
        num_images=n,
    )
    atomic_write_text(args.out, "".join(p + "\n" for p in paths))
    print(f"wrote {len(paths)} image paths (train_ims.npy row order) to {args.out}")
    return 0


def run_import(args) -> int:
    from softalign.teachers.importers import import_npy

    captions, images, c2i, _, refs = _dataset(args, need_images=False)
    # keys as written (.json keeps integers); import_npy matches 25 and "25" against the dict's keys
    keys = (
        [
            k.strip() if isinstance(k, str) else k
            for k in _read_list(Path(args.image_keys), "--image-keys")
            if not (isinstance(k, str) and not k.strip())
        ]
        if args.image_keys
        else None
    )
    if c2i is None and refs is None:
        raise ValueError(
            "say which image each caption describes: --caption-to-image FILE, "
            "--captions-per-image K, or --captions records naming their image"
        )
    cache = import_npy(
        args.out,
        args.image_features,
        c2i,
        image_refs=refs,
        captions=captions,
        text_features=args.text_features,
        text_teacher=args.text_teacher,
        image_keys=keys,
        image_teacher_name=args.image_teacher_name,
        text_teacher_name=args.text_teacher_name,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        fingerprint=args.fingerprint,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        device=args.device,
        allow_pickle=args.allow_pickle,
        pool=args.pool,
        command=_command(args),
    )
    print(_summary(cache))
    return 0


def run_info(args) -> int:
    from softalign.teachers.cache import TeacherCache

    cache = TeacherCache.load(args.cache_dir)
    if args.json:
        m = {k: v for k, v in cache.manifest.items() if k != "caption_to_image"}
        print(json.dumps(m, indent=1))
    else:
        print(_summary(cache))
    return 0


def run_inspect(args) -> int:
    import torch

    from softalign import soft_labels as cal
    from softalign.teachers.cache import TeacherCache

    cache = TeacherCache.load(args.cache_dir)
    target = cal.DEFAULT_SOFT_LABEL_ENTROPY if args.entropy is None else float(args.entropy)
    labels = None
    if args.labels:
        labels = torch.from_numpy(_read_label_file(Path(args.labels), cache.num_images))
    ids, t_img, t_txt = cal.cache_batches(cache, args.batch_size, args.num_batches, args.seed)
    by_images = args.batch_size <= cache.num_images
    batch_labels = None if labels is None else labels[cache.caption_to_image.long()[ids]]
    rows = []
    for matrix, sims in (("image-image", t_img), ("text-text", t_txt)):
        tau_cal = cal.calibrate_temperature(sims, target)
        for kind, tau in [("fixed", t) for t in args.taus] + [("calibrated", tau_cal)]:
            rows.append({"matrix": matrix, "kind": kind, **cal.soft_label_stats(sims, tau, batch_labels)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    b = int(ids.shape[1])
    if b != args.batch_size or not by_images:
        print(
            f"note: --batch-size {args.batch_size} is more than the cache's {cache.num_images} images"
            + (f" and {cache.num_captions} captions: batches of {b}" if b != args.batch_size else "")
            + (
                "; a batch holds several captions of one image (their teacher rows are near-duplicates)"
                if not by_images
                else ""
            ),
            file=sys.stderr,
        )
    print(
        f"soft labels of {cache.path} on {args.num_batches} random batches of {b} "
        f"({'one caption per image' if by_images else 'captions'}); uniform rows: entropy 1, diagonal 1/B = "
        f"{1 / b:.4f}"
    )
    head = f"{'matrix':<12} {'tau_s':>18} {'entropy/logB':>12} {'diagonal':>9}"
    if labels is not None:
        head += f" {'same-label share':>16} {'chance':>7}"
    print(head)
    for r in rows:
        tau = f"{r['tau']:.4g}" + (f" (auto, H={target:g})" if r["kind"] == "calibrated" else "")
        line = f"{r['matrix']:<12} {tau:>18} {r['entropy']:>12.3f} {r['diagonal_mass']:>9.3f}"
        if labels is not None:
            line += f" {r['same_label_mass']:>16.3f} {r['same_label_chance']:>7.3f}"
        print(line)
    print(
        f"teacher_temperature='auto' (soft_label_entropy={target:g}) gives tau_s image "
        f"{rows[len(args.taus)]['tau']:.4g}, text {rows[-1]['tau']:.4g} at batch {b}"
    )
    return 0


def _read_label_file(path: Path, num_images: int):
    """One label per cache image (integers or names; any format of :func:`softalign.labels.read_label_file`)."""
    from softalign.labels import read_label_file

    labels = read_label_file(path, "--labels")
    if "image_labels" not in labels:
        raise ValueError(f"--labels {path}: holds no 'image_labels' (one label per cache image)")
    codes = labels["image_labels"]
    if len(codes) != num_images:
        raise ValueError(
            f"--labels {path} has {len(codes)} labels but the cache holds {num_images} images "
            "(one label per image, in the cache's image order)"
        )
    return codes


def _summary(cache) -> str:
    m = cache.manifest
    total = sum(int(f["bytes"]) for f in m["files"].values()) + os.path.getsize(Path(cache.path) / "manifest.json")
    fp = m["fingerprint"]
    return "\n".join(
        [
            f"teacher cache: {cache.path}",
            f"  captions: {cache.num_captions}   images: {cache.num_images}   dtype: {m['dtype']}   "
            f"normalisation: {m['normalization']}",
            f"  text teacher:  {m['text_teacher']['name']} ({m['text_teacher']['dim']}-d)",
            f"  image teacher: {m['image_teacher']['name']} ({m['image_teacher']['dim']}-d)",
            f"  fingerprint:   {fp.get('dataset', '?')[:16]} ({fp.get('source', '?')})",
            f"  size on disk:  {total / 1e6:.2f} MB ({total / max(1, cache.num_captions):.0f} bytes per caption)",
        ]
    )
