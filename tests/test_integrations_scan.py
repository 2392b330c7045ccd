"""SCAN shim on a stand-in with SCAN's call structure: the criterion computes the cross-attention scores itself
through module-level ``xattn_score_t2i`` / ``xattn_score_i2t``; the shim must call the scorer once per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softalign.integrations import scan
from softalign.teacher_inputs import TeacherSimilarities
from tests.test_integrations_common import (
    CAPS_PER_IMAGE,
    EMBED,
    IMG_DIM,
    GRUTextEncoder,
    LogCollector,
    TinyCache,
    hinge_criterion,
    id_aware_hinge,
    ids_from_targets,
    l2norm,
    loader,
    record_loss_inputs,
    single_thread,  # noqa: F401  (autouse fixture)
    soft_loss,
    teacher_sims,
    train,
    vse_opt,
)

REGIONS = 3
CALLS = {"t2i": 0, "i2t": 0}
LAST = {}


def _attend(query, context, smooth):
    """query [n, q, D] attends over context [n, c, D] -> attended context [n, q, D]."""
    attn = F.softmax(smooth * query @ context.transpose(1, 2), dim=-1)
    return attn @ context


def xattn_score_t2i(images, captions, cap_lens, opt):
    """[n_image, n_caption] scores: words attend to regions, cosine per word, mean over words."""
    CALLS["t2i"] += 1
    cols = []
    for j in range(captions.shape[0]):
        words = captions[j, : cap_lens[j]].unsqueeze(0).expand(images.shape[0], -1, -1)
        cols.append(F.cosine_similarity(words, _attend(words, images, opt.lambda_softmax), dim=-1).mean(1))
    LAST["scores"] = torch.stack(cols, dim=1)
    return LAST["scores"]


def xattn_score_i2t(images, captions, cap_lens, opt):
    """[n_image, n_caption] scores: regions attend to words, cosine per region, mean over regions."""
    CALLS["i2t"] += 1
    cols = []
    for j in range(captions.shape[0]):
        words = captions[j, : cap_lens[j]].unsqueeze(0).expand(images.shape[0], -1, -1)
        cols.append(F.cosine_similarity(images, _attend(images, words, opt.lambda_softmax), dim=-1).mean(1))
    LAST["scores"] = torch.stack(cols, dim=1)
    return LAST["scores"]


class SCANContrastiveLoss(nn.Module):
    """``criterion(im, s, s_l)``: scores from this module's xattn function, then the hinge."""

    def __init__(self, opt, margin=0.2, max_violation=True):
        super().__init__()
        self.opt, self.margin, self.max_violation = opt, margin, max_violation

    def forward(self, im, s, s_l):
        if self.opt.cross_attn == "t2i":
            scores = xattn_score_t2i(im, s, s_l, self.opt)
        elif self.opt.cross_attn == "i2t":
            scores = xattn_score_i2t(im, s, s_l, self.opt)
        else:
            raise ValueError(self.opt.cross_attn)
        return hinge_criterion(scores, self.margin, self.max_violation)


class RegionEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IMG_DIM, EMBED)

    def forward(self, images):
        return l2norm(self.fc(images))


class SCANStandIn:
    """Call structure of SCAN's model object (not its code)."""

    def __init__(self, opt):
        self.grad_clip = opt.grad_clip
        self.img_enc = RegionEncoder()
        self.txt_enc = GRUTextEncoder(opt.vocab_size, opt.word_dim, opt.embed_size, per_word=True)
        self.criterion = SCANContrastiveLoss(opt, opt.margin, opt.max_violation)
        self.params = list(self.txt_enc.parameters()) + list(self.img_enc.fc.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=opt.learning_rate)
        self.Eiters = 0
        self.logger = LogCollector()

    def state_dict(self):
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

    def load_state_dict(self, state_dict):
        self.img_enc.load_state_dict(state_dict[0])
        self.txt_enc.load_state_dict(state_dict[1])

    def forward_emb(self, images, captions, lengths):
        img_emb = self.img_enc(images)
        cap_emb, cap_lens = self.txt_enc(captions, lengths)
        return img_emb, cap_emb, cap_lens

    def forward_loss(self, img_emb, cap_emb, cap_len, **kwargs):
        loss = self.criterion(img_emb, cap_emb, cap_len)
        self.logger.update("Le", loss.item(), img_emb.size(0))
        return loss

    def train_emb(self, images, captions, lengths, ids=None, *args):
        self.Eiters += 1
        img_emb, cap_emb, cap_lens = self.forward_emb(images, captions, lengths)
        self.optimizer.zero_grad()
        loss = self.forward_loss(img_emb, cap_emb, cap_lens)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.last_loss = float(loss.detach())


def fresh_model(seed=0, **opt):
    torch.manual_seed(seed)
    return SCANStandIn(vse_opt(**opt))


def pooled(img_emb, cap_emb, cap_lens):
    text = torch.stack([cap_emb[j, :n].mean(0) for j, n in enumerate(cap_lens)])
    return img_emb.mean(1), text


def test_scorer_runs_once_per_step_and_its_scores_reach_the_loss():
    model = fresh_model()
    loss = soft_loss(base="vsepp", gamma=0.2)
    seen = record_loss_inputs(loss)
    scan.patch(model, loss, cache=TinyCache())
    CALLS["t2i"] = 0
    batches = list(loader(regions=REGIONS))
    for batch in batches:
        model.train_emb(*batch)
        assert seen[-1]["scores"] is LAST["scores"]  # the very tensor the scorer returned
        assert seen[-1]["ids"].tolist() == ids_from_targets(batch[1]).tolist()
    assert CALLS["t2i"] == len(batches) == len(seen)


def test_value_with_base_none_is_criterion_margin_hinge_plus_soft_terms():
    cache = TinyCache()
    model = fresh_model(max_violation=False)
    loss = soft_loss(base="none", gamma=0.2)
    scan.patch(model, loss, cache=cache)
    images, targets, lengths, ids = next(iter(loader(regions=REGIONS)))
    img, cap, cap_lens = model.forward_emb(images, targets, lengths)
    with model._softalign_patch.capturing(ids):
        got = model.forward_loss(img, cap, cap_lens)
    ids = torch.tensor(ids)
    scores = xattn_score_t2i(img, cap, cap_lens, model.criterion.original.opt)
    p_img, p_txt = pooled(img, cap, cap_lens)
    t_img, t_txt = teacher_sims(cache, ids)
    soft = loss(p_img, p_txt, scores=scores, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt))
    expected = id_aware_hinge(scores, ids // CAPS_PER_IMAGE, 0.2, max_violation=False) + soft
    assert torch.allclose(got, expected, atol=1e-5)
    # evaluation path: the original criterion
    assert torch.allclose(model.forward_loss(img, cap, cap_lens), hinge_criterion(scores, 0.2, False), atol=1e-6)


def test_i2t_scorer_is_found_from_the_criterion_options():
    model = fresh_model(cross_attn="i2t")
    scan.patch(model, soft_loss(), cache=TinyCache())
    CALLS.update(t2i=0, i2t=0)
    model.train_emb(*next(iter(loader(regions=REGIONS))))
    assert CALLS == {"t2i": 0, "i2t": 1}
    bad = fresh_model(cross_attn="both")
    with pytest.raises(ValueError, match="cross_attn must be 't2i' or 'i2t'"):
        scan.patch(bad, soft_loss(), cache=TinyCache())
    assert not scan.is_patched(bad) and "train_emb" not in bad.__dict__


def test_patched_training_lowers_the_loss():
    model = fresh_model()
    loss = soft_loss()
    scan.patch(model, loss, cache=TinyCache())
    before = copy.deepcopy(loss.state_dict())
    losses = train(model, epochs=5, regions=REGIONS)
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    assert not torch.equal(before["usa.text_head.1.weight"], loss.state_dict()["usa.text_head.1.weight"])
    assert "csa" in model.logger.values and "usa" in model.logger.values


def test_checkpoint_round_trip_and_unpatch(tmp_path):
    model = fresh_model()
    original_criterion = model.criterion
    loss = soft_loss()
    scan.patch(model, loss, cache=TinyCache())
    train(model, epochs=1, regions=REGIONS)
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    ck = torch.load(tmp_path / "ck.pth", weights_only=True)
    other_loss = soft_loss()
    scan.patch(fresh_model(seed=1), other_loss, cache=TinyCache()).load_state_dict(ck["model"])
    assert all(_same(other_loss.state_dict()[k], v) for k, v in loss.state_dict().items())

    scan.unpatch(model)
    assert model.criterion is original_criterion and len(model.optimizer.param_groups) == 1
    reference = fresh_model(seed=7)
    reference.load_state_dict(model.state_dict())
    batch = next(iter(loader(regions=REGIONS)))
    img, cap, lens = model.forward_emb(*batch[:3])
    assert torch.equal(model.forward_loss(img, cap, lens), reference.forward_loss(img, cap, lens))


def test_unpatched_training_is_unchanged():
    reference = fresh_model()
    expected = train(reference, epochs=1, regions=REGIONS)
    model = fresh_model()
    scan.unpatch(scan.patch(model, soft_loss(), cache=TinyCache()))
    assert train(model, epochs=1, regions=REGIONS) == expected


def test_mean_pool_checks_lengths_and_custom_pool_is_used():
    img, cap = torch.randn(2, REGIONS, EMBED), torch.randn(2, 4, EMBED)
    with pytest.raises(ValueError, match="cap_lens must hold 2 lengths in \\[1, 4\\]"):
        scan.mean_pool(img, cap, [5, 2])
    with pytest.raises(ValueError, match="\\[B, regions, D\\]"):
        scan.mean_pool(img[:, 0], cap, [4, 2])
    pools = []

    def first_tokens(im, s, s_l):
        pools.append(1)
        return im[:, 0], s[:, 0]

    model = fresh_model()
    loss = soft_loss()
    seen = record_loss_inputs(loss)
    scan.patch(model, loss, cache=TinyCache(), pool=first_tokens)
    images, targets, lengths, ids = next(iter(loader(regions=REGIONS)))
    with torch.no_grad():
        img_emb, cap_emb, _ = model.forward_emb(images, targets, lengths)  # before the step changes weights
    model.train_emb(images, targets, lengths, ids)
    assert pools == [1]
    assert torch.allclose(seen[0]["args"][0], img_emb[:, 0]) and torch.allclose(seen[0]["args"][1], cap_emb[:, 0])


def test_hinge_base_adopts_scans_margin_and_sum_of_hinges_with_a_warning():
    cache = TinyCache()
    model = fresh_model(margin=0.05, max_violation=False)  # SCAN run without --max_violation, --margin 0.05
    loss = soft_loss(base="vsepp")  # max violation, margin 0.2
    with pytest.warns(
        UserWarning,
        match=r"SCAN's criterion uses margin=0.05, max_violation=False .*"
        r"had margin=0.2, max_violation=True.*"
        r"SoftAlignLoss\(base=\"vsepp_sum\", margin=0.05",
    ):
        scan.patch(model, loss, cache=cache)
    assert (loss.base.margin, loss.base.max_violation) == (0.05, False)
    images, targets, lengths, ids = next(iter(loader(regions=REGIONS)))
    img, cap, cap_lens = model.forward_emb(images, targets, lengths)
    with model._softalign_patch.capturing(ids):
        got = model.forward_loss(img, cap, cap_lens)
    ids = torch.tensor(ids)
    scores = xattn_score_t2i(img, cap, cap_lens, model.criterion.original.opt)
    p_img, p_txt = pooled(img, cap, cap_lens)
    t_img, t_txt = teacher_sims(cache, ids)
    parts = loss(
        p_img,
        p_txt,
        scores=scores,
        image_ids=ids // 5,
        teacher=TeacherSimilarities(t_img, t_txt),
        return_parts=True,
    )
    expected = (
        id_aware_hinge(scores, ids // CAPS_PER_IMAGE, 0.05, max_violation=False)
        + loss.alpha * parts["csa"]
        + loss.beta * parts["usa"]
    )
    assert torch.allclose(got, expected, atol=1e-5)
    scan.unpatch(model)
    assert (loss.base.margin, loss.base.max_violation) == (0.2, True)


def test_match_criterion_false_keeps_the_loss_settings_and_warns():
    model = fresh_model(margin=0.05, max_violation=False)
    loss = soft_loss(base="vsepp")
    with pytest.warns(UserWarning, match="keeping the loss's settings"):
        scan.patch(model, loss, cache=TinyCache(), match_criterion=False)
    assert (loss.base.margin, loss.base.max_violation) == (0.2, True)


def _same(a, b) -> bool:
    """Equal state-dict entries: tensors element-wise, extra state (the loss's calibration record) by value."""
    return torch.equal(a, b) if torch.is_tensor(a) else a == b
