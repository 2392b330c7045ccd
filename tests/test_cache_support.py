"""Shared helpers for the teacher-cache tests (tiny data, deterministic fake teachers). No tests here."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CAPTIONS = [
    "a red square",
    "a crimson block",
    "red paint on a wall",
    "a green field",
    "green grass",
    "a lime green tile",
    "the blue sky",
    "a blue ocean",
    "deep blue water",
    "a yellow sun",
    "yellow lemons",
    "a bright yellow taxi",
]
CAPTION_TO_IMAGE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
COLORS = [(220, 20, 20), (20, 200, 30), (30, 40, 230), (240, 230, 20)]


def make_images():
    """Four 16x12 images: a colour with a horizontal gradient (distinct pixels per image)."""
    out = []
    for r, g, b in COLORS:
        a = np.zeros((12, 16, 3), dtype=np.uint8)
        ramp = np.linspace(0, 30, 16).astype(np.uint8)[None, :]
        a[..., 0], a[..., 1], a[..., 2] = r - ramp // 2 if r > 100 else r + ramp, g, b
        out.append(Image.fromarray(a))
    return out


def save_images(tmp_path, images=None):
    paths = []
    for i, img in enumerate(images or make_images()):
        p = tmp_path / f"img{i}.png"
        img.save(p)
        paths.append(str(p))
    return paths


def text_features(texts, dim=8):
    """Independent reference of FakeTextTeacher: character histogram modulo dim (+ length)."""
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for ch in t:
            out[i, ord(ch) % dim] += 1.0
        out[i, 0] += len(t) / 10
    return out


def image_features(images):
    """Independent reference of FakeImageTeacher: mean RGB of the left and right halves (6-d)."""
    rows = []
    for img in images:
        a = np.asarray(img.convert("RGB"), dtype=np.float32)
        w = a.shape[1] // 2
        rows.append(np.concatenate([a[:, :w].mean((0, 1)), a[:, w:].mean((0, 1))]) / 255.0 + 0.1)
    return torch.tensor(np.stack(rows))


class FakeTextTeacher:
    """Deterministic text teacher; records calls; ``fail_after`` calls then raises (a 'killed' build)."""

    name = "fake-text"

    def __init__(self, dim=8, fail_after=None):
        self.dim = dim
        self.fail_after = fail_after
        self.calls = []
        self.config = {"kind": "fake"}

    @property
    def encoded(self):
        return sum(len(c) for c in self.calls)

    def encode(self, texts):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("teacher killed")
        self.calls.append(list(texts))
        return text_features(texts, self.dim)


class FakeImageTeacher:
    name = "fake-image"
    dim = 6
    batch_size = 2

    def __init__(self, fail_after=None):
        self.fail_after = fail_after
        self.calls = []

    @property
    def encoded(self):
        return sum(self.calls)

    def encode(self, images):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("teacher killed")
        self.calls.append(len(images))
        return image_features(images)


class WrongDimTeacher(FakeTextTeacher):
    name = "wrong-dim"

    def encode(self, texts):
        return torch.zeros(len(texts), self.dim + 1)
