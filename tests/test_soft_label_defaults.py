"""What the one line does with its defaults: calibrated tau_s, term balance, CUSA's head layout, CMC on a hinge."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from softalign import functional as SF
from softalign import soft_labels as cal
from softalign.losses import CSALoss, SoftAlignLoss, USALoss
from softalign.losses.diagnostics import SoftTermsSilentWarning, gradient_shares
from softalign.teacher_inputs import TeacherSimilarities
from tests import reference_formulas as ref


class MatrixCache:
    """A stand-in teacher cache with the attributes the calibration reads (num_captions, caption_to_image)."""

    def __init__(self, num_images=40, per_image=2, d=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.caption_to_image = torch.arange(num_images).repeat_interleave(per_image)
        self.num_captions = len(self.caption_to_image)
        self.num_images = num_images
        self.img = torch.nn.functional.normalize(torch.randn(num_images, d, generator=g), dim=1)
        self.txt = torch.nn.functional.normalize(torch.randn(self.num_captions, d, generator=g), dim=1)

    def image_ids(self, ids):
        return self.caption_to_image[torch.as_tensor(ids)]

    def lookup(self, ids, device=None):
        ids = torch.as_tensor(ids)
        image_ids = self.caption_to_image[ids]
        return image_ids.to(device), self.img[image_ids].to(device), self.txt[ids].to(device)

    def similarities(self, ids, device=None):
        _, i, t = self.lookup(ids, device)
        return i @ i.T, t @ t.T


def _emb(b=8, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g).requires_grad_(), torch.randn(b, d, generator=g).requires_grad_())


def test_auto_teacher_temperature_is_calibrated_once_from_the_cache_and_recorded():
    cache = MatrixCache()
    loss = SoftAlignLoss(embed_dim=12, base="infonce", cache=cache, return_parts=True)
    ids = torch.arange(0, 16, 2)  # 8 captions of 8 images
    img, txt = _emb()
    loss(img, txt, ids=ids)
    rec = loss.calibration
    assert rec is not None and rec["batch_size"] == 8 and rec["source"] == "cache"
    # independent check: the recorded tau_s gives the target entropy on the same batches
    batch_ids = cal.sample_batch_ids(cache.num_captions, 8, rec["num_batches"], rec["seed"], cache.caption_to_image)
    t_img, t_txt = cal.teacher_batches(cache, batch_ids)
    assert cal.normalized_entropy(t_img, rec["image"]) == pytest.approx(loss.soft_label_entropy, abs=1e-6)
    assert cal.normalized_entropy(t_txt, rec["text"]) == pytest.approx(loss.soft_label_entropy, abs=1e-6)
    assert float(loss.usa.teacher_temperature.value) == pytest.approx(rec["image"])
    assert float(loss.csa.text_teacher_temperature.value) == pytest.approx(rec["text"])
    cfg = loss.get_config_dict()
    assert cfg["teacher_temperature"] == (rec["image"], rec["text"]) and cfg["calibration"] == rec
    # not per step: a second batch keeps the values
    loss(*_emb(seed=2), ids=torch.arange(1, 17, 2))
    assert loss.calibration is rec
    # the state dict carries the calibration: a restored loss does not recalibrate
    other = SoftAlignLoss(embed_dim=12, base="infonce", cache=MatrixCache(seed=5))
    other.load_state_dict(loss.state_dict())
    assert other.calibration == rec and not other._needs_calibration
    assert float(other.usa.text_teacher_temperature.value) == pytest.approx(rec["text"])


def test_fixed_cusa_temperature_stays_available():
    cache = MatrixCache()
    loss = SoftAlignLoss(
        embed_dim=12,
        base="infonce",
        cache=cache,
        teacher_temperature=1.0,
        return_parts=True,
        soft_label_reduction="batchmean",
    )
    img, txt = _emb()
    ids = torch.arange(0, 16, 2)
    out = loss(img, txt, ids=ids)
    assert loss.calibration is None and loss.get_config_dict()["teacher_temperature"] == 1.0
    t_i, t_t = cache.similarities(ids)
    want = CSALoss(teacher_temperature=1.0)(img, txt, teacher=TeacherSimilarities(t_i, t_t))
    assert out["csa"].item() == pytest.approx(want.item(), rel=1e-6)


def test_calibrated_values_reach_the_kl_terms():
    img, txt = _emb()
    t_i = SF.cosine_similarity_matrix(torch.randn(8, 5))
    t_t = SF.cosine_similarity_matrix(torch.randn(8, 5))
    loss = SoftAlignLoss(base="none", alpha=1.0, beta=0.0, return_parts=True)
    out = loss(img, txt, teacher=TeacherSimilarities(t_i, t_t))
    assert loss.calibration["source"] == "batch"
    tau_i, tau_t = loss.calibration["image"], loss.calibration["text"]
    s = SF.cosine_similarity_matrix(img.detach().double(), txt.detach().double()).tolist()
    want = (
        ref.kl_rows(s, t_i.double().tolist(), 0.45, tau_i)
        + ref.kl_rows(ref.transpose(s), t_t.double().tolist(), 0.45, tau_t)
    ) / 2
    assert out["csa"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("base,reduction", [("vsepp", "sum"), ("vsepp_sum", "sum"), ("infonce", "batchmean")])
def test_soft_terms_are_reduced_like_the_base(base, reduction):
    img, txt = _emb()
    t = SF.cosine_similarity_matrix(torch.randn(8, 5))
    loss = SoftAlignLoss(embed_dim=None, base=base, alpha=1.0, beta=1.0, teacher_temperature=0.1, return_parts=True)
    assert loss.soft_label_reduction == reduction
    out = loss(img, txt, teacher=TeacherSimilarities(t, t))
    scale = 8.0 if reduction == "sum" else 1.0
    csa = CSALoss(teacher_temperature=0.1)(img, txt, teacher=TeacherSimilarities(t, t))
    usa = USALoss(teacher_temperature=0.1)(img, txt, teacher=TeacherSimilarities(t, t))
    assert out["csa"].item() == pytest.approx(scale * csa.item(), rel=1e-5)
    assert out["usa"].item() == pytest.approx(scale * usa.item(), rel=1e-5)


def test_defaults_resolve_per_base():
    from softalign.losses.combined import DEFAULT_WEIGHTS

    for base, key in (("vsepp", "vsepp"), ("vsepp_sum", "vsepp_sum"), ("infonce", "infonce_ce")):
        loss = SoftAlignLoss(base=base)
        assert (loss.alpha, loss.beta) == DEFAULT_WEIGHTS[key]
    cusa = SoftAlignLoss(base="infonce", infonce_reduction="cusa_mean")
    assert (cusa.alpha, cusa.beta) == (0.1, 0.5) and cusa.soft_label_reduction == "batchmean"
    assert SoftAlignLoss(alpha=0.3).alpha == 0.3
    with pytest.raises(ValueError, match="teacher_temperature must be 'auto'"):
        SoftAlignLoss(teacher_temperature="sharp")
    with pytest.raises(ValueError, match="soft_label_entropy must lie"):
        SoftAlignLoss(soft_label_entropy=1.5)


def test_gradient_share_diagnostic_matches_separate_backward_passes():
    img, txt = _emb()
    t_i = SF.cosine_similarity_matrix(torch.randn(8, 5))
    t_t = SF.cosine_similarity_matrix(torch.randn(8, 5))
    loss = SoftAlignLoss(
        embed_dim=12,
        base="infonce",
        alpha=0.7,
        beta=0.3,
        teacher_temperature=0.2,
        return_parts=True,
        diagnostics_every=1,
    )
    out = loss(img, txt, teacher=TeacherSimilarities(t_i, t_t))
    shares = loss.gradient_shares
    norms = {}
    for k, w in (("base", 1.0), ("csa", 0.7), ("usa", 0.3)):
        g = torch.autograd.grad(w * out[k], [img, txt], retain_graph=True)
        norms[k] = math.sqrt(sum(float((x**2).sum()) for x in g))
    total = sum(norms.values())
    for k, v in norms.items():
        assert shares[k] == pytest.approx(v / total, rel=1e-5)
        assert shares[f"norm_{k}"] == pytest.approx(v, rel=1e-5)
    assert shares["soft"] == pytest.approx((norms["csa"] + norms["usa"]) / total, rel=1e-5)
    assert sum(shares[k] for k in ("base", "csa", "usa")) == pytest.approx(1.0)
    # the diagnostic did not disturb the step: backward still works and equals the plain loss's gradient
    out["loss"].backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_gradient_shares_of_independent_terms():
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    shares = gradient_shares({"base": (x**2).sum(), "csa": x.sum()}, [x])  # norms 10 and sqrt(2)
    assert shares["base"] == pytest.approx(10 / (10 + math.sqrt(2)))
    assert shares["soft"] == pytest.approx(math.sqrt(2) / (10 + math.sqrt(2)))


def test_one_warning_when_the_soft_terms_carry_under_one_percent():
    img, txt = _emb(b=32)
    t = SF.cosine_similarity_matrix(torch.randn(32, 5))
    quiet = SoftAlignLoss(base="vsepp", alpha=1e-4, beta=1e-4, teacher_temperature=1.0, diagnostics_every=1)
    with pytest.warns(SoftTermsSilentWarning, match="carry"):
        quiet(img, txt, teacher=TeacherSimilarities(t, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoftTermsSilentWarning)
        quiet(img, txt, teacher=TeacherSimilarities(t, t))  # once only
        assert quiet.gradient_shares["soft"] < 0.01
        strong = SoftAlignLoss(base="infonce", alpha=1.0, beta=1.0, teacher_temperature=0.05, diagnostics_every=1)
        strong(img, txt, teacher=TeacherSimilarities(t, t))
        assert strong.gradient_shares["soft"] > 0.01
    # no diagnostic outside training or without gradients
    quiet.eval()
    steps = quiet._steps
    quiet(img, txt, teacher=TeacherSimilarities(t, t))
    assert quiet._steps == steps


def test_usa_gradient_never_reaches_the_cross_modal_head():
    from softalign.train.models import DualEncoder, FeatureMLP

    torch.manual_seed(0)
    model = DualEncoder(FeatureMLP(10, 16), FeatureMLP(7, 16), 12, feature_dims=(16, 16))
    loss = SoftAlignLoss(
        embed_dim=(16, 16), base="none", alpha=0.0, beta=1.0, teacher_temperature=0.2, return_parts=True
    )
    t = SF.cosine_similarity_matrix(torch.randn(6, 5))
    img, txt, img_f, txt_f = model(torch.randn(6, 10), torch.randn(6, 7), return_features=True)
    out = loss(img, txt, image_features=img_f, text_features=txt_f, teacher=TeacherSimilarities(t, t))
    out["usa"].backward()
    for head in (model.image_head, model.text_head):
        for p in head.parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    backbone = model.image_encoder.net[0].weight.grad
    assert backbone is not None and torch.count_nonzero(backbone) > 0  # USA trains the shared backbone
    # and the same USA fed the joint embeddings would reach the cross-modal head
    model.zero_grad()
    img, txt = model(torch.randn(6, 10), torch.randn(6, 7))
    SoftAlignLoss(embed_dim=12, base="none", alpha=0.0, beta=1.0, teacher_temperature=0.2)(
        img, txt, teacher=TeacherSimilarities(t, t)
    ).backward()
    assert torch.count_nonzero(model.image_head[1].weight.grad) > 0


def test_cross_modal_head_follows_cusa():
    from softalign.losses import ProjectionHead

    head = ProjectionHead(512, 256)
    assert isinstance(head[0], torch.nn.LayerNorm) and head[1].weight.shape == (256, 512)
    assert head[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(head[1].bias) == 0


def test_cmc_on_a_hinge_base_equals_tgdt_cmc():
    img, txt = _emb()
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    loss = SoftAlignLoss(base="vsepp", alpha=0.0, beta=0.0, gamma=1.0, return_parts=True)
    out = loss(img, txt, image_ids=ids)
    i, t = img.detach().double(), txt.detach().double()
    tgdt = ref.vsepp(SF.cosine_similarity_matrix(i, t), ids.tolist(), 0.2, True) + ref.intra(
        ref.cosine(i), ref.cosine(t), 0.3
    )
    assert out["loss"].item() == pytest.approx(tgdt, rel=1e-5)  # not 2 x hinge + intra
    # on an InfoNCE base CMC brings its own hinge
    nce = SoftAlignLoss(base="infonce", alpha=0.0, beta=0.0, gamma=1.0, return_parts=True)(img, txt, image_ids=ids)
    assert nce["cmc"].item() == pytest.approx(tgdt, rel=1e-5)


def test_fractional_ids_and_empty_batches_are_refused():
    import numpy as np

    cache = MatrixCache()
    loss = SoftAlignLoss(base="infonce", cache=cache)
    img, txt = _emb()
    with pytest.raises(ValueError, match="integer caption ids"):
        loss(img, txt, ids=np.arange(8) + 0.5)
    with pytest.raises(ValueError, match="integer caption ids"):
        loss(img, txt, ids=torch.arange(8, dtype=torch.float32) + 0.5)
    assert torch.isfinite(loss(img, txt, ids=np.arange(8).astype(np.float64)))  # whole floats are ids
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 12), torch.zeros(0, 12), ids=torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("mode", ["add", "dot"])
def test_fused_csa_modes_calibrate_their_fused_matrix(mode):
    t_i = SF.cosine_similarity_matrix(torch.randn(10, 5))
    t_t = SF.cosine_similarity_matrix(torch.randn(10, 5))
    loss = SoftAlignLoss(base="none", alpha=1.0, beta=1.0, csa_mode=mode)
    rec = loss.calibrate(teacher_image_sim=t_i, teacher_text_sim=t_t)
    fused = (t_i + t_t) / 2 if mode == "add" else torch.sqrt(t_i.clamp(min=0) * t_t.clamp(min=0))
    assert rec["csa_fused"] == pytest.approx(cal.calibrate_temperature(fused, loss.soft_label_entropy), rel=1e-6)
    assert float(loss.csa.teacher_temperature.value) == pytest.approx(rec["csa_fused"])
    assert float(loss.usa.teacher_temperature.value) == pytest.approx(rec["image"])  # USA keeps per-matrix values
