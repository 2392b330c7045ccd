"""ECCV Caption / CxC extended positives on COCO 5K, checked against the eccv-caption package's own metric code
on synthetic rankings with the real id lists."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eccv_caption = pytest.importorskip("eccv_caption")

from softalign.eval.extended_positives import coco5k_test_ids, extended_positive_metrics  # noqa: E402


@pytest.fixture(scope="module")
def embeddings():
    """5000 images x 25000 captions in the Karpathy order; captions near their image, plus noise."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5000, 16, generator=g)
    txt = img.repeat_interleave(5, 0) + 1.6 * torch.randn(25000, 16, generator=g)
    return torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)


def test_metrics_equal_the_eccv_caption_package(embeddings):
    img, txt = embeddings
    caps, imgs = coco5k_test_ids()
    ours = extended_positive_metrics(img, txt, positives=("eccv", "cxc", "original"))
    # the package's code, on rankings computed here independently (one full score matrix, no tiles)
    s = img @ txt.t()
    i2t = {int(imgs[i]): [int(caps[j]) for j in row] for i, row in enumerate(s.topk(60, dim=1).indices.tolist())}
    t2i = {int(caps[j]): [int(imgs[i]) for i in row] for j, row in enumerate(s.t().topk(30, dim=1).indices.tolist())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = eccv_caption.Metrics().compute_all_metrics(
            i2t,
            t2i,
            target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_5k_recalls"),
            Ks=(1, 5, 10),
            verbose=False,
        )
    for d in ("i2t", "t2i"):
        assert ours[f"eccv_{d}_map_at_r"] == pytest.approx(100 * ref["eccv_map_at_r"][d], abs=1e-9)
        assert ours[f"eccv_{d}_r_precision"] == pytest.approx(100 * ref["eccv_rprecision"][d], abs=1e-9)
        assert ours[f"eccv_{d}_r1"] == pytest.approx(100 * ref["eccv_r1"][d], abs=1e-9)
        for k in (1, 5, 10):
            assert ours[f"cxc_{d}_r{k}"] == pytest.approx(100 * ref[f"cxc_r{k}"][d], abs=1e-9)
            assert ours[f"original_{d}_r{k}"] == pytest.approx(100 * ref[f"coco_5k_r{k}"][d], abs=1e-9)
    assert 0 < ours["eccv_i2t_map_at_r"] < 100 and ours["cxc_t2i_r10"] > ours["cxc_t2i_r1"]


def test_original_positives_equal_softalign_coco5k_recall(embeddings):
    from softalign.eval import cross_modal_recall

    img, txt = embeddings
    ours = extended_positive_metrics(img, txt, positives=("original",))
    c2i = torch.arange(5000).repeat_interleave(5)
    m = cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, protocol="coco5k")
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert ours[f"original_{d}_r{k}"] == pytest.approx(m[f"{d}_r{k}"], abs=1e-9)


def test_another_row_order_with_its_coco_ids_gives_the_same_metrics(embeddings):
    img, txt = embeddings
    caps, imgs = coco5k_test_ids()
    pi, pt = torch.randperm(5000, generator=torch.Generator().manual_seed(1)), torch.randperm(25000)
    base = extended_positive_metrics(img, txt, positives=("eccv",))
    shuffled = extended_positive_metrics(
        img[pi], txt[pt], positives=("eccv",), caption_ids=caps[pt.numpy()], image_ids=imgs[pi.numpy()]
    )
    assert shuffled == pytest.approx(base, abs=1e-9)


def test_mismatched_order_and_bad_ids_are_refused_by_name(embeddings):
    img, txt = embeddings
    caps, imgs = coco5k_test_ids()
    with pytest.raises(ValueError, match="5000 images x 25000 captions in the Karpathy order; got 4999 images"):
        extended_positive_metrics(img[:4999], txt)
    c2i = np.repeat(np.arange(5000), 5)
    c2i[[7, 12]] = c2i[[12, 7]]  # two captions filed under each other's image
    with pytest.raises(
        ValueError,
        match=rf"caption row 7 \(COCO caption {caps[7]}\) belongs to COCO image "
        rf"{imgs[1]}, but caption_to_image puts it with image row 2",
    ):
        extended_positive_metrics(img, txt, caption_to_image=c2i)
    bad = caps.copy()
    bad[3] = -5
    with pytest.raises(ValueError, match=r"caption_ids\[3\] = -5 is not in the COCO 5K test split"):
        extended_positive_metrics(img, txt, caption_ids=bad, image_ids=imgs)
    with pytest.raises(ValueError, match="positives must name some of eccv, cxc, original"):
        extended_positive_metrics(img, txt, positives=("pmrp",))


def test_cli_reports_extended_positives_and_refuses_them_off_coco5k(embeddings, tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from softalign.cli import main

    img, txt = embeddings
    f = tmp_path / "coco5k.safetensors"
    save_file({"image": img, "text": txt, "caption_to_image": torch.arange(5000).repeat_interleave(5)}, str(f))
    # without COCO ids nothing shows the row order: refused, unless the Karpathy order is stated
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(f),
                "--protocol",
                "coco5k",
                "--positives",
                "eccv",
                "--no-plot",
                "--out",
                str(tmp_path / "refused"),
            ]
        )
        == 1
    )
    assert "the rows carry no COCO ids (coco_caption_ids / coco_image_ids)" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--embeddings",
                str(f),
                "--protocol",
                "coco5k",
                "--positives",
                "eccv",
                "cxc",
                "--row-order",
                "karpathy",
                "--no-plot",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    for key in ("eccv_i2t_map_at_r", "eccv_t2i_r_precision", "eccv_t2i_r1", "cxc_i2t_r5", "cxc_t2i_r10"):
        assert key in flat
    assert main(["eval", "--embeddings", str(f), "--positives", "eccv", "--out", str(tmp_path / "o2")]) == 1
    assert "add --protocol coco5k (got --protocol plain)" in capsys.readouterr().err
