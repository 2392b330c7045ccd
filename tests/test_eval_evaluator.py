"""RetrievalEvaluator (sentence-transformers call convention) and the comparison report."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from softalign.eval import RetrievalEvaluator, compare_runs, comparison_table


def vsepp_recalls(S, c2i, ks=(1, 5, 10)):
    """Independent VSE++ i2t/t2i R@K (argsort per query)."""
    out = {}
    i2t = [min(np.where(np.argsort(S[i])[::-1] == c)[0][0] for c in np.where(c2i == i)[0]) for i in range(S.shape[0])]
    t2i = [np.where(np.argsort(S[:, c])[::-1] == c2i[c])[0][0] for c in range(S.shape[1])]
    for pre, r in (("i2t_", np.array(i2t)), ("t2i_", np.array(t2i))):
        for k in ks:
            out[f"{pre}r{k}"] = 100.0 * (r < k).mean()
        out[pre + "medr"] = np.floor(np.median(r)) + 1
        out[pre + "meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{p}r{k}"] for p in ("i2t_", "t2i_") for k in ks)
    return out


class ToyModel:
    """encode_image / encode_text protocol: images and captions are feature tensors; a linear map."""

    def __init__(self, d=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.wi = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.wt = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.calls = []

    def encode_image(self, images, batch_size=32):
        self.calls.append(("image", batch_size))
        return images @ self.wi

    def encode_text(self, captions, batch_size=32):
        self.calls.append(("text", batch_size))
        return captions @ self.wt


def toy_data(n_img=15, cpi=2, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, d, generator=g, dtype=torch.float64)
    c2i = torch.arange(n_img).repeat_interleave(cpi)
    captions = images[c2i] + 0.8 * torch.randn(n_img * cpi, d, generator=g, dtype=torch.float64)
    return images, captions, c2i


def test_evaluator_metrics_prefix_primary_and_csv(tmp_path):
    images, captions, c2i = toy_data()
    model = ToyModel()
    ev = RetrievalEvaluator(
        images, captions, c2i, name="toy", batch_size=7, image_labels=torch.arange(15) % 3, text_labels=c2i
    )
    out = ev(model, output_path=str(tmp_path), epoch=2, steps=10)
    assert ev.primary_metric == "toy_rsum" and ev.greater_is_better
    assert ("image", 7) in model.calls and ("text", 7) in model.calls
    # reference on the normalised embeddings (cosine), computed in float32 like the evaluator
    ie = torch.nn.functional.normalize((images @ model.wi).float(), dim=1)
    te = torch.nn.functional.normalize((captions @ model.wt).float(), dim=1)
    ref = vsepp_recalls((ie @ te.T).double().numpy(), c2i.numpy())
    for k, v in ref.items():
        assert out[f"toy_{k}"] == pytest.approx(v), k
    assert "toy_i2i_map_at_r" in out and "toy_t2t_precision_at_1" in out
    rows = list(csv.reader(open(os.path.join(tmp_path, "retrieval_evaluation_toy_results.csv"))))
    assert rows[0][:2] == ["epoch", "steps"] and rows[1][:2] == ["2", "10"]
    assert float(rows[1][rows[0].index("rsum")]) == pytest.approx(out["toy_rsum"])
    ev(model, output_path=str(tmp_path), epoch=3, steps=20)
    assert len(list(csv.reader(open(os.path.join(tmp_path, "retrieval_evaluation_toy_results.csv"))))) == 3


def test_evaluator_other_model_protocols():
    images, captions, c2i = toy_data(seed=2)

    class EncodeOnly:  # sentence-transformers-like: one encode for both modalities
        def encode(self, items, batch_size=32, convert_to_tensor=True):
            return items * 2.0

    a = RetrievalEvaluator(images, captions, c2i)(EncodeOnly())
    b = RetrievalEvaluator(images, captions, c2i)(None)  # inputs are already embeddings
    c = RetrievalEvaluator(images, captions, c2i, encode_fn=lambda m, i, t: (i, t))(object())
    assert a == b == c
    ref = vsepp_recalls(
        (
            torch.nn.functional.normalize(images.float(), dim=1)
            @ torch.nn.functional.normalize(captions.float(), dim=1).T
        )
        .double()
        .numpy(),
        c2i.numpy(),
    )
    assert a["rsum"] == pytest.approx(ref["rsum"])
    with pytest.raises(TypeError, match="cannot embed with object"):
        RetrievalEvaluator(images, captions, c2i)(object())
    with pytest.raises(ValueError, match="caption_to_image has 29 entries but there are 30 captions"):
        RetrievalEvaluator(images, captions, c2i[:29])
    with pytest.raises(ValueError, match="the model returned 15 image / 3 text embeddings"):
        RetrievalEvaluator(images, captions, c2i, encode_fn=lambda m, i, t: (i, t[:3]))(None)


def test_compare_runs_table_and_files(tmp_path):
    base = {"i2t_r1": 10.0, "i2t_r5": 30.0, "t2i_r1": 8.0, "rsum": 48.0, "folds": [{"x": 1}]}
    cusa = {"i2t_r1": 12.5, "i2t_r5": 31.0, "t2i_r1": 7.0, "rsum": 50.5}
    md = compare_runs({"base": base, "+CUSA": cusa}, out_dir=str(tmp_path), title="base vs +CUSA")
    lines = md.splitlines()
    assert "| metric | base | +CUSA | +CUSA - base |" in lines
    assert "| i2t_r1 | 10.00 | 12.50 | +2.50 |" in lines
    assert "| t2i_r1 | 8.00 | 7.00 | -1.00 |" in lines
    assert not any("folds" in line for line in lines)
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith(("| i2t", "| t2i", "| rsum"))] == [
        "| i2t_r1",
        "| i2t_r5",
        "| t2i_r1",
        "| rsum",
    ]
    png = tmp_path / "comparison_recall_at_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "comparison.md").read_text() == md
    with pytest.raises(ValueError, match="baseline 'x' is not one of the runs"):
        comparison_table({"a": base}, baseline="x")
    with pytest.raises(ValueError, match="no runs"):
        comparison_table({})
