"""Uni-modal retrieval (i2i / t2t) against an independent brute-force implementation of
precision@1, R-precision and MAP@R (Musgrave et al. 2020), and text-text Spearman."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softalign.eval import unimodal_retrieval


def brute_force(q, ql, g, gl, leave_one_out):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    S = qn @ gn.T
    p1, rp, mapr = [], [], []
    for i in range(len(q)):
        idx = [j for j in range(len(g)) if not (leave_one_out and j == i)]
        rel = np.array([gl[j] == ql[i] for j in idx])
        R = int(rel.sum())
        if R == 0:
            continue  # lone query: skipped
        order = np.argsort(-S[i, idx], kind="stable")
        hits = rel[order]
        p1.append(float(hits[0]))
        rp.append(hits[:R].sum() / R)
        prec = np.cumsum(hits[:R]) / np.arange(1, R + 1)
        mapr.append((prec * hits[:R]).sum() / R)
    return 100 * np.mean(p1), 100 * np.mean(rp), 100 * np.mean(mapr), len(p1)  # percent, as the metrics


def clustered(n, n_cls, d, seed, noise=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_cls, size=n)
    centers = rng.normal(size=(n_cls, d))
    return (centers[labels] + noise * rng.normal(size=(n, d))).astype(np.float64), labels


def test_leave_one_out_matches_brute_force():
    x, y = clustered(60, 6, 8, seed=0)
    y[0] = 99  # a lone label: skipped by both
    got = unimodal_retrieval(torch.from_numpy(x), torch.from_numpy(y), batch_size=16, prefix="i2i_")
    p1, rp, mapr, n = brute_force(x, y, x, y, True)
    assert got["i2i_precision_at_1"] == pytest.approx(p1, abs=1e-6)
    assert got["i2i_recall_at_1"] == got["i2i_precision_at_1"]
    assert got["i2i_r_precision"] == pytest.approx(rp, abs=1e-6)
    assert got["i2i_map_at_r"] == pytest.approx(mapr, abs=1e-6)
    assert got["i2i_num_queries"] == n == 59
    assert 0 < mapr < 100


def test_query_gallery_matches_brute_force():
    x, y = clustered(50, 5, 8, seed=1)
    g, gy = clustered(40, 5, 8, seed=1)  # same centers (same seed), different samples
    got = unimodal_retrieval(x, y, gallery=g, gallery_labels=gy)
    p1, rp, mapr, n = brute_force(x, y, g, gy, False)
    assert got["precision_at_1"] == pytest.approx(p1, abs=1e-6)
    assert got["r_precision"] == pytest.approx(rp, abs=1e-6)
    assert got["map_at_r"] == pytest.approx(mapr, abs=1e-6)
    assert got["num_queries"] == n


def test_sts_spearman_against_rank_correlation_by_hand():
    """sentence-transformers' evaluator, as softalign.eval.sts runs it, against ranks computed here."""
    from softalign.eval.sts import StsSet, sts_metrics

    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 6))
    b = a + rng.normal(size=(40, 6))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    gold = cos + 0.3 * rng.normal(size=40)
    table = {f"a{i}": a[i] for i in range(40)} | {f"b{i}": b[i] for i in range(40)}
    sts = StsSet("hand", [f"a{i}" for i in range(40)], [f"b{i}" for i in range(40)], gold.tolist())
    got = sts_metrics(lambda s: torch.tensor(np.stack([table[x] for x in s])), sts, batch_size=7)
    rank = lambda v: np.argsort(np.argsort(v))  # no ties in continuous data
    assert got["spearman"] == pytest.approx(100 * np.corrcoef(rank(cos), rank(gold))[0, 1], abs=1e-6)
    assert got["pearson"] == pytest.approx(100 * np.corrcoef(cos, gold)[0, 1], abs=1e-4)


def test_unimodal_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="labels has 4 entries but there are 5 embeddings"):
        unimodal_retrieval(x, torch.arange(4))
    with pytest.raises(ValueError, match="gallery is empty"):
        unimodal_retrieval(x, torch.zeros(5), gallery=torch.zeros(0, 3), gallery_labels=torch.zeros(0))
    with pytest.raises(ValueError, match="no query has a same-label item"):
        unimodal_retrieval(x, torch.arange(5))
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        unimodal_retrieval(bad, torch.zeros(5))


def test_recall_at_k_follows_the_dml_convention():
    """R@K = a same-label item among the K nearest neighbours (leave-one-out and query/gallery), checked against an
    independent loop; R@1 equals precision@1."""
    import numpy as np

    rng = np.random.default_rng(7)
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=40)

    def loop(q, ql, g, gl, k, loo):
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        hits = []
        for i in range(len(q)):
            s = gn @ qn[i]
            if loo:
                s[i] = -np.inf
            if not ((gl == ql[i]).sum() - (1 if loo else 0)) > 0:
                continue  # PML skips lone queries
            hits.append(any(gl[j] == ql[i] for j in np.argsort(-s)[:k]))
        return 100.0 * float(np.mean(hits))  # percent

    m = unimodal_retrieval(emb, labels)
    for k in (2, 4, 8):
        assert m[f"recall_at_{k}"] == pytest.approx(loop(emb, labels, emb, labels, k, True))
    assert m["recall_at_1"] == m["precision_at_1"] == pytest.approx(loop(emb, labels, emb, labels, 1, True))
    mq = unimodal_retrieval(emb[:10], labels[:10], gallery=emb[10:], gallery_labels=labels[10:], ks=(1, 4))
    assert mq["recall_at_4"] == pytest.approx(loop(emb[:10], labels[:10], emb[10:], labels[10:], 4, False))
    assert "recall_at_8" not in mq
    with pytest.raises(ValueError, match="ks must be positive"):
        unimodal_retrieval(emb, labels, ks=(0,))
