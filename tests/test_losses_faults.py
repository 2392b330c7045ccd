"""SoftAlignLoss on bad or degenerate input: a clear error naming the input, or the correct value."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities


def _teacher(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(b, 8, generator=g), dim=1)
    return t @ t.T


def _call(loss, img, txt, image_ids=None, **kw):
    b = img.shape[0]
    image_ids = torch.arange(b) if image_ids is None else image_ids
    return loss(
        img,
        txt,
        ids=torch.arange(b),
        image_ids=image_ids,
        teacher=TeacherSimilarities(_teacher(b), _teacher(b, 1)),
        **kw,
    )


@pytest.mark.parametrize("base", ["vsepp", "infonce"])
def test_huge_inputs_are_refused_and_large_ones_are_scale_invariant(base):
    loss = SoftAlignLoss(embed_dim=16, base=base, gamma=0.5, teacher_temperature=0.1)
    torch.manual_seed(0)
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    with pytest.raises(ValueError, match=r"image_emb holds values too large for float32 \(max \|x\| = .*e\+20\)"):
        _call(loss, img * 1e20, txt)
    with pytest.raises(ValueError, match=r"text_emb holds values too large"):
        _call(loss, img, txt * 1e25)
    # below overflow the cosine-based loss does not depend on the scale, and its gradient stays finite
    x = (img * 1e17).requires_grad_()
    out = _call(loss, x, txt)
    out.backward()
    assert float(out) == pytest.approx(float(_call(loss, img, txt)), rel=1e-5)
    assert torch.isfinite(x.grad).all()


def test_non_finite_wrong_shape_and_dtype_name_the_input():
    loss = SoftAlignLoss(embed_dim=16, teacher_temperature=0.1)
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    bad = img.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"image_emb contains non-finite values \(first at index \(2, 3\)\)"):
        _call(loss, bad, txt)
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"image_emb contains non-finite"):
        _call(loss, bad, txt)
    with pytest.raises(TypeError, match="image_emb must be a floating-point tensor, got dtype torch.int64"):
        _call(loss, img.long(), txt)
    with pytest.raises(ValueError, match=r"must be \[B, D\], got \(6, 2, 16\)"):
        _call(loss, img.view(6, 2, 8).repeat(1, 1, 2), txt)
    with pytest.raises(ValueError, match="image_emb has 6 rows but text_emb has 7"):
        loss(img, torch.randn(7, 16), image_ids=torch.arange(6))
    with pytest.raises(ValueError, match="the batch is empty"):
        loss(img[:0], txt[:0], image_ids=torch.arange(0))
    t = _teacher(6)
    t[1, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"TeacherSimilarities.image contains non-finite values \(first at index \(1, 1\)\)"
    ):
        loss(img, txt, ids=torch.arange(6), image_ids=torch.arange(6), teacher=TeacherSimilarities(t, _teacher(6)))
    with pytest.raises(ValueError, match=r"TeacherSimilarities.image has shape \(5, 5\) but the batch has 6 pairs"):
        loss(
            img,
            txt,
            ids=torch.arange(6),
            image_ids=torch.arange(6),
            teacher=TeacherSimilarities(_teacher(5), _teacher(6)),
        )


@pytest.mark.parametrize("base", ["vsepp", "infonce"])
def test_a_single_pair_gives_zero_with_one_warning(base):
    loss = SoftAlignLoss(embed_dim=16, base=base, gamma=0.5, teacher_temperature=0.1, return_parts=True)
    x = torch.randn(1, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="a batch of 1 .* pair has no negatives"):
        parts = _call(loss, x, torch.randn(1, 16))
    parts["loss"].backward()
    assert all(float(v) == 0.0 for v in parts.values())
    assert torch.equal(x.grad, torch.zeros_like(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loss
        _call(loss, torch.randn(1, 16), torch.randn(1, 16))


def test_a_batch_of_captions_of_one_image_has_no_negatives():
    """All B captions show one image: the id-aware hinge has no negative (0), InfoNCE's targets are uniform over
    the B positives; every part stays finite and so do the gradients."""
    torch.manual_seed(3)
    b = 5
    img = F.normalize(torch.randn(b, 16), dim=1)
    txt = F.normalize(torch.randn(b, 16), dim=1)
    same = torch.zeros(b, dtype=torch.long)
    hinge = SoftAlignLoss(embed_dim=16, base="vsepp", gamma=0.5, teacher_temperature=0.1, return_parts=True)
    x = img.clone().requires_grad_()
    parts = _call(hinge, x, txt, image_ids=same)
    assert float(parts["base"]) == 0.0
    parts["loss"].backward()
    assert all(math.isfinite(float(v)) for v in parts.values()) and torch.isfinite(x.grad).all()
    nce = SoftAlignLoss(
        embed_dim=16,
        base="infonce",
        alpha=0.0,
        beta=0.0,
        learn_temperatures=False,
        temperature=0.05,
        infonce_reduction="ce",
        return_parts=True,
    )
    got = nce(img, txt, image_ids=same)["base"]
    logits = (img @ txt.T) / 0.05
    ref = 0.5 * (-(logits.log_softmax(1).mean(1)).mean() - (logits.T.log_softmax(1).mean(1)).mean())
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("name", ["VSEHingeLoss", "InfoNCELoss", "CSALoss", "USALoss", "CMCLoss", "SoftAlignLoss"])
def test_every_module_refuses_a_non_finite_loss_on_every_call_not_only_the_first(name):
    """The detailed input check runs once; after it, NaN inputs, overflowing embeddings or a NaN temperature still
    raise, from the loss value (torch._assert_async: no host sync on an accelerator)."""
    import softalign.losses as L

    loss = getattr(L, name)(**({"embed_dim": 16} if name in ("USALoss", "SoftAlignLoss") else {}))
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    teacher = dict(teacher=TeacherSimilarities(_teacher(6), _teacher(6, 1)))
    kw = teacher if name in ("CSALoss", "USALoss", "SoftAlignLoss") else {}
    assert torch.isfinite(loss(img, txt, **kw))  # the first call, checked in detail
    bad = img.clone()
    bad[1, 2] = float("nan")
    # (SoftAlignLoss also re-checks its inputs in detail while no training step has counted: a ValueError naming them)
    with pytest.raises(
        (RuntimeError, ValueError),
        match=rf"{name}: the loss is not finite \(NaN or inf\)|image_emb "
        "contains non-finite values",
    ):
        loss(bad, txt, **kw)
    temperatures = [p for n, p in loss.named_parameters() if "temperature" in n]
    if temperatures:  # a NaN temperature (e.g. after a bad optimizer step)
        with torch.no_grad():
            temperatures[0].fill_(float("nan"))
        with pytest.raises(RuntimeError, match=rf"{name}: the loss is not finite"):
            loss(img, txt, **kw)
    assert temperatures or name in ("VSEHingeLoss", "CMCLoss")  # the hinges have no temperature


def test_a_wrong_embed_dim_names_embed_dim_and_both_sizes():
    loss = SoftAlignLoss(embed_dim=32)  # the embeddings are 16-d
    with pytest.raises(
        ValueError,
        match=r"USA's image head was built for 32-d inputs \(embed_dim = 32\) but the image "
        r"inputs are 16-d",
    ):
        _call(loss, torch.randn(6, 16), torch.randn(6, 16))
    pair = SoftAlignLoss(embed_dim=(16, 24))
    with pytest.raises(ValueError, match=r"USA's text head was built for 24-d inputs .* but the text inputs are 16-d"):
        _call(pair, torch.randn(6, 16), torch.randn(6, 16))
