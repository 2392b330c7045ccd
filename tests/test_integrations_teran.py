"""TERAN shim on a stand-in with TERAN's call structure: ``model(*batch)`` -> ``forward(..., ids)`` ->
``forward_loss`` returns a dict of losses that the loop sums; optimizer from ``model.get_parameters()``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from softalign.integrations import teran, vsepp
from softalign.teacher_inputs import TeacherSimilarities
from tests.test_integrations_common import (
    EMBED,
    IMG_DIM,
    VOCAB,
    LogCollector,
    PrecompDataset,
    TinyCache,
    hinge_criterion,
    ids_from_targets,
    l2norm,
    make_data,
    record_loss_inputs,
    single_thread,  # noqa: F401  (autouse fixture)
    soft_loss,
    teacher_sims,
)

REGIONS = 3


def teran_collate(batch):
    """TERAN's precomp collate shape: features, targets, feature lengths, caption lengths, boxes, ids (no sort)."""
    feats = torch.stack([b[0] for b in batch])
    cap_lengths = [len(b[1]) for b in batch]
    targets = torch.zeros(len(batch), max(cap_lengths), dtype=torch.long)
    for row, b in enumerate(batch):
        targets[row, : cap_lengths[row]] = b[1]
    boxes = torch.zeros(len(batch), feats.shape[1], 4)
    return feats, targets, [feats.shape[1]] * len(batch), cap_lengths, boxes, tuple(b[2] for b in batch)


def teran_loader(seed=0):
    images, captions = make_data()
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        PrecompDataset(images, captions, REGIONS), batch_size=10, shuffle=True, collate_fn=teran_collate, generator=g
    )


class JointEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_proj = nn.Linear(IMG_DIM, EMBED)
        self.txt_enc = nn.Embedding(VOCAB, EMBED)
        self.cap_proj = nn.Linear(EMBED, EMBED)

    def forward(self, features, captions, feat_len, cap_len, boxes):
        img_feats = self.img_proj(features).transpose(0, 1)  # S x B x D, as TERAN
        words = self.cap_proj(self.txt_enc(captions))
        mask = (torch.arange(captions.shape[1]).view(1, -1) < torch.tensor(cap_len).view(-1, 1)).float()
        cap_aggr = (words * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return l2norm(img_feats.mean(0)), l2norm(cap_aggr), img_feats, words.transpose(0, 1)


class TERANStandIn(nn.Module):
    """Call structure of TERAN (not its code)."""

    def __init__(self):
        super().__init__()
        self.img_txt_enc = JointEncoder()
        self.Eiters = 0
        self.logger = LogCollector()

    def forward_emb(self, images, captions, img_len, cap_len, boxes):
        img_aggr, cap_aggr, img_feats, cap_feats = self.img_txt_enc(images, captions, img_len, cap_len, boxes)
        return img_aggr, cap_aggr, img_feats, cap_feats, cap_len

    def get_parameters(self):
        enc = self.img_txt_enc
        first = list(enc.img_proj.parameters()) + list(enc.cap_proj.parameters())
        return [first, list(enc.txt_enc.parameters())], 1.0

    def forward_loss(self, img_emb, cap_emb, img_emb_set, cap_emb_seq, img_lengths, cap_lengths):
        losses = {"matching-loss": hinge_criterion(img_emb @ cap_emb.t(), 0.2, True)}
        regions = l2norm(img_emb_set.permute(1, 0, 2))
        words = l2norm(cap_emb_seq.permute(1, 0, 2))
        align = torch.einsum("ird,jwd->ijrw", regions, words).max(2)[0].mean(2)
        losses["alignment-loss"] = hinge_criterion(align, 0.2, True)
        self.logger.update("matching_loss", losses["matching-loss"].item(), img_emb.size(0))
        return losses

    def forward(self, images, targets, img_lengths, cap_lengths, boxes=None, ids=None, *args):
        self.Eiters += 1
        img_aggr, cap_aggr, img_feats, cap_feats, cap_lengths = self.forward_emb(
            images, targets, img_lengths, cap_lengths, boxes
        )
        return self.forward_loss(img_aggr, cap_aggr, img_feats, cap_feats, img_lengths, cap_lengths)


def build_optimizer(model):
    """train.py's construction: get_parameters() must return every parameter."""
    params, multiplier = model.get_parameters()
    if len(params[0] + params[1]) != len(list(model.parameters())):
        raise ValueError("Not all parameters are being returned!")
    return torch.optim.Adam([{"params": params[0]}, {"params": params[1], "lr": 0.01 * multiplier}], lr=0.01)


def train(model, optimizer, epochs):
    totals = []
    for _ in range(epochs):
        for batch in teran_loader():
            model.train()
            optimizer.zero_grad()
            loss_dict = model(*batch)
            loss = sum(loss for loss in loss_dict.values())
            loss.backward()
            optimizer.step()
            totals.append(float(loss.detach()))
    return totals


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return TERANStandIn()


def test_named_terms_are_added_to_the_loss_dict():
    cache = TinyCache()
    plain = fresh_model()
    model = fresh_model()
    loss = soft_loss(base="none", gamma=0.2)
    seen = record_loss_inputs(loss)
    teran.patch(model, loss, cache=cache)
    batch = next(iter(teran_loader()))
    out = model(*batch)
    ref = plain(*batch)
    assert set(out) == {"matching-loss", "alignment-loss", "csa", "usa", "cmc"}
    for k in ref:
        assert torch.equal(out[k], ref[k])
    ids = ids_from_targets(batch[1])
    assert seen[0]["ids"].tolist() == ids.tolist()
    img, cap = plain.forward_emb(*batch[:2], batch[2], batch[3], batch[4])[:2]
    t_img, t_txt = teacher_sims(cache, ids)
    total = loss(img, cap, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt))
    assert torch.allclose(out["csa"] + out["usa"] + out["cmc"], total)
    assert "csa" in model.logger.values


def test_optimizer_from_get_parameters_trains_the_loss_and_the_sum_goes_down():
    model = fresh_model()
    loss = soft_loss(base="none")
    teran.patch(model, loss, cache=TinyCache())
    optimizer = build_optimizer(model)  # the "all parameters" check passes with the loss registered
    assert {id(p) for p in loss.parameters()} <= {id(p) for p in optimizer.param_groups[0]["params"]}
    before = copy.deepcopy(loss.state_dict())
    totals = train(model, optimizer, epochs=6)
    assert sum(totals[-4:]) / 4 < 0.8 * sum(totals[:4]) / 4, totals
    assert not torch.equal(before["usa.image_head.1.weight"], loss.state_dict()["usa.image_head.1.weight"])


def test_checkpoint_round_trip(tmp_path):
    model = fresh_model()
    loss = soft_loss(base="none")
    teran.patch(model, loss, cache=TinyCache())
    train(model, build_optimizer(model), epochs=1)
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    ck = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert any(k.startswith(teran.SUBMODULE + ".usa.") for k in ck["model"])

    other_loss = soft_loss(base="none")
    teran.patch(fresh_model(seed=1), other_loss, cache=TinyCache()).load_state_dict(ck["model"], strict=False)
    assert all(
        torch.equal(other_loss.state_dict()[k], v) if torch.is_tensor(v) else other_loss.state_dict()[k] == v
        for k, v in loss.state_dict().items()
    )
    assert other_loss.calibration == loss.calibration is not None  # the calibrated tau_s travel with the checkpoint
    plain = fresh_model(seed=2)
    result = plain.load_state_dict(ck["model"], strict=False)  # as TERAN's train.py loads checkpoints
    assert all(k.startswith(teran.SUBMODULE) for k in result.unexpected_keys) and result.unexpected_keys
    assert torch.equal(plain.img_txt_enc.img_proj.weight, model.img_txt_enc.img_proj.weight)


def test_loss_moves_with_the_model_and_unpatch_restores_it():
    model = fresh_model()
    loss = soft_loss(base="none")
    teran.patch(model, loss, cache=TinyCache())
    model.double()
    assert loss.usa.image_head[1].weight.dtype == torch.float64
    model.float()
    teran.unpatch(model)
    assert not hasattr(model, teran.SUBMODULE) and "forward" not in model.__dict__
    assert len(model.get_parameters()[0][0]) + len(model.get_parameters()[0][1]) == len(list(model.parameters()))
    reference = fresh_model()
    assert train(model, build_optimizer(model), 1) == train(reference, build_optimizer(reference), 1)


def test_bad_setups_fail_clearly():
    with pytest.raises(ValueError, match="captions_per_image"):
        teran.patch(fresh_model(), soft_loss(alpha=0.0, beta=0.0, gamma=1.0))
    with pytest.raises(TypeError, match="expected a TERAN nn.Module"):
        teran.patch(object(), soft_loss(), cache=TinyCache())
    model = fresh_model()
    teran.patch(model, soft_loss(), cache=TinyCache())
    with pytest.raises(ValueError, match="patched by softalign.integrations.teran, not vsepp"):
        vsepp.unpatch(model)


def test_unpatch_takes_the_loss_out_of_the_optimizer_built_from_get_parameters():
    model = fresh_model()
    loss = soft_loss(base="none")
    teran.patch(model, loss, cache=TinyCache())
    optimizer = build_optimizer(model)  # train.py: the loss's tensors now sit in its first group
    loss_ids = {id(p) for p in loss.parameters()}
    assert sum(id(p) in loss_ids for g in optimizer.param_groups for p in g["params"]) == len(loss_ids)
    train(model, optimizer, 1)  # creates Adam state for them too
    teran.unpatch(model, optimizer=optimizer)
    assert not any(id(p) in loss_ids for g in optimizer.param_groups for p in g["params"])
    assert not any(id(p) in loss_ids for p in optimizer.state)
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 1]  # TERAN's own groups, intact
    optimizer.step()  # still a valid optimizer
    # without it, a warning says that the optimizer still holds them
    model2 = fresh_model()
    teran.patch(model2, soft_loss(base="none"), cache=TinyCache())
    build_optimizer(model2)
    with pytest.warns(
        UserWarning, match=r"still holds the loss's \d+ parameters: pass it as unpatch\(model, optimizer="
    ):
        teran.unpatch(model2)


class TeranCocoLike:
    """TERAN's CocoDataset structure: ids index an annotation list; get_raw_item(i, False)[2] is the COCO image id."""

    def __init__(self, image_of_caption):
        self.image_of_caption = list(image_of_caption)

    def __len__(self):
        return len(self.image_of_caption)

    def get_raw_item(self, index, load_image=True):
        return "root", f"caption {index}", self.image_of_caption[index], None, None, (640, 480)


class BottomUpLike:
    def __init__(self, underlying):
        self.underlying_dataset = underlying

    def __len__(self):
        return len(self.underlying_dataset)


def test_captions_per_image_is_checked_against_the_dataset_and_refused_when_ids_are_not_grouped():
    loss = soft_loss(alpha=0.0, beta=0.0, gamma=1.0)  # CMC only: no teacher needed
    with pytest.raises(ValueError, match=r"captions_per_image cannot be checked for TERAN without the dataset"):
        teran.patch(fresh_model(), loss, captions_per_image=5)
    # COCO: annotation ids are not grouped by image (image 9 has captions 0, 3, 6, ...)
    coco = TeranCocoLike([9, 25, 30, 9, 25, 30, 9, 25, 30, 9, 25, 30, 9, 25, 30])
    with pytest.raises(
        ValueError, match=r"caption 1 shows another image than caption 0, although both are in group 0"
    ):
        teran.patch(
            fresh_model(), soft_loss(alpha=0.0, beta=0.0, gamma=1.0), captions_per_image=5, dataset=BottomUpLike(coco)
        )
    # an image whose captions come in two separate groups is refused too
    split = TeranCocoLike([1, 1, 2, 2, 1, 1])
    with pytest.raises(ValueError, match=r"caption 4 \(group 2\) shows the image of group 0"):
        teran.patch(fresh_model(), soft_loss(alpha=0.0, beta=0.0, gamma=1.0), captions_per_image=2, dataset=split)
    # Flickr30k-style: consecutive captions per image pass
    model = fresh_model()
    teran.patch(
        model,
        soft_loss(alpha=0.0, beta=0.0, gamma=1.0),
        captions_per_image=3,
        dataset=TeranCocoLike([i // 3 for i in range(30)]),
    )
    # the exact map from the dataset, for COCO
    image_ids = teran.dataset_image_ids(coco)
    assert image_ids(torch.tensor([0, 3, 1, 14])).tolist() == [0, 0, 1, 2]


def test_the_gradient_share_counts_terans_own_loss(caplog):
    """TERAN's line (base="none") adds the soft terms to TERAN's own losses: the logged share weighs them against
    those, measured on the tensors TERAN's loss reads (it was 1.0: the share saw the soft terms alone)."""
    import logging

    from softalign.losses.diagnostics import gradient_norms

    model = fresh_model()
    loss = soft_loss(base="none", diagnostics_every=1)
    teran.patch(model, loss, cache=TinyCache())
    batch = next(iter(teran_loader()))
    with caplog.at_level(logging.INFO, logger="softalign"):
        out = model(*batch)
    shares = loss.gradient_shares
    assert {"csa", "usa", "host", "soft"} <= set(shares) and 0 < shares["soft"] < 1
    assert sum(shares[k] for k in ("csa", "usa", "host")) == pytest.approx(1.0)
    # the host's norm, computed independently on TERAN's own loss and the tensors forward_loss received
    plain = fresh_model()
    img, cap, img_set, cap_seq, cap_len = plain.forward_emb(*batch[:2], batch[2], batch[3], batch[4])
    host = plain.forward_loss(img, cap, img_set, cap_seq, batch[2], cap_len)
    want = gradient_norms({"h": host["matching-loss"] + host["alignment-loss"]}, [img, cap, img_set, cap_seq])["h"]
    assert shares["norm_host"] == pytest.approx(want, rel=1e-4)
    assert model.logger.values["grad_share_soft"] == [pytest.approx(shares["soft"])]  # TERAN's LogCollector
    logged = [r.getMessage() for r in caplog.records if "gradient shares" in r.getMessage()]
    assert len(logged) == 1 and "host" in logged[0]
    assert set(out) >= {"matching-loss", "alignment-loss", "csa", "usa"}
