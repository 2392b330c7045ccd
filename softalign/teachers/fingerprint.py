"""Dataset fingerprints: which captions, which images, which caption->image map a cache was built for.

``fingerprint = sha256(captions) + sha256(caption_to_image) + sha256(image identities)``, kept per part
so that a mismatch can say *what* differs. Image identities are file paths + the SHA-256 of each file's bytes
(``image_mode="content"``, the default, recorded as ``fingerprint.image_hash``) or + file sizes (``"stat"``, the
format of caches built before content hashing), pixel hashes of in-memory PIL images, or a ``datasets.Dataset``'s
own fingerprint (see :class:`ImageSource`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def hash_captions(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def hash_caption_to_image(c2i: torch.Tensor) -> str:
    return hashlib.sha256(c2i.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def combine(parts: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in ("captions", "caption_to_image", "images"):
        h.update(f"{k}={parts.get(k)}\n".encode())
    return h.hexdigest()


def dataset_fingerprint(
    captions: Sequence[str],
    caption_to_image,
    images=None,
    image_column: str | None = None,
    image_root: str | None = None,
    image_hash: str | None = None,
    image_mode: str = "content",
) -> dict[str, str]:
    """Fingerprint parts of a data set, as stored in a cache manifest's ``fingerprint`` field.

    ``images`` may be omitted when ``image_hash`` is given (e.g. imported image features, whose
    identity is the hash of the imported matrix).
    """
    from .inputs import ImageSource

    parts = {
        "captions": hash_captions(captions),
        "caption_to_image": hash_caption_to_image(torch.as_tensor(caption_to_image).long()),
        "images": (
            image_hash
            if image_hash is not None
            else ImageSource(images, image_column, image_root).fingerprint(mode=image_mode)
        ),
    }
    parts["dataset"] = combine(parts)
    if image_hash is None:
        parts["image_hash"] = image_mode
    return parts


def describe_mismatch(stored: dict[str, str], expected) -> str | None:
    """None if ``expected`` (a combined string or a parts dict) matches ``stored``, else which parts differ."""
    if expected is None:
        return None
    if isinstance(expected, str):
        if expected == stored.get("dataset"):
            return None
        return f"dataset fingerprint {stored.get('dataset', '?')[:12]}... != expected {expected[:12]}..."
    diffs: list[str] = [
        k
        for k in ("captions", "caption_to_image", "images")
        if k in expected and k in stored and expected[k] != stored[k]
    ]
    if not diffs and expected.get("dataset", stored.get("dataset")) != stored.get("dataset"):
        diffs = ["dataset"]
    return None if not diffs else "different " + ", ".join(diffs)
