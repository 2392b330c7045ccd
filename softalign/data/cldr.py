"""Unicode CLDR emoji annotations: a short name ("tts") and keywords for each emoji, written by people.

Debian's ``unicode-cldr-core`` package installs them as ``/usr/share/unicode/cldr/common/annotations/en.xml``
(``apt-get install unicode-cldr-core``); ``$SOFTALIGN_CLDR_ANNOTATIONS`` may point at another copy of that file
(it is also in the ``cldr-annotations-full`` npm package and the CLDR release zips). The annotations are the
demo's captions: several phrasings per emoji, richer than one template.

Unicode CLDR data: Copyright (c) Unicode, Inc., under the Unicode License (https://www.unicode.org/license.txt).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
CLDR_CREDIT = "Emoji names and keywords: Unicode CLDR (Unicode License), Debian package unicode-cldr-core"

__all__ = ["Annotation", "annotations_path", "load_annotations", "annotation_for", "cldr_captions", "CLDR_CREDIT"]


class Annotation(NamedTuple):
    name: str  # CLDR "tts" short name, e.g. "grinning face"
    keywords: list[str]  # e.g. ["face", "grin", "grinning face"]


def annotations_path(path: os.PathLike | None = None) -> Path:
    """The English annotations file: ``path``, ``$SOFTALIGN_CLDR_ANNOTATIONS`` or Debian's location."""
    chosen = Path(path or os.environ.get("SOFTALIGN_CLDR_ANNOTATIONS") or DEFAULT_ANNOTATIONS)
    if not chosen.is_file():
        raise FileNotFoundError(
            f"CLDR emoji annotations not found at {chosen}: install them with `apt-get install unicode-cldr-core` "
            "(Debian/Ubuntu), or set SOFTALIGN_CLDR_ANNOTATIONS to a CLDR common/annotations/en.xml"
        )
    return chosen


def load_annotations(path: os.PathLike | None = None) -> dict[str, Annotation]:
    """``{emoji string: Annotation}`` from a CLDR annotations XML file (keys without U+FE0F)."""
    file = annotations_path(path)
    try:
        root = ET.parse(file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{file}: not a CLDR annotations XML file ({err})") from None
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for node in root.iter("annotation"):
        cp = (node.get("cp") or "").replace("\ufe0f", "")
        text = (node.text or "").strip()
        if not cp or not text:
            continue
        if node.get("type") == "tts":
            names[cp] = text
        else:
            keywords[cp] = [k.strip() for k in text.split("|") if k.strip()]
    if not names:
        raise ValueError(f'{file}: no <annotation type="tts"> entries: not a CLDR annotations file?')
    return {cp: Annotation(name, keywords.get(cp, [])) for cp, name in names.items()}


def annotation_for(unified: str, table: dict[str, Annotation]) -> Annotation | None:
    """The annotation of an emoji given as emoji-data's ``unified`` code points (``"1F600"``, ``"1F3F3-FE0F"``)."""
    chars = "".join(chr(int(h, 16)) for h in unified.split("-") if h)
    return table.get(chars.replace("\ufe0f", ""))


#: Phrasings of the keyword captions. The first caption of an emoji is its CLDR name; the others use only its
#: keywords (never the name itself), so that matching a caption to its emoji is not string matching.
KEYWORD_TEMPLATES = (
    "{a}, {b}",
    "an emoji about {a} and {b}",
    "{a} {b} symbol",
    "icon: {a}, {b}, {c}",
    "something to do with {a}",
    "{b} and {a}",
)


def cldr_captions(annotation: Annotation, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions: the CLDR name, then ``n - 1`` phrasings of random keywords other than the name (an emoji
    with fewer than two such keywords repeats the name in other words: "the X emoji", "X icon")."""
    if n < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {n}")
    name = annotation.name
    words = [k for k in annotation.keywords if k.lower() != name.lower()]
    out = [name]
    fallback = iter((f"the {name} emoji", f"{name} icon", f"a picture of {name}", f"{name} symbol"))
    fits = [t for t in KEYWORD_TEMPLATES if len(words) >= 3 or "{c}" not in t]
    templates = rng.permutation(len(fits))
    for j in range(n - 1):
        if len(words) >= 2:
            pick = [words[int(i)] for i in rng.permutation(len(words))[:3]] + [""]
            out.append(fits[int(templates[j % len(fits)])].format(a=pick[0], b=pick[1], c=pick[2]))
        else:
            out.append(next(fallback, f"{name} ({j})"))
    return out
