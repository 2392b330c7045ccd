"""Cache routes for the upstream trainers' own file layouts: TERAN's training split and the precomp image order."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from softalign.cli import main
from softalign.data.precomp_images import precomp_image_paths, read_ids
from softalign.data.teran import teran_training_split


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _coco_layout(tmp_path):
    """TERAN's COCO files: annotations interleaved across images (as in COCO), train + restval parts."""
    ann_dir = tmp_path / "data" / "coco" / "annotations"
    ann_dir.mkdir(parents=True)
    imgs = tmp_path / "images"
    train = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
        ],
        "annotations": [
            {"id": 100 + k, "image_id": (9, 25)[k % 2], "caption": f"train caption {k}"} for k in range(6)
        ],
    }
    val = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
        "annotations": [{"id": 500 + k, "image_id": 42, "caption": f"val caption {k}"} for k in range(3)],
    }
    (ann_dir / "captions_train2014.json").write_text(json.dumps(train))
    (ann_dir / "captions_val2014.json").write_text(json.dumps(val))
    np.save(ann_dir / "coco_train_ids.npy", np.array([103, 100, 101, 104, 102, 105]))
    np.save(ann_dir / "coco_restval_ids.npy", np.array([502, 500, 501]))
    _png(imgs / "train2014" / "COCO_train2014_000000000009.jpg", (200, 0, 0))
    _png(imgs / "train2014" / "COCO_train2014_000000000025.jpg", (0, 200, 0))
    _png(imgs / "val2014" / "COCO_val2014_000000000042.jpg", (0, 0, 200))
    return tmp_path / "data", imgs, train, val


def _teran_order(train, val, train_ids, restval_ids):
    """TERAN's CocoDataset.get_raw_item, written out: index -> annotation -> (caption, image id, part)."""
    ids = list(train_ids) + list(restval_ids)
    out = []
    for index, ann_id in enumerate(ids):
        coco = train if index < len(train_ids) else val
        ann = next(a for a in coco["annotations"] if a["id"] == ann_id)
        out.append((ann["caption"], ("train" if index < len(train_ids) else "val", ann["image_id"])))
    return out


def test_teran_coco_split_follows_terans_caption_order_and_image_map(tmp_path):
    data, imgs, train, val = _coco_layout(tmp_path)
    captions, images, c2i = teran_training_split(data, "coco", imgs)
    expected = _teran_order(train, val, [103, 100, 101, 104, 102, 105], [502, 500, 501])
    assert captions == [c for c, _ in expected]
    # same image <=> same (part, image id), and each path is that image's file
    keys = [k for _, k in expected]
    for i in range(len(keys)):
        for j in range(len(keys)):
            assert (c2i[i] == c2i[j]) == (keys[i] == keys[j])
    assert images[c2i[0]].endswith("train2014/COCO_train2014_000000000025.jpg")  # annotation 103 -> image 25
    assert images[c2i[-1]].endswith("val2014/COCO_val2014_000000000042.jpg")
    assert c2i != [i // 3 for i in range(9)]  # TERAN's COCO ids are not grouped by image
    captions, images, c2i = teran_training_split(data, "coco", imgs, restval=False)
    assert len(captions) == 6 and len(images) == 2


def test_teran_f30k_split_and_errors(tmp_path):
    ann = tmp_path / "data" / "f30k" / "annotations"
    ann.mkdir(parents=True)
    entries = [
        {"filename": f"{i}.jpg", "split": s, "sentences": [{"raw": f"img {i} sentence {k}"} for k in range(2)]}
        for i, s in enumerate(["train", "test", "train"])
    ]
    (ann / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    captions, images, c2i = teran_training_split(tmp_path / "data", "f30k", tmp_path / "imgs")
    assert captions == ["img 0 sentence 0", "img 0 sentence 1", "img 2 sentence 0", "img 2 sentence 1"]
    assert c2i == [0, 0, 1, 1] and images[1].endswith("imgs/2.jpg")
    with pytest.raises(ValueError, match="dataset must be 'coco' or 'f30k'"):
        teran_training_split(tmp_path / "data", "cub", tmp_path)
    with pytest.raises(FileNotFoundError, match="captions_train2014.json"):
        teran_training_split(tmp_path / "data", "coco", tmp_path)


def test_build_teran_command_builds_a_cache_in_terans_order(tmp_path, capsys, monkeypatch):
    from softalign.teachers import TeacherCache
    from tests.test_cache_support import FakeImageTeacher, FakeTextTeacher

    monkeypatch.setattr("softalign.teachers.text.resolve_text_teacher", lambda *a, **k: FakeTextTeacher())
    monkeypatch.setattr("softalign.teachers.image.resolve_image_teacher", lambda *a, **k: FakeImageTeacher())
    data, imgs, train, val = _coco_layout(tmp_path)
    rc = main(
        [
            "cache",
            "build-teran",
            "--data",
            str(data),
            "--dataset",
            "coco",
            "--images-path",
            str(imgs),
            "--out",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    cache = TeacherCache.load(tmp_path / "cache")
    _, c2i = teran_training_split(data, "coco", imgs)[1:]
    assert cache.caption_to_image.tolist() == c2i and cache.num_captions == 9 and cache.num_images == 3
    # an id the annotations lack is named
    np.save(data / "coco" / "annotations" / "coco_train_ids.npy", np.array([103, 999]))
    assert (
        main(
            [
                "cache",
                "build-teran",
                "--data",
                str(data),
                "--dataset",
                "coco",
                "--images-path",
                str(imgs),
                "--out",
                str(tmp_path / "c2"),
            ]
        )
        == 1
    )
    assert "coco_train_ids.npy[1] = annotation 999" in capsys.readouterr().err


def test_precomp_image_order_from_ids_files(tmp_path, capsys):
    root = tmp_path / "coco"
    for i, name in enumerate(["COCO_train2014_000000000009.jpg", "COCO_val2014_000000000042.jpg"]):
        _png(root / ("train2014" if "train" in name else "val2014") / name, (i * 100, 0, 0))
    (tmp_path / "ann.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                    {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                ]
            }
        )
    )
    # one id per image (row order) and one id per caption (5 equal lines per image) give the same list
    (tmp_path / "per_image.txt").write_text("42\n9\n")
    (tmp_path / "per_caption.txt").write_text("42\n" * 5 + "9\n" * 5)
    a = precomp_image_paths(tmp_path / "per_image.txt", images_root=root, coco_annotations=[tmp_path / "ann.json"])
    b = precomp_image_paths(
        tmp_path / "per_caption.txt", images_root=root, coco_annotations=[tmp_path / "ann.json"], num_images=2
    )
    assert a == b and a[0].endswith("val2014/COCO_val2014_000000000042.jpg") and a[1].endswith("000000000009.jpg")
    with pytest.raises(ValueError, match="has 3 lines, but the features hold 2 rows"):
        (tmp_path / "bad.txt").write_text("42\n9\n7\n")
        read_ids(tmp_path / "bad.txt", num_images=2)
    with pytest.raises(KeyError, match="row 1: image id 7 is in none of the --coco-annotations"):
        (tmp_path / "unknown.txt").write_text("42\n7\n")
        precomp_image_paths(tmp_path / "unknown.txt", images_root=root, coco_annotations=[tmp_path / "ann.json"])
    # Flickr30k: ids are file names
    _png(tmp_path / "f30k" / "1000092795.jpg", (1, 2, 3))
    (tmp_path / "f30k_ids.txt").write_text("1000092795\n")
    assert precomp_image_paths(tmp_path / "f30k_ids.txt", images_root=tmp_path / "f30k", pattern="{id}.jpg")[
        0
    ].endswith("1000092795.jpg")
    # the command, checked against the feature rows
    np.save(tmp_path / "train_ims.npy", np.zeros((2, 36, 4), np.float32))
    assert (
        main(
            [
                "cache",
                "precomp-images",
                "--ids",
                str(tmp_path / "per_caption.txt"),
                "--ims",
                str(tmp_path / "train_ims.npy"),
                "--coco-annotations",
                str(tmp_path / "ann.json"),
                "--images-root",
                str(root),
                "--out",
                str(tmp_path / "list.txt"),
            ]
        )
        == 0
    )
    assert (tmp_path / "list.txt").read_text().splitlines() == a
    assert re.search(r"wrote 2 image paths", capsys.readouterr().out)
