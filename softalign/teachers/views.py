"""Augmentation-aware teacher embeddings: K stored views per image, replayed by the training loader.

When the student sees augmented images (random crops, flips), a cache of the *clean* image's teacher embedding
gives soft labels for a picture the student did not see. MobileCLIP's reinforced datasets (DataCompDR, Vasu et al.,
CVPR 2024) store teacher embeddings of K sampled augmentations per image together with the augmentation
parameters, and the loader re-applies the sampled one. :class:`ViewCache` does that for softalign's augmentation
(:class:`~softalign.data.pairs.ImageTransform`: a random crop of scale ``s`` in [0.8, 1] at ``(x, y)``, then a
horizontal flip):

    ``params[i, k] = (s, x, y, flip)``  (``x``, ``y``: the crop's offset as a fraction of the free margin)

``ViewCache.build`` draws the parameters once (seeded), applies each view with :func:`apply_view` and encodes it
with the image teacher; the training dataset draws a view ``k`` per item, applies ``params[i, k]`` (the same
function) and returns ``k``, and the loss gets the teacher embedding of that view
(:meth:`ViewCache.image_embeddings`). Stored as ``views.safetensors`` (embeddings ``[N * K, D]`` fp16, params
``[N, K, 4]``) + ``views.json`` (teacher, K, seed, the number of images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from softalign.images import CROP_SCALE, apply_view, draw_view_params

__all__ = ["ViewCache", "apply_view", "draw_view_params", "sample_view_params"]


def sample_view_params(num_images: int, views: int, seed: int = 0) -> torch.Tensor:
    """``[num_images, views, 4]`` view parameters, deterministic for ``seed``."""
    if int(views) < 1:
        raise ValueError(f"views must be >= 1 per image, got {views}")
    g = torch.Generator().manual_seed(int(seed))
    return (
        torch.stack([torch.stack([draw_view_params(g) for _ in range(int(views))]) for _ in range(num_images)])
        if num_images
        else torch.zeros(0, int(views), 4)
    )


class ViewCache:
    """Teacher embeddings of K augmented views of every image, and the views' parameters."""

    def __init__(self, path, embeddings: torch.Tensor, params: torch.Tensor, meta: dict[str, Any]):
        self.path, self._embeddings, self.params, self.meta = Path(path), embeddings, params, meta
        self.views = int(params.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.params.shape[0])

    def __repr__(self) -> str:
        return (
            f"ViewCache({str(self.path)!r}, images={self.num_images}, views={self.views}, "
            f"teacher={self.meta['image_teacher']!r})"
        )

    @classmethod
    def build(
        cls,
        out_dir,
        images: Sequence,
        views: int,
        image_teacher="offline-efficientnet-lite0",
        seed: int = 0,
        dtype: str = "float16",
        progress: bool = True,
        device=None,
    ) -> ViewCache:
        """Draw ``views`` parameter sets per image (``seed``), encode every view with ``image_teacher`` (a name for
        :func:`~softalign.teachers.resolve_image_teacher`, or a teacher object) and store them."""
        from tqdm.auto import tqdm

        from softalign.images import load_image
        from softalign.io import atomic_save_tensors, atomic_write_json
        from softalign.teachers.image import resolve_image_teacher

        teacher = (
            resolve_image_teacher(image_teacher, device=device) if isinstance(image_teacher, str) else image_teacher
        )
        params = sample_view_params(len(images), views, seed)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in tqdm(range(len(images)), desc="teacher views", unit="image", disable=not progress):
            img = load_image(images[i], i)  # RGB, transparency on white; errors name the image
            rows.append(teacher.encode([apply_view(img, p) for p in params[i]]).float().cpu())
        emb = torch.cat(rows) if rows else torch.zeros(0, int(teacher.dim))
        from softalign.teachers.cache import canonical_teacher_name

        meta = {
            "format": "softalign-views",
            "image_teacher": canonical_teacher_name("image", str(teacher.name)),
            "views": int(views),
            "seed": int(seed),
            "num_images": len(images),
            "dim": int(emb.shape[1]),
            "dtype": dtype,
            "crop_scale": list(CROP_SCALE),
        }
        atomic_save_tensors(
            out / "views.safetensors",
            {"embeddings": emb.to(getattr(torch, dtype)).contiguous(), "params": params.contiguous()},
        )
        atomic_write_json(out / "views.json", meta)  # written last: its presence means the cache is complete
        return cls.load(out)

    @classmethod
    def load(
        cls, path, expect_images: int | None = None, expect_views: int | None = None, expect_teacher: str | None = None
    ) -> ViewCache:
        """Read a view cache; refuses one for another number of images, views or another teacher, naming it."""
        from softalign.io import load_tensors, read_json

        path = Path(path)
        meta = read_json(path / "views.json", what="view cache manifest")
        tables = load_tensors(path / "views.safetensors")
        emb, params = tables["embeddings"], tables["params"]
        k, n = int(meta["views"]), int(meta["num_images"])
        if tuple(params.shape) != (n, k, 4) or emb.shape[0] != n * k:
            raise ValueError(
                f"{path}: damaged view cache (params {tuple(params.shape)}, embeddings "
                f"{tuple(emb.shape)} for {n} images x {k} views)"
            )
        for what, want, have in (
            ("images", expect_images, n),
            ("views per image", expect_views, k),
            ("image teacher", expect_teacher, meta["image_teacher"]),
        ):
            if want is not None and want != have:
                raise ValueError(f"{path}: this view cache holds {have!r} {what}, expected {want!r}; rebuild it")
        return cls(path, emb, params, meta)

    def image_embeddings(self, image_ids, views, device=None) -> torch.Tensor:
        """``[B, D]`` fp32 unit teacher embeddings of view ``views[p]`` of image ``image_ids[p]``."""
        i = torch.as_tensor(image_ids).long().reshape(-1).cpu()
        k = torch.as_tensor(views).long().reshape(-1).cpu()
        if i.shape != k.shape:
            raise ValueError(f"image_ids ({tuple(i.shape)}) and views ({tuple(k.shape)}) must have one entry per pair")
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= self.num_images):
            raise ValueError(
                f"image id {int(i.min()) if int(i.min()) < 0 else int(i.max())} is out of range: this "
                f"view cache holds images 0..{self.num_images - 1} ({self.path})"
            )
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.views):
            raise ValueError(
                f"view {int(k.min()) if int(k.min()) < 0 else int(k.max())} is out of range: this view "
                f"cache holds views 0..{self.views - 1} per image ({self.path})"
            )
        rows = self._embeddings.index_select(0, i * self.views + k)
        return F.normalize(rows.to(device=device or "cpu", dtype=torch.float32, non_blocking=True), dim=1)
