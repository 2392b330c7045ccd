"""`softalign eval` end to end: safetensors or .npy inputs -> metrics.json, metrics.md, recall_at_k.png."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from softalign.cli import main


def vsepp_recalls(S, c2i, ks=(1, 5, 10)):
    i2t = np.array([min(np.where(np.argsort(S[i])[::-1] == c)[0][0] for c in np.where(c2i == i)[0]) for i in range(S.shape[0])])
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
    save_file({"image": im, "text": tx, "caption_to_image": c2i, "image_labels": torch.arange(20) % 4,
               "text_labels": c2i.clone()}, str(f))
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
    assert not list(out.glob(".tmp-*"))  # nothing half-written left behind


def test_eval_from_npy_with_captions_per_image(tmp_path):
    im, tx, c2i = make(n_img=10, cpi=3, seed=1)
    np.save(tmp_path / "i.npy", im.numpy())
    np.save(tmp_path / "t.npy", tx.numpy())
    out = tmp_path / "o"
    assert main(["eval", "--image-emb", str(tmp_path / "i.npy"), "--text-emb", str(tmp_path / "t.npy"),
                 "--captions-per-image", "3", "--out", str(out), "--ks", "1", "2", "--no-plot"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ref, _, _ = vsepp_recalls((im @ tx.T).double().numpy(), c2i.numpy(), ks=(1, 2))
    assert m["rsum"] == pytest.approx(ref["rsum"]) and "i2t_r10" not in m
    assert not (out / "recall_at_k.png").exists()


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_eval_cli_bad_input(tmp_path, capsys):
    im, tx, c2i = make(n_img=10, cpi=3)
    np.save(tmp_path / "i.npy", im.numpy())
    np.save(tmp_path / "t.npy", tx.numpy())
    _fails(capsys, ["eval", "--image-emb", str(tmp_path / "i.npy"), "--text-emb", str(tmp_path / "t.npy"),
                    "--captions-per-image", "4", "--out", str(tmp_path / "o")],
           "10 images x 4 = 40 captions expected, got 30")
    _fails(capsys, ["eval", "--embeddings", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")],
           "embeddings file not found")
    save_file({"image": im, "text": tx}, str(tmp_path / "no_map.safetensors"))
    _fails(capsys, ["eval", "--embeddings", str(tmp_path / "no_map.safetensors"), "--out", str(tmp_path / "o")],
           "no caption_to_image")
    _fails(capsys, ["eval", "--image-emb", str(tmp_path / "i.npy"), "--text-emb", str(tmp_path / "t.npy"),
                    "--captions-per-image", "3", "--protocol", "coco1k", "--out", str(tmp_path / "o")],
           "expects 5000 test images, got 10")
