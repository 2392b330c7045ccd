"""The faiss R@K path against softalign's tiled cross_modal_recall (exact search: the same R@K)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("faiss")
from softalign.eval import cross_modal_recall  # noqa: E402
from softalign.eval.faiss_recall import faiss_recall_at_k  # noqa: E402


@pytest.mark.parametrize("n_img,cpi", [(300, 5), (120, 3)])
def test_faiss_recall_equals_the_tiled_recall(n_img, cpi):
    g = torch.Generator().manual_seed(n_img)
    img = torch.nn.functional.normalize(torch.randn(n_img, 24, generator=g), dim=1)
    c2i = torch.arange(n_img).repeat_interleave(cpi)
    txt = torch.nn.functional.normalize(img[c2i] + 0.9 * torch.randn(len(c2i), 24, generator=g), dim=1)
    ks = (1, 5, 10, 50)
    ours = cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, ks=ks)
    got = faiss_recall_at_k(img, txt, c2i, ks=ks)
    for k in [f"{d}_r{kk}" for d in ("i2t", "t2i") for kk in ks] + ["rsum"]:
        assert got[k] == pytest.approx(ours[k], abs=1e-9), k
    assert 0 < got["i2t_r1"] < got["i2t_r50"] <= 100


def test_faiss_recall_bad_input_is_named():
    with pytest.raises(ValueError, match="one D"):
        faiss_recall_at_k(torch.randn(3, 4), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="positive recall cut-offs"):
        faiss_recall_at_k(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), ks=(0,))
