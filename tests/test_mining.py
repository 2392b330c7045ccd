"""Miners: masks against brute-force definitions; teacher filtering; PML adapter; use inside losses."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.miners import TripletMarginMiner

from softalign import functional as SF
from softalign.losses import SoftAlignLoss, VSEHingeLoss
from softalign.mining import (
    AllNegativesMiner,
    MaxViolationMiner,
    PMLMiner,
    SemiHardMiner,
    TeacherFilteredMiner,
    TopKMiner,
)
from softalign.teacher_inputs import TeacherSimilarities
from tests import reference_formulas as ref


def _scores(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, b, generator=g)


IDS = torch.tensor([0, 0, 1, 2, 3, 4])


def test_top_k_is_the_k_hardest_non_positive_per_anchor():
    s = _scores()
    mined = TopKMiner(k=2)(s, IDS)
    for i in range(6):
        cand = [k for k in range(6) if IDS[k] != IDS[i]]
        best_row = sorted(cand, key=lambda k: -s[i, k].item())[:2]
        best_col = sorted(cand, key=lambda k: -s[k, i].item())[:2]
        assert set(mined.i2t[i].nonzero().flatten().tolist()) == set(best_row)
        assert set(mined.t2i[:, i].nonzero().flatten().tolist()) == set(best_col)


def test_max_violation_miner_reproduces_vsepp_max_violation():
    s = _scores(seed=1)
    mined = MaxViolationMiner()(s, IDS)
    summed_over_mined = SF.vsepp_hinge(s, IDS, max_violation=False, negatives=mined)
    assert summed_over_mined.item() == pytest.approx(ref.vsepp(s.double(), IDS.tolist(), 0.2, True), rel=1e-6)
    everything = AllNegativesMiner()(s, IDS)
    assert SF.vsepp_hinge(s, IDS, max_violation=False, negatives=everything).item() == pytest.approx(
        ref.vsepp(s.double(), IDS.tolist(), 0.2, False), rel=1e-6
    )


def test_semi_hard_definition():
    s = _scores(seed=2) * 0.3
    mined = SemiHardMiner(margin=0.2)(s, IDS)
    for i in range(6):
        for k in range(6):
            neg = IDS[i] != IDS[k]
            want_row = bool(neg and s[i, i] - 0.2 < s[i, k] < s[i, i])
            want_col = bool(neg and s[i, i] - 0.2 < s[k, i] < s[i, i])
            assert bool(mined.i2t[i, k]) == want_row and bool(mined.t2i[k, i]) == want_col


def test_teacher_filter_drops_likely_false_negatives_then_mines():
    s = _scores(seed=3)
    t_img = torch.eye(6)
    t_txt = torch.eye(6)
    # the teacher says captions 2 and 3 describe the same thing: neither may be the other's negative
    t_txt[2, 3] = t_txt[3, 2] = 0.95
    s[2, 3] = s[3, 2] = 10.0  # and the student scores them highest: unfiltered max violation picks them
    plain = MaxViolationMiner()(s, IDS)
    assert plain.i2t[2, 3] and plain.t2i[3, 2]
    filtered = TeacherFilteredMiner(threshold=0.9)(s, IDS, teacher_image_sim=t_img, teacher_text_sim=t_txt)
    assert not filtered.i2t[2, 3] and not filtered.t2i[3, 2] and not filtered.i2t[3, 2]
    assert filtered.i2t[2].sum() == 1  # another negative was mined instead
    image_only = TeacherFilteredMiner(threshold=0.9, source="image")(s, IDS, teacher_image_sim=t_img)
    assert image_only.i2t[2, 3]
    with pytest.raises(ValueError, match="needs teacher similarities"):
        TeacherFilteredMiner()(s, IDS)
    with pytest.raises(ValueError, match="source must be one of"):
        TeacherFilteredMiner(source="both")


def test_teacher_filtered_miner_inside_combined_loss_uses_cache_sims():
    img, txt = torch.randn(6, 5), torch.randn(6, 5)
    t = torch.eye(6)
    t[0, 2] = t[2, 0] = 0.99
    loss = SoftAlignLoss(alpha=0, beta=0, miner=TeacherFilteredMiner(0.9, inner=AllNegativesMiner()), base="vsepp_sum")
    got = loss(img, txt, teacher=TeacherSimilarities(t, t))
    s = SF.cosine_similarity_matrix(img, txt)
    mask = ~torch.eye(6, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = False
    want = SF.vsepp_hinge(s, None, max_violation=False, negatives=SF.MinedNegatives(mask, mask))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_pml_miner_adapter_matches_semihard_triplets():
    torch.manual_seed(4)
    img, txt = torch.randn(8, 4), torch.randn(8, 4)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    pml = TripletMarginMiner(margin=0.5, type_of_triplets="all")
    mined = PMLMiner(pml)(SF.cosine_similarity_matrix(img, txt), ids, image_emb=img, text_emb=txt)
    a, p, n = pml(img, ids, txt, ids)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[a, n] = True
    assert torch.equal(mined.i2t, expected & (ids.view(-1, 1) != ids.view(1, -1)))
    assert not (mined.i2t & (ids.view(-1, 1) == ids.view(1, -1))).any()
    assert torch.isfinite(VSEHingeLoss(miner=PMLMiner(pml))(img, txt, image_ids=ids))
    with pytest.raises(ValueError, match="PMLMiner needs image_emb and text_emb"):
        PMLMiner(pml)(SF.cosine_similarity_matrix(img, txt), ids)


def test_top_k_validates_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopKMiner(k=0)
