"""Calibrated soft-label temperature and the soft-label statistics, against independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softalign import soft_labels as cal


def _np_entropy(sims: np.ndarray, tau: float) -> float:
    """Mean normalised row entropy, written out with numpy (float64)."""
    out = []
    for mat in sims.reshape(-1, sims.shape[-2], sims.shape[-1]):
        for row in mat:
            z = row / tau
            p = np.exp(z - z.max())
            p /= p.sum()
            out.append(-(p * np.log(np.where(p > 0, p, 1.0))).sum() / math.log(len(row)))
    return float(np.mean(out))


def _teacher(n=3, b=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, b, d, generator=g), dim=-1)
    return x @ x.transpose(1, 2)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8, 0.95])
def test_calibrated_temperature_hits_the_target_entropy(target):
    sims = _teacher()
    tau = cal.calibrate_temperature(sims, target)
    assert _np_entropy(sims.numpy().astype(np.float64), tau) == pytest.approx(target, abs=1e-6)
    assert cal.normalized_entropy(sims, tau) == pytest.approx(target, abs=1e-6)


def test_entropy_rises_with_temperature_and_cusa_tau_is_near_uniform():
    sims = _teacher(b=64, d=32)
    hs = [cal.normalized_entropy(sims, t) for t in (0.01, 0.05, 0.1, 0.3, 1.0, 10.0)]
    assert all(a < b for a, b in zip(hs, hs[1:]))
    assert hs[4] > 0.95  # tau_s = 1 on cosines of random 32-d vectors: almost uniform soft labels


def test_soft_label_stats_match_a_direct_computation():
    sims = _teacher(n=2, b=10)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 3, 0], [1, 1, 1, 0, 0, 2, 2, 3, 3, 3]])
    tau = 0.2
    got = cal.soft_label_stats(sims, tau, labels)
    p = torch.softmax(sims.double() / tau, dim=-1).numpy()
    lab = labels.numpy()
    diag, same, chance = [], [], []
    for n in range(2):
        for i in range(10):
            others = [j for j in range(10) if j != i]
            off = sum(p[n, i, j] for j in others)
            same.append(sum(p[n, i, j] for j in others if lab[n, j] == lab[n, i]) / off)
            chance.append(sum(lab[n, j] == lab[n, i] for j in others) / 9)
            diag.append(p[n, i, i])
    assert got["diagonal_mass"] == pytest.approx(np.mean(diag), rel=1e-9)
    assert got["same_label_mass"] == pytest.approx(np.mean(same), rel=1e-9)
    assert got["same_label_chance"] == pytest.approx(np.mean(chance), rel=1e-9)
    assert got["entropy"] == pytest.approx(_np_entropy(sims.double().numpy(), tau), rel=1e-9)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="target_entropy must lie in"):
        cal.calibrate_temperature(_teacher(), 1.0)
    with pytest.raises(ValueError, match="not reachable"):
        cal.calibrate_temperature(torch.ones(4, 4), 0.5)  # constant rows: always uniform
    with pytest.raises(ValueError, match=r"\[B, B\]"):
        cal.calibrate_temperature(torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        cal.calibrate_temperature(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        cal.soft_label_stats(_teacher(n=1, b=5), 0.1, torch.arange(4))


def test_batches_by_image_hold_one_caption_of_distinct_images():
    c2i = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    ids = cal.sample_batch_ids(12, 5, 20, seed=3, caption_to_image=c2i)
    assert ids.shape == (20, 5)
    for row in ids:
        assert len(set(c2i[row].tolist())) == 5
    again = cal.sample_batch_ids(12, 5, 20, seed=3, caption_to_image=c2i)
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="exceeds the 6 images"):
        cal.sample_batch_ids(12, 7, 1, caption_to_image=c2i)


def test_calibrating_on_a_batch_of_one_says_what_to_do(tmp_path):
    import numpy as np

    from softalign.losses import SoftAlignLoss
    from softalign.teachers import TeacherCache
    from softalign.teachers.importers import import_npy

    rng = np.random.default_rng(0)
    import_npy(
        tmp_path / "c",
        rng.normal(size=(4, 6)).astype(np.float32),
        [0, 0, 1, 1, 2, 2, 3, 3],
        text_features=rng.normal(size=(8, 5)).astype(np.float32),
        progress=False,
    )
    loss = SoftAlignLoss(embed_dim=8, cache=TeacherCache.load(tmp_path / "c"))
    with pytest.raises(
        ValueError,
        match=r"batch_size must be >= 2 to calibrate soft labels, got 1: .*"
        r"loss.calibrate\(cache, batch_size=B\).*teacher_temperature=1.0",
    ):
        loss(torch.randn(1, 8), torch.randn(1, 8), ids=torch.tensor([3]))
