"""Two-stage re-ranking: top-K by embeddings, fine scorer inside the K; targets outside are misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softalign.eval import cross_modal_ranks, two_stage_ranks, two_stage_rerank


def loop_two_stage(im, tx, c2i, fine_matrix, k):
    """Independent per-query implementation of the documented rule."""
    C = (im @ tx.T).numpy()
    F = fine_matrix.numpy()
    c2i = c2i.numpy()
    i2t, t2i = [], []
    for i in range(C.shape[0]):
        cand = list(np.argsort(-C[i], kind="stable")[:k])
        pos = [c for c in cand if c2i[c] == i]
        if not pos:
            i2t.append(k)
            continue
        best = max(F[i, c] for c in pos)
        i2t.append(sum(F[i, c] > best for c in cand))
    for t in range(C.shape[1]):
        cand = list(np.argsort(-C[:, t], kind="stable")[:k])
        if c2i[t] not in cand:
            t2i.append(k)
            continue
        best = F[c2i[t], t]
        t2i.append(sum(F[j, t] > best for j in cand))
    return np.array(i2t), np.array(t2i)


def data(n_img=12, cpi=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    im = torch.randn(n_img, d, generator=g, dtype=torch.float64)
    c2i = torch.arange(n_img).repeat_interleave(cpi)
    tx = im[c2i] + 1.5 * torch.randn(n_img * cpi, d, generator=g, dtype=torch.float64)
    fine = torch.randn(n_img, n_img * cpi, generator=g, dtype=torch.float64)
    fine[c2i, torch.arange(n_img * cpi)] += 1.0
    return im, tx, c2i, fine


def pair(fine):
    return lambda ii, cc: fine[ii, cc]


@pytest.mark.parametrize("k", [1, 4, 10])
def test_ranks_match_independent_loop(k):
    im, tx, c2i, fine = data()
    got = two_stage_ranks(im, tx, c2i, pair(fine), top_k=k, chunk_size=5)
    ri, rt = loop_two_stage(im, tx, c2i, fine, k)
    np.testing.assert_array_equal(got["i2t"].numpy(), ri)
    np.testing.assert_array_equal(got["t2i"].numpy(), rt)
    if k == 4:  # the case exercises both hits and misses
        assert (rt == k).any() and (ri < k).any()


def test_target_outside_top_k_is_a_miss_even_if_fine_scores_it_highest():
    # caption 0 belongs to image 0 but is the least similar caption by embeddings
    im = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tx = torch.tensor([[-1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]])
    c2i = torch.tensor([0, 0, 1, 1])
    fine = torch.full((2, 4), -5.0)
    fine[0, 0] = 100.0  # the fine scorer would put caption 0 first for image 0 ...
    fine[0, 1] = -10.0  # ... and the in-top-K positive last
    res = two_stage_rerank(im, tx, c2i, pair(fine), top_k=2, ks=(1, 2))
    r = two_stage_ranks(im, tx, c2i, pair(fine), top_k=2)
    # image 0: top-2 by embeddings = captions 1, 2; positive 1 scored below caption 2 -> rank 1
    assert r["i2t"][0] == 1
    # caption 0: top-2 images by embeddings = image 1 (0.0), image 0 (-1.0): its image is a candidate, fine puts it first
    assert r["t2i"][0] == 0
    # with top_k=1 caption 0's image is outside the candidates: a miss although fine[0, 0] is the maximum
    r1 = two_stage_ranks(im, tx, c2i, pair(fine), top_k=1)
    assert r1["t2i"][0] == 1 and r1["i2t"][0] == 0
    res1 = two_stage_rerank(im, tx, c2i, pair(fine), top_k=1, ks=(1,))
    assert res1["two_stage"]["t2i_r1"] == 75.0  # captions 1, 2, 3 hit, caption 0 missed
    assert res1["two_stage"]["t2i_miss"] == 25.0
    assert cross_modal_ranks(sims=fine, caption_to_image=c2i).t2i[0] == 0  # full fine ranking: a hit
    assert res["top_k"] == 2


def test_full_k_equals_full_fine_ranking_and_report_fields():
    im, tx, c2i, fine = data(seed=1)
    res = two_stage_rerank(im, tx, c2i, pair(fine), top_k=10_000, ks=(1, 5))
    full = cross_modal_ranks(sims=fine, caption_to_image=c2i)
    r = two_stage_ranks(im, tx, c2i, pair(fine), top_k=10_000)
    np.testing.assert_array_equal(r["i2t"].numpy(), full.i2t.numpy())
    np.testing.assert_array_equal(r["t2i"].numpy(), full.t2i.numpy())
    for key, v in res["recall_change"].items():
        assert v == pytest.approx(res["two_stage"][key] - res["full_fine"][key])
        assert v == pytest.approx(0.0)
    assert res["speedup"] == pytest.approx(res["time_full_fine_s"] / res["time_two_stage_s"])
    assert res["fine_pairs_two_stage"] == 2 * fine.numel()


def test_two_stage_bad_input():
    im, tx, c2i, fine = data()
    with pytest.raises(ValueError, match=r"R@10 is undefined with top_k=5"):
        two_stage_rerank(im, tx, c2i, pair(fine), top_k=5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        two_stage_ranks(im, tx, c2i, pair(fine), top_k=0)
    bad = fine.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN score"):
        two_stage_ranks(im, tx, c2i, pair(bad), top_k=36)
    with pytest.raises(ValueError, match="returned 1 scores for"):
        two_stage_ranks(im, tx, c2i, lambda ii, cc: torch.zeros(1), top_k=3)
    with pytest.raises(ValueError, match="caption_to_image has 35 entries"):
        two_stage_ranks(im, tx, c2i[:35], pair(fine), top_k=3)
