"""Cross-modal metrics against an independent per-query implementation of VSE++'s i2t / t2i
(fartashf/vsepp evaluation.py), generalised to any number of captions per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softalign.eval import cross_modal_ranks, cross_modal_recall
from softalign.eval.protocols import _fold_metrics as fold_metrics


# --------------------------------------------------------------- independent reference (VSE++)
def vsepp_i2t(S, c2i):
    """VSE++ i2t: for image i, argsort its score row descending; rank = best position among its captions."""
    ranks = np.zeros(S.shape[0])
    for index in range(S.shape[0]):
        inds = np.argsort(S[index])[::-1]
        rank = 1e20
        for i in np.where(c2i == index)[0]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    return ranks


def vsepp_t2i(S, c2i):
    """VSE++ t2i: for caption c, argsort its score column descending; rank = position of its image."""
    ranks = np.zeros(S.shape[1])
    for c in range(S.shape[1]):
        inds = np.argsort(S[:, c])[::-1]
        ranks[c] = np.where(inds == c2i[c])[0][0]
    return ranks


def vsepp_metrics(ranks, ks=(1, 5, 10)):
    out = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks]
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return out + [medr, meanr]


def vsepp_dict(S, c2i, ks=(1, 5, 10)):
    S = np.asarray(S, dtype=np.float64)
    c2i = np.asarray(c2i)
    a = vsepp_metrics(vsepp_i2t(S, c2i), ks)
    b = vsepp_metrics(vsepp_t2i(S, c2i), ks)
    d = {}
    for pre, vals in (("i2t_", a), ("t2i_", b)):
        for k, v in zip(ks, vals[: len(ks)]):
            d[f"{pre}r{k}"] = v
        d[pre + "medr"], d[pre + "meanr"] = vals[-2], vals[-1]
    d["rsum"] = sum(a[: len(ks)]) + sum(b[: len(ks)])
    return d


def tie_free_sims(n_img, n_txt, seed, signal=None, c2i=None):
    """Every entry distinct (a permutation of 0..n-1, exactly representable), plus an optional
    boost of the positive pairs so recalls are not trivial."""
    rng = np.random.default_rng(seed)
    S = rng.permutation(n_img * n_txt).reshape(n_img, n_txt).astype(np.float64)
    if signal is not None:
        S[c2i, np.arange(n_txt)] += signal * n_img * n_txt
        # re-rank globally so every entry is distinct again (an offset can create collisions)
        S = np.argsort(np.argsort(S, axis=None)).reshape(n_img, n_txt).astype(np.float64)
    assert len(np.unique(S)) == S.size
    return S


def assert_same(got, ref):
    assert set(ref) <= set(got)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12, rel=1e-12), k


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("chunk,gchunk", [(None, None), (7, None), (5, 11), (1, 1), (64, 3)])
def test_five_captions_matches_vsepp_reference(chunk, gchunk):
    n_img = 23
    c2i = np.repeat(np.arange(n_img), 5)
    S = tie_free_sims(n_img, 5 * n_img, seed=0, signal=0.05, c2i=c2i)
    got = cross_modal_recall(
        sims=torch.from_numpy(S), caption_to_image=torch.from_numpy(c2i), chunk_size=chunk, gallery_chunk_size=gchunk
    )
    ref = vsepp_dict(S, c2i)
    assert_same(got, ref)
    assert 0 < got["i2t_r1"] < got["i2t_r10"] < 100 and 0 < got["t2i_r1"] < 100  # non-trivial case


def test_any_number_of_captions_shuffled_order():
    rng = np.random.default_rng(1)
    n_img = 17
    per = rng.integers(1, 5, size=n_img)
    c2i = rng.permutation(np.repeat(np.arange(n_img), per))
    S = tie_free_sims(n_img, len(c2i), seed=2, signal=0.5, c2i=c2i)
    ks = (1, 2, 3, 10)
    got = cross_modal_recall(
        sims=S, caption_to_image=c2i, ks=ks, chunk_size=4, gallery_chunk_size=6, return_ranks=True
    )
    assert_same(got, vsepp_dict(S, c2i, ks))
    np.testing.assert_array_equal(got["i2t_ranks"].numpy(), vsepp_i2t(S, c2i))
    np.testing.assert_array_equal(got["t2i_ranks"].numpy(), vsepp_t2i(S, c2i))


def test_embeddings_path_matches_reference_on_their_product():
    g = torch.Generator().manual_seed(3)
    n_img, d = 30, 16
    im = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g, dtype=torch.float64), dim=1)
    c2i = torch.arange(n_img).repeat_interleave(5)
    tx = torch.nn.functional.normalize(
        im[c2i] + 0.9 * torch.randn(5 * n_img, d, generator=g, dtype=torch.float64), dim=1
    )
    S = (im @ tx.T).numpy()
    got = cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i, chunk_size=8, gallery_chunk_size=40)
    assert_same(got, vsepp_dict(S, c2i.numpy()))


def test_scorer_by_indices_and_by_features_bounded_blocks():
    n_img = 19
    c2i = torch.arange(n_img).repeat_interleave(3)
    S = torch.from_numpy(tie_free_sims(n_img, 3 * n_img, seed=4, signal=0.4, c2i=c2i.numpy()))
    seen = []

    def by_index(ii, cc):
        seen.append((ii.numel(), cc.numel()))
        return S[ii][:, cc]

    got = cross_modal_recall(
        scorer=by_index, caption_to_image=c2i, num_images=n_img, chunk_size=4, gallery_chunk_size=10
    )
    assert_same(got, vsepp_dict(S.numpy(), c2i.numpy()))
    assert max(a for a, _ in seen) <= 4
    assert max(b for _, b in seen) <= 12  # off-diagonal pieces <= 10, diagonal tile = 4 images x 3 captions
    assert sum(a * b for a, b in seen) == S.numel()  # every score computed exactly once

    # features scorer: scorer(images_chunk, captions_chunk) with plain Python lists
    images = [("img", i) for i in range(n_img)]
    caps = [("cap", c) for c in range(3 * n_img)]

    def by_feat(ims, cs):
        return S[[i for _, i in ims]][:, [c for _, c in cs]]

    got2 = cross_modal_recall(image_emb=images, text_emb=caps, scorer=by_feat, caption_to_image=c2i, chunk_size=5)
    assert_same(got2, vsepp_dict(S.numpy(), c2i.numpy()))


def test_tie_rule_optimistic_and_pessimistic():
    # image 0 owns captions 0, 1; image 1 owns caption 2
    S = torch.tensor([[0.5, 0.2, 0.5], [0.5, 0.9, 0.1]])
    c2i = torch.tensor([0, 0, 1])
    opt = cross_modal_ranks(sims=S, caption_to_image=c2i)
    pes = cross_modal_ranks(sims=S, caption_to_image=c2i, ties="pessimistic")
    # i2t image 0: best positive 0.5 (caption 0); caption 2 ties at 0.5
    # image 1: positive 0.1, two captions above
    assert opt.i2t.tolist() == [0, 2]
    assert pes.i2t.tolist() == [1, 2]
    # t2i caption 0: image 0 = 0.5, image 1 = 0.5 (tie); caption 1: 0.2 vs 0.9; caption 2: 0.1 vs 0.5
    assert opt.t2i.tolist() == [0, 1, 1]
    assert pes.t2i.tolist() == [1, 1, 1]


def test_fold_metrics_is_mean_of_per_fold_reference():
    n_img, folds = 20, 5
    c2i = np.repeat(np.arange(n_img), 5)
    S = tie_free_sims(n_img, 5 * n_img, seed=5, signal=0.2, c2i=c2i)
    got = fold_metrics(folds, sims=S, caption_to_image=c2i, chunk_size=3)
    size = n_img // folds
    per = [
        vsepp_dict(S[f * size : (f + 1) * size, f * 5 * size : (f + 1) * 5 * size], c2i[: 5 * size])
        for f in range(folds)
    ]
    ref = {k: np.mean([p[k] for p in per]) for k in per[0]}
    assert_same(got, ref)
    assert len(got["folds"]) == folds
    # same through embeddings and through an index scorer
    im = torch.randn(n_img, 8, dtype=torch.float64)
    tx = torch.randn(5 * n_img, 8, dtype=torch.float64)
    S2 = (im @ tx.T).numpy()
    ref2 = {
        k: np.mean(
            [
                vsepp_dict(S2[f * size : (f + 1) * size, f * 5 * size : (f + 1) * 5 * size], c2i[: 5 * size])[k]
                for f in range(folds)
            ]
        )
        for k in ref
    }
    assert_same(fold_metrics(folds, image_emb=im, text_emb=tx, caption_to_image=c2i, chunk_size=3), ref2)
    S2t = torch.from_numpy(S2)
    assert_same(
        fold_metrics(
            folds, scorer=lambda ii, cc: S2t[ii][:, cc], caption_to_image=c2i, num_images=n_img, chunk_size=3
        ),
        ref2,
    )


def test_protocol_size_guards():
    im, tx = torch.randn(10, 4), torch.randn(50, 4)
    c2i = torch.arange(10).repeat_interleave(5)
    with pytest.raises(ValueError, match="expects 5000 test images, got 10"):
        cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i, protocol="coco1k")
    with pytest.raises(ValueError, match="expects 1000 test images"):
        cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i, protocol="f30k")
    with pytest.raises(ValueError, match="unknown protocol"):
        cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i, protocol="coco2k")
    plain = cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i, protocol="plain")
    assert_same(plain, vsepp_dict((im @ tx.T).double().numpy(), c2i.numpy()))


def test_bad_inputs_raise_clear_errors():
    S = torch.rand(4, 8)
    c2i = torch.arange(4).repeat_interleave(2)
    with pytest.raises(ValueError, match="caption_to_image has 7 entries but there are 8 captions"):
        cross_modal_recall(sims=S, caption_to_image=c2i[:7])
    bad = S.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN scores .*image 2, caption 5"):
        cross_modal_recall(sims=bad, caption_to_image=c2i)
    with pytest.raises(ValueError, match="empty gallery"):
        cross_modal_recall(sims=torch.zeros(0, 0), caption_to_image=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="image 3 has no caption"):
        cross_modal_recall(sims=S, caption_to_image=torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match=r"caption_to_image\[1\] = 9 is out of range"):
        cross_modal_recall(sims=S, caption_to_image=torch.tensor([0, 9, 1, 1, 2, 2, 3, 3]))
    with pytest.raises(TypeError, match="integer image indices"):
        cross_modal_recall(sims=S, caption_to_image=c2i.float())
    with pytest.raises(ValueError, match="embedding sizes differ"):
        cross_modal_recall(image_emb=torch.rand(4, 3), text_emb=torch.rand(8, 5), caption_to_image=c2i)
    with pytest.raises(ValueError, match=r"block of shape \(2, 2\)"):
        cross_modal_recall(scorer=lambda ii, cc: torch.zeros(2, 2), caption_to_image=c2i, num_images=4)
    with pytest.raises(ValueError, match="pass num_images"):
        cross_modal_recall(scorer=lambda ii, cc: S[ii][:, cc], caption_to_image=c2i)
    with pytest.raises(ValueError, match="ks must be"):
        cross_modal_recall(sims=S, caption_to_image=c2i, ks=(0, 5))


def test_call_forms_agree():
    im, tx = torch.randn(6, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    c2i = torch.arange(6).repeat_interleave(2)
    ref = vsepp_dict((im @ tx.T).numpy(), c2i.numpy())
    assert_same(cross_modal_recall(sims=im @ tx.T, caption_to_image=c2i), ref)
    assert_same(cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i), ref)
    with pytest.raises(TypeError):
        cross_modal_recall(im @ tx.T, c2i)


def test_non_finite_embeddings_are_refused():
    im, tx = torch.randn(3, 4), torch.randn(6, 4)
    c2i = torch.arange(3).repeat_interleave(2)
    tx[4, 2] = float("inf")
    with pytest.raises(ValueError, match="text_emb row 4 holds NaN or inf"):
        cross_modal_recall(image_emb=im, text_emb=tx, caption_to_image=c2i)
    big = torch.full((3, 4), 3e38)  # finite, but its sum overflows: the exact check must still accept it
    assert not torch.isfinite(big.sum())
    m = cross_modal_recall(image_emb=big, text_emb=torch.randn(6, 4) * 1e-30, caption_to_image=c2i)
    assert "rsum" in m


def test_one_keyword_entry_point_with_protocols_and_bounded_tiles():
    import warnings

    from softalign.eval import cross_modal_recall

    g = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(5000, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(25000, 8, generator=g), dim=1)
    c2i = torch.arange(25000) // 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry point itself warns about nothing
        m1k = cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, protocol="coco1k")
        m5k = cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, protocol="coco5k")
        untiled = cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, gallery_chunk_size=None)
    assert len(m1k["folds"]) == 5 and m1k["rsum"] == pytest.approx(np.mean([f["rsum"] for f in m1k["folds"]]))
    assert {k: m5k[k] for k in untiled} == untiled  # the default gallery tiles change no number
    with pytest.raises(TypeError, match="positional"):  # nothing is guessed from an argument's type
        cross_modal_recall(img, txt, c2i)
    with pytest.raises(ValueError, match="return_ranks needs protocol='plain'"):
        cross_modal_recall(image_emb=img, text_emb=txt, caption_to_image=c2i, protocol="coco1k", return_ranks=True)
