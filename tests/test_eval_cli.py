"""`softalign eval` end to end: safetensors or .npy inputs -> metrics.json, metrics.md, recall_at_k.png."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from softalign.cli import main


def vsepp_recalls(S, c2i, ks=(1, 5, 10)):
    i2t = np.array(
        [min(np.where(np.argsort(S[i])[::-1] == c)[0][0] for c in np.where(c2i == i)[0]) for i in range(S.shape[0])]
    )
    t2i = np.array([np.where(np.argsort(S[:, c])[::-1] == c2i[c])[0][0] for c in range(S.shape[1])])
    out = {}
    for pre, r in (("i2t_", i2t), ("t2i_", t2i)):
        for k in ks:
            out[f"{pre}r{k}"] = 100.0 * (r < k).mean()
        out[pre + "medr"] = np.floor(np.median(r)) + 1
        out[pre + "meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{p}r{k}"] for p in ("i2t_", "t2i_") for k in ks)
    return out, i2t, t2i


def make(n_img=20, cpi=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    im = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=1)
    c2i = torch.arange(n_img).repeat_interleave(cpi)
    tx = torch.nn.functional.normalize(im[c2i] + 0.7 * torch.randn(n_img * cpi, d, generator=g), dim=1)
    return im, tx, c2i


def test_eval_from_safetensors_writes_json_markdown_png(tmp_path, capsys):
    im, tx, c2i = make()
    f = tmp_path / "emb.safetensors"
    save_file(
        {
            "image": im,
            "text": tx,
            "caption_to_image": c2i,
            "image_labels": torch.arange(20) % 4,
            "text_labels": c2i.clone(),
        },
        str(f),
    )
    out = tmp_path / "out"
    assert main(["eval", "--embeddings", str(f), "--out", str(out), "--chunk-size", "6"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    S = (torch.nn.functional.normalize(im, dim=1) @ torch.nn.functional.normalize(tx, dim=1).T).double().numpy()
    ref, i2t, t2i = vsepp_recalls(S, c2i.numpy())
    for k, v in ref.items():
        assert m[k] == pytest.approx(v), k
    assert m["recall_curve"]["k"][:3] == [1, 2, 3]
    assert m["recall_curve"]["i2t"][1] == pytest.approx(100.0 * (i2t < 2).mean())
    assert m["recall_curve"]["t2i"][3] == pytest.approx(100.0 * (t2i < 5).mean())
    assert {"i2i_map_at_r", "t2t_map_at_r", "i2i_precision_at_1"} <= set(m)
    md = (out / "metrics.md").read_text()
    assert f"| i2t_r1 | {ref['i2t_r1']:.2f} |" in md
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left behind
    assert m["recall_curve"]["gallery"] == "all 20 images x 100 captions (plain)"
    assert "recall@K curve (metrics.json `recall_curve`, recall_at_k.png): all 20 images x 100 captions" in md


def test_eval_from_npy_with_captions_per_image(tmp_path):
    im, tx, c2i = make(n_img=10, cpi=3, seed=1)
    np.save(tmp_path / "i.npy", im.numpy())
    np.save(tmp_path / "t.npy", tx.numpy())
    out = tmp_path / "o"
    assert (
        main(
            [
                "eval",
                "--image-emb",
                str(tmp_path / "i.npy"),
                "--text-emb",
                str(tmp_path / "t.npy"),
                "--captions-per-image",
                "3",
                "--out",
                str(out),
                "--ks",
                "1",
                "2",
                "--no-plot",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    ref, _, _ = vsepp_recalls((im @ tx.T).double().numpy(), c2i.numpy(), ks=(1, 2))
    assert m["rsum"] == pytest.approx(ref["rsum"]) and "i2t_r10" not in m
    assert not (out / "recall_at_k.png").exists()


def _fails(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_eval_cli_bad_input(tmp_path, capsys):
    im, tx, c2i = make(n_img=10, cpi=3)
    np.save(tmp_path / "i.npy", im.numpy())
    np.save(tmp_path / "t.npy", tx.numpy())
    _fails(
        capsys,
        [
            "eval",
            "--image-emb",
            str(tmp_path / "i.npy"),
            "--text-emb",
            str(tmp_path / "t.npy"),
            "--captions-per-image",
            "4",
            "--out",
            str(tmp_path / "o"),
        ],
        "10 images x 4 = 40 captions expected, got 30",
    )
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")],
        r"--embeddings \S*missing.safetensors: file not found",
    )
    # not a safetensors file: empty, text, a pickle -- one line naming the file, never "header too small"
    import pickle

    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.safetensors").write_text("image,text\n1,2\n")
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"image": im}))
    for name in ("empty", "text", "pickle"):
        _fails(
            capsys,
            ["eval", "--embeddings", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / "o")],
            rf"--embeddings \S*{name}.safetensors: not a safetensors file",
        )
    _fails(
        capsys,
        [
            "eval",
            "--image-emb",
            str(tmp_path / "text.safetensors"),
            "--text-emb",
            str(tmp_path / "t.npy"),
            "--captions-per-image",
            "3",
            "--out",
            str(tmp_path / "o"),
        ],
        r"--image-emb \S*: not a plain .npy",
    )
    # --out naming a file
    (tmp_path / "afile").write_text("x")
    _fails(
        capsys,
        [
            "eval",
            "--image-emb",
            str(tmp_path / "i.npy"),
            "--text-emb",
            str(tmp_path / "t.npy"),
            "--captions-per-image",
            "3",
            "--out",
            str(tmp_path / "afile"),
        ],
        r"--out \S*afile: is a file",
    )
    # missing keys, inconsistent maps and shapes name the key
    save_file({"text": tx, "caption_to_image": c2i}, str(tmp_path / "no_image.safetensors"))
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "no_image.safetensors"), "--out", str(tmp_path / "o")],
        r"missing key\(s\) \['image'\]",
    )
    bad_maps = {
        "out_of_range": (
            c2i + 1,
            r"caption_to_image\[27\] = 10 is out of range: caption 27 maps to image 10, outside 0..9",
        ),
        "short": (c2i[:-1], r"caption_to_image has 29 entries but there are 30 captions"),
        "float": (c2i.float(), r"caption_to_image must hold integer image indices"),
        "uncovered": (torch.zeros_like(c2i), r"image 1 has no caption"),
    }
    for name, (m, msg) in bad_maps.items():
        save_file({"image": im, "text": tx, "caption_to_image": m}, str(tmp_path / f"{name}.safetensors"))
        _fails(
            capsys, ["eval", "--embeddings", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / "o")], msg
        )
    nan_img = im.clone()
    nan_img[4, 0] = float("nan")
    save_file({"image": nan_img, "text": tx, "caption_to_image": c2i}, str(tmp_path / "nan.safetensors"))
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "o")],
        r"'image' row 4 holds NaN/inf",
    )
    save_file(
        {"image": im[:, :5].contiguous(), "text": tx, "caption_to_image": c2i}, str(tmp_path / "dims.safetensors")
    )
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "dims.safetensors"), "--out", str(tmp_path / "o")],
        r"'image' is 5-d but 'text' is \d+-d",
    )
    save_file(
        {"image": im, "text": tx, "caption_to_image": c2i, "image_labels": torch.arange(3)},
        str(tmp_path / "labels.safetensors"),
    )
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "labels.safetensors"), "--out", str(tmp_path / "o")],
        r"'image_labels' must be 10 integer labels",
    )
    save_file({"image": im, "text": tx}, str(tmp_path / "no_map.safetensors"))
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "no_map.safetensors"), "--out", str(tmp_path / "o")],
        "no caption_to_image",
    )
    _fails(
        capsys,
        [
            "eval",
            "--image-emb",
            str(tmp_path / "i.npy"),
            "--text-emb",
            str(tmp_path / "t.npy"),
            "--captions-per-image",
            "3",
            "--protocol",
            "coco1k",
            "--out",
            str(tmp_path / "o"),
        ],
        "expects 5000 test images, got 10",
    )


def test_eval_help_is_plain_text_and_explains_protocol_and_title(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in out
    assert "mean over 5 folds of 1K images, needs the 5000-image COCO test split" in out
    assert "f30k = Flickr30K 1K test, needs 1000 images" in out
    assert "heading of metrics.md and title of recall_at_k.png" in out


def _fold_curve(im, tx, n_folds, ks):
    """One caption per image: rank of the true pair = number of strictly better candidates, per fold."""
    size = im.shape[0] // n_folds
    i2t, t2i = [], []
    for f in range(n_folds):
        a, b = im[f * size : (f + 1) * size], tx[f * size : (f + 1) * size]
        S = (a @ b.T).double().numpy()
        d = np.diag(S)
        r_i2t, r_t2i = (S > d[:, None]).sum(1), (S > d[None, :]).sum(0)
        i2t.append([100.0 * (r_i2t < k).mean() for k in ks])
        t2i.append([100.0 * (r_t2i < k).mean() for k in ks])
    return np.mean(i2t, 0), np.mean(t2i, 0)


def test_coco_protocol_recall_curve_is_the_fold_mean_for_coco1k(tmp_path):
    g = torch.Generator().manual_seed(3)
    im = torch.nn.functional.normalize(torch.randn(5000, 8, generator=g), dim=1)
    tx = torch.nn.functional.normalize(im + 0.25 * torch.randn(5000, 8, generator=g), dim=1)
    save_file({"image": im, "text": tx, "caption_to_image": torch.arange(5000)}, str(tmp_path / "e.safetensors"))
    ks = [1, 2, 3, 5, 10, 20, 50, 100]
    i1k, t1k = _fold_curve(im, tx, 5, ks)
    i5k, t5k = _fold_curve(im, tx, 1, ks)
    assert i1k[0] > i5k[0] + 5  # a 1K gallery is easier: the two curves really differ
    out = tmp_path / "o1"
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(tmp_path / "e.safetensors"),
                "--protocol",
                "coco1k",
                "--out",
                str(out),
                "--no-plot",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    curve = m["recall_curve"]
    assert curve["k"] == ks and curve["gallery"] == "mean over 5 folds of 1000 images (coco1k)"
    np.testing.assert_allclose(curve["i2t"], i1k)
    np.testing.assert_allclose(curve["t2i"], t1k)
    assert curve["i2t"][0] == pytest.approx(m["i2t_r1"])  # consistent with the reported fold-mean R@1
    assert "mean over 5 folds of 1000 images (coco1k)" in (out / "metrics.md").read_text()
    out = tmp_path / "o2"
    assert (
        main(["eval", "--embeddings", str(tmp_path / "e.safetensors"), "--protocol", "coco", "--out", str(out)]) == 0
    )
    curve = json.loads((out / "metrics.json").read_text())["recall_curve"]
    np.testing.assert_allclose(curve["coco1k/i2t"], i1k)
    np.testing.assert_allclose(curve["coco5k/t2i"], t5k)
    assert curve["gallery"] == (
        "coco1k/*: mean over 5 folds of 1000 images (coco1k); coco5k/*: all 5000 images x 5000 captions (coco5k)"
    )
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_skips_uni_modal_metrics_when_every_label_is_unique(tmp_path, capsys):
    im, tx, c2i = make(n_img=6, cpi=2)
    f = tmp_path / "emb.safetensors"
    save_file(
        {
            "image": im,
            "text": tx,
            "caption_to_image": c2i,
            "image_labels": torch.arange(6),
            "text_labels": c2i.clone(),
        },
        str(f),
    )
    assert main(["eval", "--embeddings", str(f), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "rsum" in flat and "i2i_" not in flat and "t2t_map_at_r" in flat  # t2t: captions share their image
    assert "i2i skipped: every one of 6 image_labels occurs once" in capsys.readouterr().err


def test_labels_may_be_names_in_any_label_format(tmp_path, capsys):
    """eval --labels takes integers or names, from .txt / .json / .npy / .npz (string arrays too): the metrics
    equal those of the integer codes; a bad entry is named with its file."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 8, generator=g), torch.randn(24, 8, generator=g)
    c2i = torch.arange(12).repeat_interleave(2)
    codes = torch.arange(12) % 3
    save_file({"image": img, "text": txt, "caption_to_image": c2i}, str(tmp_path / "e.safetensors"))
    save_file({"image_labels": codes}, str(tmp_path / "int.safetensors"))
    names = [["cat", "dog", "emu"][int(c)] for c in codes]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "names.json").write_text(json.dumps(names))
    np.save(tmp_path / "names.npy", np.array(names))
    np.savez(tmp_path / "names.npz", image_labels=np.array(names))
    results = {}
    for f in ("int.safetensors", "names.txt", "names.json", "names.npy", "names.npz"):
        assert (
            main(
                [
                    "eval",
                    "--embeddings",
                    str(tmp_path / "e.safetensors"),
                    "--labels",
                    str(tmp_path / f),
                    "--no-plot",
                    "--out",
                    str(tmp_path / f"o_{f}"),
                ]
            )
            == 0
        ), capsys.readouterr().err
        results[f] = json.loads((tmp_path / f"o_{f}" / "metrics.json").read_text())
    keys = [k for k in results["int.safetensors"] if k.startswith(("i2i_", "t2t_"))]
    assert keys and all(results[f][k] == results["int.safetensors"][k] for f in results for k in keys)
    (tmp_path / "bad.json").write_text(json.dumps(["cat", None] + names[2:]))
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(tmp_path / "e.safetensors"),
                "--labels",
                str(tmp_path / "bad.json"),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 1
    )
    assert re.search(r"--labels \S*bad.json: label 1 is None; labels are integers or names", capsys.readouterr().err)


def test_a_datasets_label_column_of_names_is_coded():
    from datasets import Dataset

    from softalign.data.hf import from_hf_dataset

    ds = Dataset.from_dict(
        {"image": ["a.png", "b.png", "c.png"], "caption": ["x", "y", "z"], "label": ["dog", "cat", "dog"]}
    )
    d = from_hf_dataset(ds, image_column="image", caption_column="caption", label_column="label")
    assert d.image_labels.tolist() == [1, 0, 1] and d.label_names == ["cat", "dog"]
