"""SoftAlignLoss's hot path: plain autograd (torch.func, double backward), no host syncs in a standard step, the
soft-label targets computed once per forward, values checked once at the boundary."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softalign import functional as SF
from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities
from tests import reference_formulas as ref

# Tensor methods that read values on the host (a device sync for a CUDA tensor). Tensor.numpy() is not among them:
# it exists only for CPU tensors (the cache's range check of CPU ids uses it), so it can never wait for a device.
SYNCS = ("item", "__bool__", "tolist", "nonzero", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from softalign.teachers.importers import import_npy

    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("c")
    return import_npy(
        d / "cache",
        rng.normal(size=(64, 12)).astype(np.float32),
        [i // 5 for i in range(320)],
        text_features=rng.normal(size=(320, 8)).astype(np.float32),
        progress=False,
    )


def _count_tensor_syncs(fn):
    """Calls of Tensor methods that read values on the host (a device sync on CUDA) while ``fn`` runs."""
    counts: collections.Counter = collections.Counter()
    originals = {n: getattr(torch.Tensor, n) for n in SYNCS}

    def wrap(name):
        def counted(self, *a, **k):
            counts[name] += 1
            return originals[name](self, *a, **k)

        return counted

    for n in SYNCS:
        setattr(torch.Tensor, n, wrap(n))
    try:
        fn()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return dict(counts)


@pytest.mark.parametrize("base", ["vsepp", "infonce"])
def test_a_standard_step_makes_no_host_sync(cache, base):
    loss = SoftAlignLoss(embed_dim=32, base=base, gamma=0.5, cache=cache)
    img = torch.randn(32, 32, requires_grad=True)
    txt = torch.randn(32, 32, requires_grad=True)
    ids = torch.arange(32) * 7 % 320  # CPU ids, as a DataLoader gives them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss(img, txt, ids=ids).backward()  # the first step: calibration, value check, gradient-share diagnostic

    def step():
        loss(img, txt, ids=ids).backward()

    assert _count_tensor_syncs(step) == {}
    # the value check and the diagnostic come back every diagnostics_every steps (and sync then)
    loss._steps = loss.diagnostics_every
    assert sum(_count_tensor_syncs(step).values()) > 0


def test_open_clips_drop_in_makes_no_host_sync(cache):
    from softalign.integrations.open_clip import SoftAlignClipLoss

    loss = SoftAlignClipLoss(cache=cache)
    img = torch.randn(32, 24, requires_grad=True)
    txt = torch.randn(32, 24, requires_grad=True)
    scale = torch.tensor(2.5, requires_grad=True)  # CLIP's log scale, a model parameter
    ids = torch.arange(32) * 7 % 320

    def step():
        sum(loss(img, txt, scale.exp(), output_dict=True, caption_ids=ids).values()).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # the first step: calibration, value check, gradient-share diagnostic
    assert _count_tensor_syncs(step) == {}
    assert scale.grad is not None and img.grad is not None
    # positives from the caption ids through the cache: captions 5k..5k+4 share image k
    ids = torch.arange(32)
    got = loss(img, txt, scale.exp(), output_dict=True, caption_ids=ids)["contrastive_loss"]
    s = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).t()
    want = SF.info_nce(s, 1.0 / scale.exp(), image_ids=ids // 5)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, SF.info_nce(s, 1.0 / scale.exp()))  # the shared images matter


def test_torch_func_grad_and_double_backward_work():
    torch.manual_seed(0)
    b, d = 6, 8
    loss = SoftAlignLoss(embed_dim=d, base="infonce", gamma=0.5, teacher_temperature=0.1, diagnostics_every=0)
    img, txt = torch.randn(b, d), torch.randn(b, d)
    t_img = F.normalize(torch.randn(b, 5), dim=1)
    t_txt = F.normalize(torch.randn(b, 5), dim=1)
    kw = dict(image_ids=torch.arange(b), teacher=TeacherSimilarities(t_img @ t_img.T, t_txt @ t_txt.T))

    def value(x):
        return loss(x, txt, **kw)

    g_func = torch.func.grad(value)(img)
    x = img.clone().requires_grad_(True)
    (g_autograd,) = torch.autograd.grad(value(x), x, create_graph=True)
    torch.testing.assert_close(g_func, g_autograd.detach(), rtol=1e-5, atol=1e-7)
    # create_graph=True gives a differentiable gradient (a gradient penalty trains)
    (hvp,) = torch.autograd.grad(g_autograd.pow(2).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0
    xd = img.double().requires_grad_(True)
    # the smooth terms (InfoNCE, CSA, USA; the hinges and CMC's max are piecewise linear): second derivatives
    # against finite differences
    loss64 = SoftAlignLoss(
        embed_dim=None,
        base="infonce",
        alpha=1.0,
        beta=1.0,
        teacher_temperature=0.1,
        learn_temperatures=False,
        diagnostics_every=0,
    ).double()
    assert torch.autograd.gradgradcheck(
        lambda a: loss64(
            a,
            txt.double(),
            image_ids=kw["image_ids"],
            teacher=TeacherSimilarities(kw["teacher"].image.double(), kw["teacher"].text.double()),
        ),
        (xd,),
    )


def test_soft_labels_are_computed_once_per_forward_and_shared_by_csa_and_usa(monkeypatch):
    calls = []
    real = SF.soft_labels

    def counting(teacher, *a, **k):
        calls.append(teacher)
        return real(teacher, *a, **k)

    monkeypatch.setattr(SF, "soft_labels", counting)
    b = 5
    g = torch.Generator().manual_seed(1)
    e_img = F.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=1)
    e_txt = F.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=1)
    t_img, t_txt = e_img @ e_img.T, e_txt @ e_txt.T
    img = torch.randn(b, 8, generator=g, dtype=torch.float64)
    txt = torch.randn(b, 8, generator=g, dtype=torch.float64)
    loss = SoftAlignLoss(
        embed_dim=None,
        base="none",
        alpha=1.0,
        beta=1.0,
        teacher_temperature=0.3,
        diagnostics_every=0,
        return_parts=True,
        learn_temperatures=False,
    ).double()
    parts = loss(img, txt, image_ids=torch.arange(b), teacher=TeacherSimilarities(t_img, t_txt))
    assert len(calls) == 2  # image and text targets, once each, for both terms
    # the two terms hold equal, separate tau_s buffers: the state dict has no shared tensors and saves as safetensors
    from safetensors.torch import save

    assert float(loss.csa.teacher_temperature.value) == float(loss.usa.teacher_temperature.value) == pytest.approx(0.3)
    save({k: v for k, v in loss.state_dict().items()})
    s = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    assert parts["csa"].item() == pytest.approx(ref.csa(s, t_img, t_txt, 0.45, 0.3), rel=1e-6)
    s_ii = F.normalize(img, dim=1) @ F.normalize(img, dim=1).T
    s_tt = F.normalize(txt, dim=1) @ F.normalize(txt, dim=1).T
    assert parts["usa"].item() == pytest.approx(ref.usa(s_ii, s_tt, t_img, t_txt, 0.45, 0.45, 0.3), rel=1e-6)
    # CSA's fused modes read another matrix: their own targets
    calls.clear()
    fused = SoftAlignLoss(
        embed_dim=None, base="none", alpha=1.0, beta=1.0, csa_mode="add", teacher_temperature=0.5, diagnostics_every=0
    )
    fused(img, txt, image_ids=torch.arange(b), teacher=TeacherSimilarities(t_img, t_txt))
    assert len(calls) == 4


def test_values_are_checked_on_the_first_forward_and_a_failed_check_is_repeated():
    loss = SoftAlignLoss(embed_dim=None, base="infonce", alpha=0.0, beta=0.0, diagnostics_every=0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    bad = img.clone()
    bad[1, 2] = float("nan")
    for _ in range(2):  # a failed first check does not count as done
        with pytest.raises(ValueError, match=r"image_emb contains non-finite values \(first at index \(1, 2\)\)"):
            loss(bad, txt)
    loss(img, txt)
    # later steps do not sync to check the inputs, but a NaN that reaches the loss value is refused there
    # (torch._assert_async: no host sync on an accelerator)
    with pytest.raises(RuntimeError, match="SoftAlignLoss: the loss is not finite"):
        loss(bad, txt)
    loss.check_values_always = True
    with pytest.raises(ValueError, match="non-finite"):
        loss(bad, txt)


def test_infonce_scale_names_say_what_they_mean():
    s = torch.randn(6, 6, dtype=torch.float64)
    ce = SF.info_nce(s, 0.1, reduction="ce")
    cusa = SF.info_nce(s, 0.1, reduction="cusa_mean")
    assert cusa.item() == pytest.approx(ce.item() / 6, rel=1e-12)
    for name in ("mean", "sum", "batchmean"):  # no alias: "mean" never meant the mean over anchors here
        with pytest.raises(ValueError, match="'ce' .* or 'cusa_mean'"):
            SF.info_nce(s, 0.1, reduction=name)
    with pytest.raises(ValueError, match="'ce' .* or 'cusa_mean'"):
        SoftAlignLoss(base="infonce", infonce_reduction="sum")
