"""softalign encode and softalign eval --model: a trained softalign run, a real timm model and DML benchmark
layouts -> embeddings -> R@1/2/4/8, MAP@R, R-Precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from softalign.cli import main


def _photo(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _sop(root, n_classes=4, per_class=3):
    base = root / "Stanford_Online_Products"
    lines = ["image_id class_id super_class_id path"]
    for c in range(n_classes):
        for j in range(per_class):
            rel = f"bicycle_final/{c}_{j}.JPG"
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            _photo(10 * c + j).save(base / rel, format="JPEG")
            lines.append(f"{len(lines)} {100 + c} 1 {rel}")
    (base / "Ebay_test.txt").write_text("\n".join(lines) + "\n")


def _inshop(root):
    rows = []
    for item in range(3):
        for j, status in enumerate(("query", "gallery", "gallery")):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{j}.jpg"
            (root / "Img" / rel).parent.mkdir(parents=True, exist_ok=True)
            _photo(100 + 3 * item + j).save(root / "Img" / rel, format="JPEG")
            rows.append((rel, f"id_{item:08d}", status))
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a} {b} {c}\n" for a, b, c in rows)
    )


def test_encode_a_timm_model_on_sop_then_eval(tmp_path, vit_weights):
    from softalign.data.dml import load_dml_benchmark
    from softalign.eval import unimodal_retrieval
    from softalign.teachers.image import TimmImageTeacher

    _sop(tmp_path / "data")
    out = tmp_path / "sop.safetensors"
    assert (
        main(
            [
                "encode",
                "--model",
                "timm:test_vit",
                "--weights",
                vit_weights,
                "--benchmark",
                "sop",
                "--root",
                str(tmp_path / "data"),
                "--batch-size",
                "5",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    emb = load_file(str(out))
    bench = load_dml_benchmark("sop", tmp_path / "data")
    want = torch.nn.functional.normalize(
        TimmImageTeacher("test_vit", weights=vit_weights, device="cpu").encode(bench.paths), dim=1
    )
    torch.testing.assert_close(emb["image"], want, atol=1e-5, rtol=1e-5)
    assert emb["image_labels"].tolist() == bench.labels.tolist()
    assert main(["eval", "--embeddings", str(out), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    ref = unimodal_retrieval(want, torch.as_tensor(bench.labels), prefix="i2i_")
    for k in (
        "i2i_recall_at_1",
        "i2i_recall_at_2",
        "i2i_recall_at_4",
        "i2i_recall_at_8",
        "i2i_map_at_r",
        "i2i_r_precision",
    ):
        assert flat[k] == pytest.approx(ref[k], abs=1e-6), k


def test_eval_model_on_inshop_uses_query_vs_gallery(tmp_path, vit_weights):
    from softalign.eval import unimodal_retrieval

    _inshop(tmp_path / "inshop")
    assert (
        main(
            [
                "eval",
                "--model",
                "timm:test_vit",
                "--weights",
                vit_weights,
                "--benchmark",
                "inshop",
                "--root",
                str(tmp_path / "inshop"),
                "--no-progress",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_gallery"] == 6 and metrics["i2i_num_queries"] == 3
    assert (
        main(
            [
                "encode",
                "--model",
                "timm:test_vit",
                "--weights",
                vit_weights,
                "--benchmark",
                "inshop",
                "--root",
                str(tmp_path / "inshop"),
                "--no-progress",
                "--out",
                str(tmp_path / "e.safetensors"),
            ]
        )
        == 0
    )
    e = load_file(str(tmp_path / "e.safetensors"))
    q, g = e["query_indices"], e["gallery_indices"]
    ref = unimodal_retrieval(
        e["image"][q], e["image_labels"][q], gallery=e["image"][g], gallery_labels=e["image_labels"][g], prefix="i2i_"
    )
    assert metrics["i2i_map_at_r"] == pytest.approx(ref["i2i_map_at_r"], abs=1e-6)


def train_tiny_run(out):
    """One epoch of a tiny softalign run with USA heads (demo data, 24 images) into ``out``; returns its recipe."""
    from softalign.train.recipe import recipe_from_dict
    from softalign.train.trainer import train

    recipe = recipe_from_dict(
        {
            "name": "enc",
            "seed": 0,
            "output_dir": str(out),
            "data": {"kind": "demo", "image_size": 8, "max_images": 24},
            "model": {"embed_dim": 16, "word_dim": 8, "cnn_width": 4},
            "loss": {"base": "infonce", "alpha": 0.1, "beta": 0.5},
            "optim": {"lr": 0.01, "schedule": "constant"},
            "train": {"epochs": 1, "batch_size": 12, "eval_batch_size": 16, "progress": False},
        }
    )
    train(recipe, log=lambda m: None)
    return recipe


def test_encode_a_softalign_run_gives_its_cross_and_uni_modal_embeddings(tmp_path):
    from softalign.train.trainer import load_splits

    recipe = train_tiny_run(tmp_path / "run")
    _, _, test = load_splits(recipe)
    listed = []
    for i, im in enumerate(test.images):  # PNG is lossless: the same pixels as the run's test images
        im.save(tmp_path / f"{i}.png")
        listed.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    c2i = np.asarray(test.caption_to_image)
    k = len(c2i) // len(test.images)
    assert (c2i == np.repeat(np.arange(len(test.images)), k)).all()
    (tmp_path / "captions.txt").write_text("\n".join(test.captions) + "\n")
    saved = load_file(str(tmp_path / "run" / "embeddings_test.safetensors"))
    for heads, suffix in (("cross", ""), ("uni", "_uni")):
        out = tmp_path / f"{heads}.safetensors"
        assert (
            main(
                [
                    "encode",
                    "--model",
                    str(tmp_path / "run"),
                    "--heads",
                    heads,
                    "--images",
                    str(tmp_path / "list.txt"),
                    "--captions",
                    str(tmp_path / "captions.txt"),
                    "--captions-per-image",
                    str(k),
                    "--no-progress",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        got = load_file(str(out))
        for key in ("image", "text"):
            torch.testing.assert_close(
                got[key], torch.nn.functional.normalize(saved[key + suffix], dim=1), atol=1e-5, rtol=1e-4
            )
        assert got["caption_to_image"].tolist() == c2i.tolist()
    # one command: the model's cross-modal recall equals the evaluation of the run's own test embeddings
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "run"),
                "--images",
                str(tmp_path / "list.txt"),
                "--captions",
                str(tmp_path / "captions.txt"),
                "--captions-per-image",
                str(k),
                "--no-progress",
                "--no-plot",
                "--out",
                str(tmp_path / "ev_model"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(tmp_path / "run" / "embeddings_test.safetensors"),
                "--no-plot",
                "--out",
                str(tmp_path / "ev_file"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ev_model", "ev_file"))
    assert a["rsum"] == pytest.approx(b["rsum"], abs=1e-9) and a["i2t_r1"] == pytest.approx(b["i2t_r1"], abs=1e-9)


def test_encode_errors_are_named(tmp_path, capsys):
    assert (
        main(["encode", "--model", "resnet", "--images", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    )
    assert "expected a softalign train output directory" in capsys.readouterr().err
    assert main(["encode", "--model", "timm:test_vit", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "nothing to encode" in capsys.readouterr().err
    assert (
        main(
            ["encode", "--model", "timm:test_vit", "--images", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]
        )
        == 1
    )
    assert "no image files" in capsys.readouterr().err
    assert (
        main(["encode", "--model", "timm:test_vit", "--benchmark", "sop", "--out", str(tmp_path / "x.safetensors")])
        == 1
    )
    assert "needs --root" in capsys.readouterr().err
    _photo(1).save(tmp_path / "a.png")
    (tmp_path / "caps.txt").write_text("one\ntwo\nthree\n")
    assert (
        main(
            [
                "encode",
                "--model",
                "timm:test_vit",
                "--images",
                str(tmp_path),
                "--captions",
                str(tmp_path / "caps.txt"),
                "--captions-per-image",
                "2",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 1
    )
    assert "3 captions for 1 images" in capsys.readouterr().err


def test_encode_an_open_clip_model_with_its_own_preprocessing(tmp_path, tiny_open_clip):
    import open_clip

    paths = []
    for i in range(3):
        _photo(200 + i, (50, 70)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    out = tmp_path / "clip.safetensors"
    torch.manual_seed(0)  # the same random initialisation as below
    assert (
        main(
            [
                "encode",
                "--model",
                f"open_clip:{tiny_open_clip}",
                "--images",
                str(tmp_path),
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_open_clip, pretrained=None)
    with torch.no_grad():
        want = model.encode_image(
            torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]), normalize=True
        )
    torch.testing.assert_close(load_file(str(out))["image"], want, atol=1e-5, rtol=1e-4)


def test_encode_a_karpathy_split_for_cross_modal_eval(tmp_path, tiny_open_clip):
    for i in range(3):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        _photo(300 + i).save(tmp_path / "imgs" / f"{i}.jpg", format="JPEG")
    entries = [
        {
            "filename": f"{i}.jpg",
            "split": "test",
            "sentences": [{"raw": f"photo {i} view {j}"} for j in range(2 + (i == 0))],
        }
        for i in range(3)
    ]
    entries.append({"filename": "9.jpg", "split": "train", "sentences": [{"raw": "not in test"}]})
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    out = tmp_path / "k.safetensors"
    assert (
        main(
            [
                "encode",
                "--model",
                f"open_clip:{tiny_open_clip}",
                "--karpathy",
                str(tmp_path / "dataset.json"),
                "--image-root",
                str(tmp_path / "imgs"),
                "--split",
                "test",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    e = load_file(str(out))
    assert e["image"].shape[0] == 3 and e["text"].shape[0] == 7
    assert e["caption_to_image"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert main(["eval", "--embeddings", str(out), "--no-plot", "--out", str(tmp_path / "ev")]) == 0


def test_eval_model_asks_for_coco5k_before_extended_positives(tmp_path, tiny_open_clip, capsys):
    (tmp_path / "imgs").mkdir()
    _photo(1).save(tmp_path / "imgs" / "0.jpg", format="JPEG")
    (tmp_path / "caps.txt").write_text("a\nb\n")
    assert (
        main(
            [
                "eval",
                "--model",
                f"open_clip:{tiny_open_clip}",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "caps.txt"),
                "--captions-per-image",
                "2",
                "--positives",
                "eccv",
                "--no-progress",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 1
    )
    assert "add --protocol coco5k" in capsys.readouterr().err


def test_encode_captions_with_a_sentence_transformers_model_then_text_text_eval(tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from softalign.eval import unimodal_retrieval
    from softalign.teachers.packaged import offline_minilm_path

    captions = ["a red car", "a car painted red", "a small cat", "a kitten on a mat", "two dogs", "a pair of dogs"]
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "labels.txt").write_text("car\ncar\ncat\ncat\ndog\ndog\n")
    out = tmp_path / "st.safetensors"
    assert (
        main(
            [
                "encode",
                "--model",
                "st:offline-minilm",
                "--captions",
                str(tmp_path / "caps.txt"),
                "--caption-labels",
                str(tmp_path / "labels.txt"),
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    e = load_file(str(out))
    want = SentenceTransformer(offline_minilm_path(), device="cpu").encode(captions, convert_to_tensor=True)
    torch.testing.assert_close(e["text"], torch.nn.functional.normalize(want.float(), dim=1), atol=1e-5, rtol=1e-4)
    assert e["text_labels"].tolist() == [0, 0, 1, 1, 2, 2] and "image" not in e
    assert main(["eval", "--embeddings", str(out), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ref = unimodal_retrieval(e["text"], e["text_labels"], prefix="t2t_")
    assert metrics["t2t_map_at_r"] == pytest.approx(ref["t2t_map_at_r"], abs=1e-6) and metrics["num_captions"] == 6
    # a text model asked for images says so in one line
    _photo(1).save(tmp_path / "a.png")
    capsys.readouterr()
    assert (
        main(
            [
                "encode",
                "--model",
                "st:offline-minilm",
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 1
    )
    assert "cannot encode images" in capsys.readouterr().err
