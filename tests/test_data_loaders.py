"""Data loaders on tiny fixtures written here: Karpathy JSON + image folder, precomp npy + caps, datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softalign.data import (
    ImagePairDataset,
    ImageTransform,
    PairDataset,
    RetrievalData,
    collate_pairs,
    from_hf_dataset,
    load_karpathy,
    load_precomp,
)


def _write_images(folder, names, size=(8, 6)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", size, (10 * i, 20, 30)).save(folder / n)


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "images"
    entries = []
    splits = ["train", "restval", "val", "test", "test"]
    for i, split in enumerate(splits):
        entries.append(
            {
                "filepath": "sub",
                "filename": f"img{i}.jpg",
                "split": split,
                "sentences": [{"raw": f" caption {i}.{j} "} for j in range(5 + (i == 0))],
            }
        )
    _write_images(root / "sub", [e["filename"] for e in entries])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path, root


def test_karpathy_train_includes_restval_and_keeps_five_captions(karpathy):
    path, root = karpathy
    d = load_karpathy(path, root, "train")
    assert d.num_images == 2 and d.num_captions == 10
    assert d.captions[0] == "caption 0.0" and d.captions[5] == "caption 1.0"
    assert d.caption_to_image.tolist() == [c // 5 for c in range(10)]
    assert d.images[1].endswith("sub/img1.jpg")
    only_train = load_karpathy(path, root, "train", restval_in_train=False)
    assert only_train.num_images == 1


def test_karpathy_test_split_and_errors(karpathy, tmp_path):
    path, root = karpathy
    test = load_karpathy(path, root, "test")
    assert test.num_images == 2 and test.captions[0] == "caption 3.0"
    with pytest.raises(ValueError, match="unknown Karpathy split 'dev'"):
        load_karpathy(path, root, "dev")
    with pytest.raises(ValueError, match="fewer than captions_per_image=7"):
        load_karpathy(path, root, "test", captions_per_image=7)
    (root / "sub" / "img4.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img4.jpg"):
        load_karpathy(path, root, "test")
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        load_karpathy(tmp_path / "missing.json", root)
    (tmp_path / "torn.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"Karpathy split file \S*torn.json: not valid JSON \(.* line 1, column 13"):
        load_karpathy(tmp_path / "torn.json", root)


def _precomp(tmp_path, n_img=4, cpi=5, repeat=False):
    feats = np.random.default_rng(0).normal(size=(n_img, 3, 8)).astype(np.float32)
    np.save(tmp_path / "train_ims.npy", np.repeat(feats, cpi, axis=0) if repeat else feats)
    (tmp_path / "train_caps.txt").write_text("".join(f"cap {c}\n" for c in range(n_img * cpi)))
    return feats


def test_precomp_caption_index_div_five(tmp_path):
    feats = _precomp(tmp_path)
    d = load_precomp(tmp_path, "train")
    assert d.num_images == 4 and d.num_captions == 20
    assert d.caption_to_image.tolist() == [c // 5 for c in range(20)]
    np.testing.assert_array_equal(np.asarray(d.images), feats)
    item = PairDataset(d)[13]
    assert item["id"] == 13 and item["image_id"] == 2 and item["caption"] == "cap 13"
    assert torch.equal(item["image"], torch.from_numpy(feats[2]))


def test_precomp_repeated_rows_are_folded(tmp_path):
    feats = _precomp(tmp_path, repeat=True)
    d = load_precomp(tmp_path, "train")
    assert d.num_images == 4
    np.testing.assert_array_equal(np.asarray(d.images), feats)


def test_precomp_errors(tmp_path):
    _precomp(tmp_path)
    with pytest.raises(ValueError, match="20 captions but .* has 4 images; expected 3 captions per image"):
        load_precomp(tmp_path, "train", captions_per_image=3)
    with pytest.raises(FileNotFoundError, match="test_ims.npy"):
        load_precomp(tmp_path, "test")


def test_hf_dataset_with_caption_lists():
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "caption": [["a", "b"], ["c"], ["d", "e", "f"]], "label": [0, 1, 0]}
    ).cast_column("image", datasets.Image())
    d = from_hf_dataset(ds, label_column="label")
    assert d.captions == list("abcdef")
    assert d.caption_to_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert d.text_labels.tolist() == [0, 0, 1, 0, 0, 0]
    assert d.images[1].getpixel((0, 0)) == (40, 0, 0)
    with pytest.raises(ValueError, match="caption column 'nope' not in the dataset"):
        from_hf_dataset(ds, caption_column="nope")
    with pytest.raises(TypeError, match="expected a datasets.Dataset"):
        from_hf_dataset({"image": imgs})


def test_imagefolder_with_metadata(tmp_path):
    pytest.importorskip("datasets")
    from softalign.data import load_imagefolder

    train = tmp_path / "train"
    _write_images(train, ["a.png", "b.png"])
    (train / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "caption": ["red a", "a red"]})
        + "\n"
        + json.dumps({"file_name": "b.png", "caption": ["blue b", "b blue"]})
        + "\n"
    )
    d = load_imagefolder(tmp_path, "train")
    assert d.num_images == 2 and d.num_captions == 4
    by_image = {d.captions[c]: int(d.caption_to_image[c]) for c in range(4)}
    assert by_image["red a"] == by_image["a red"] != by_image["blue b"] == by_image["b blue"]


def test_retrieval_data_validation_and_select():
    with pytest.raises(ValueError, match="caption_to_image has 2 entries but there are 3 captions"):
        RetrievalData(["a", "b", "c"], ["x", "y"], [0, 1])
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        RetrievalData(["a", "b"], ["x", "y"], [0, 2])
    d = RetrievalData(["a0", "b0", "a1", "c0"], ["A", "B", "C"], [0, 1, 0, 2], image_labels=[5, 6, 7])
    s = d.select_images([2, 0])
    assert s.images == ["C", "A"]
    assert s.captions == ["c0", "a0", "a1"]
    assert s.caption_to_image.tolist() == [0, 1, 1]
    assert s.image_labels.tolist() == [7, 5] and s.text_labels.tolist() == [7, 5, 5]


def test_image_transform_composites_rgba_on_white():
    im = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    x = ImageTransform(4)(im)
    assert x.shape == (3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 0, 0], (1 - mean) / std)


def test_image_pair_dataset_draws_a_caption_of_each_image():
    d = RetrievalData([f"c{i}" for i in range(7)], np.zeros((3, 2), np.float32), [0, 0, 1, 2, 2, 2, 1])
    ds = ImagePairDataset(d)
    assert len(ds) == 3
    torch.manual_seed(0)
    seen = {i: set() for i in range(3)}
    for _ in range(30):
        for i in range(3):
            it = ds[i]
            assert it["image_id"] == i and int(d.caption_to_image[it["id"]]) == i
            seen[i].add(it["id"])
    assert seen == {0: {0, 1}, 1: {2, 6}, 2: {3, 4, 5}}
    batch = collate_pairs([ds[0], ds[2]])
    assert batch["id"].dtype == torch.int64 and batch["image"].shape == (2, 2)


def test_karpathy_flickr_entries_without_filepath(tmp_path):
    _write_images(tmp_path / "flickr30k-images", ["1.jpg", "2.jpg"])
    entries = [
        {"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"s{i}{j}"} for j in range(5)]} for i in (1, 2)
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    d = load_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr30k-images", "test")
    assert d.name == "flickr30k" and d.images[1].endswith("flickr30k-images/2.jpg")
    assert d.captions[5:7] == ["s20", "s21"] and d.caption_to_image.tolist() == [0] * 5 + [1] * 5


def _gradient_images(n, size=12):
    """Images with no symmetry, so that every crop offset / flip gives different pixels."""
    out = []
    for k in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[..., 0] = np.arange(size)[None, :] * 20
        a[..., 1] = np.arange(size)[:, None] * 15 + 7 * k
        a[..., 2] = (np.arange(size)[:, None] * np.arange(size)[None, :]) % 251
        out.append(Image.fromarray(a))
    return out


def _epoch(loader):
    return torch.cat([b["image"] for b in loader])


def test_augmentation_differs_between_epochs_with_worker_processes():
    from torch.utils.data import DataLoader

    d = RetrievalData([f"c{i}" for i in range(8)], _gradient_images(8), list(range(8)))
    ds = PairDataset(d, ImageTransform(8, augment=True))
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2, collate_fn=collate_pairs)
    torch.manual_seed(0)
    first, second = _epoch(loader), _epoch(loader)
    # a fresh worker pool per epoch must not replay the previous epoch's crops and flips
    assert first.shape == second.shape == (8, 3, 8, 8)
    assert not torch.equal(first, second)
    assert sum(not torch.equal(a, b) for a, b in zip(first, second)) >= 4
    # ... while the augmentation stays reproducible from torch's seed (the trainer seeds every epoch)
    torch.manual_seed(0)
    torch.testing.assert_close(_epoch(loader), first, rtol=0, atol=0)
    plain = PairDataset(d, ImageTransform(8))
    torch.testing.assert_close(
        _epoch(DataLoader(plain, batch_size=4, num_workers=2, collate_fn=collate_pairs)),
        torch.stack([ImageTransform(8)(im) for im in d.images]),
        rtol=0,
        atol=0,
    )
