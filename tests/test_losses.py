"""Loss modules: wrappers agree with the functional core, temperatures, heads, the combined module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softalign import functional as SF
from softalign.losses import (
    ClampedTemperature,
    CMCLoss,
    CSALoss,
    InfoNCELoss,
    SoftAlignLoss,
    USALoss,
    VSEHingeLoss,
)
from softalign.teacher_inputs import TeacherSimilarities
from tests import reference_formulas as ref


class TableCache:
    """A stand-in teacher cache: fixed teacher embeddings per caption id, images from a caption->image map."""

    def __init__(self, caption_to_image, image_feats, text_feats):
        self.caption_to_image = torch.as_tensor(caption_to_image)
        self.image_feats, self.text_feats = image_feats, text_feats
        self.calls = 0

    def image_ids(self, ids):
        return self.caption_to_image[ids]

    def lookup(self, ids, device=None):
        """The loss's protocol: ``(image_ids, image_emb, text_emb)`` of the batch."""
        self.calls += 1
        image_ids = self.caption_to_image[ids]
        img = F.normalize(self.image_feats[image_ids], dim=1)
        return image_ids.to(device), img.to(device), F.normalize(self.text_feats[ids], dim=1).to(device)


def _batch(b=6, d=8):
    return torch.randn(b, d, requires_grad=True), torch.randn(b, d, requires_grad=True)


def test_vsepp_module_matches_reference_from_embeddings():
    img, txt = _batch()
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    got = VSEHingeLoss(margin=0.2)(img, txt, image_ids=ids)
    scores = SF.cosine_similarity_matrix(img.detach().double(), txt.detach().double())
    assert got.item() == pytest.approx(ref.vsepp(scores, ids.tolist(), 0.2, True), rel=1e-5)


def test_scores_and_embeddings_paths_agree():
    img, txt = _batch()
    scores = SF.cosine_similarity_matrix(img, txt)
    t = SF.cosine_similarity_matrix(torch.randn(6, 3))
    for loss in (VSEHingeLoss(), InfoNCELoss(), CSALoss()):
        kw = {"teacher": TeacherSimilarities(t, t)} if isinstance(loss, CSALoss) else {}
        assert loss(img, txt, **kw).item() == pytest.approx(loss(scores=scores, **kw).item(), rel=1e-6)


def test_temperature_is_clamped_after_a_step_and_frozen_one_has_no_grad():
    t = ClampedTemperature(0.45, (0.1, 0.99))
    with torch.no_grad():
        t.value.fill_(5.0)
    assert t().item() == pytest.approx(0.99)
    with torch.no_grad():
        t.value.fill_(-1.0)
    assert t().item() == pytest.approx(0.1)
    frozen = ClampedTemperature(1.0, learnable=False)
    assert list(frozen.parameters()) == [] and frozen().item() == 1.0
    with pytest.raises(ValueError, match="outside its range"):
        ClampedTemperature(2.0, (0.1, 1.0))


def test_csa_temperature_learns():
    img, txt = _batch()
    t = SF.cosine_similarity_matrix(torch.randn(6, 3))
    loss = CSALoss()
    loss(img, txt, teacher=TeacherSimilarities(t, t)).backward()
    assert loss.temperature.value.grad is not None and loss.temperature.value.grad.abs() > 0
    assert [n for n, _ in loss.named_parameters()] == ["temperature.value"]  # teacher temperature is frozen


def test_usa_heads_follow_cusa_and_match_formula():
    img, txt = _batch(d=8)
    t_i, t_t = SF.cosine_similarity_matrix(torch.randn(6, 5)), SF.cosine_similarity_matrix(torch.randn(6, 4))
    loss = USALoss(embed_dim=(8, 8))
    assert isinstance(loss.image_head[0], torch.nn.LayerNorm) and loss.image_head[1].weight.std() < 0.05
    got = loss(img, txt, teacher=TeacherSimilarities(t_i, t_t))
    with torch.no_grad():
        ui, ut = loss.image_head(img), loss.text_head(txt)
    want = ref.usa(ref.cosine(ui), ref.cosine(ut), t_i, t_t, 0.45, 0.45, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert loss.image_head[1].weight.grad.abs().sum() > 0 and img.grad is not None


def test_usa_with_different_image_and_text_dims():
    loss = USALoss(embed_dim=(10, 6))
    t = SF.cosine_similarity_matrix(torch.randn(4, 3))
    assert torch.isfinite(loss(torch.randn(4, 10), torch.randn(4, 6), teacher=TeacherSimilarities(t, t)))


def test_cmc_module_matches_reference():
    img, txt = _batch()
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    got = CMCLoss()(img, txt, image_ids=ids)
    i, t = img.detach().double(), txt.detach().double()
    want = ref.vsepp(SF.cosine_similarity_matrix(i, t), ids.tolist(), 0.2, True) + ref.intra(
        ref.cosine(i), ref.cosine(t), 0.3
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_combined_equals_weighted_sum_of_parts():
    torch.manual_seed(3)
    img, txt = _batch(d=8)
    cache = TableCache([0, 0, 1, 1, 2, 3, 4, 5], torch.randn(6, 5), torch.randn(8, 4))
    ids = torch.tensor([0, 1, 2, 4, 5, 7])
    loss = SoftAlignLoss(
        embed_dim=8,
        alpha=0.1,
        beta=0.5,
        gamma=0.3,
        cache=cache,
        return_parts=True,
        teacher_temperature=1.0,
        soft_label_reduction="batchmean",
    )
    out = loss(img, txt, ids=ids)
    assert set(out) == {"loss", "base", "csa", "usa", "cmc"}
    _, e_i, e_t = cache.lookup(ids)
    t_i, t_t = e_i @ e_i.T, e_t @ e_t.T
    image_ids = cache.image_ids(ids)
    assert out["base"].item() == pytest.approx(VSEHingeLoss()(img, txt, image_ids=image_ids).item(), rel=1e-6)
    assert out["csa"].item() == pytest.approx(
        CSALoss()(img, txt, teacher=TeacherSimilarities(t_i, t_t)).item(), rel=1e-6
    )
    # on a hinge base CMC adds only TGDT's intra term: base + CMC part == TGDT's CMC
    assert (out["base"] + out["cmc"]).item() == pytest.approx(
        CMCLoss()(img, txt, image_ids=image_ids).item(), rel=1e-6
    )
    total = out["base"] + 0.1 * out["csa"] + 0.5 * out["usa"] + 0.3 * out["cmc"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    grads = {n: p.grad for n, p in loss.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_combined_positives_from_cache_ids_not_batch_position():
    # Captions 0 and 1 show image 0 (cache map). Put them at batch positions 2 and 0 with a huge cross score:
    # an id-blind (diagonal) hinge would count them as hardest negatives; the cache's map must not.
    cache = TableCache([0, 0, 1, 2], torch.randn(3, 5), torch.randn(4, 4))
    ids = torch.tensor([1, 3, 0, 2])  # batch position -> caption id
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    txt[0] = img[2] * 3 + 0.01 * torch.randn(6)  # caption 1 (pos 0) ~ image of pos 2 (image 0 too)
    txt[2] = img[0] * 3 + 0.01 * torch.randn(6)
    got = SoftAlignLoss(alpha=0, beta=0, cache=cache)(img, txt, ids=ids)
    scores = SF.cosine_similarity_matrix(img.double(), txt.double())
    image_ids = [0, 2, 0, 1]  # caption_to_image[ids]
    assert got.item() == pytest.approx(ref.vsepp(scores, image_ids, 0.2, True), rel=1e-5)
    assert got.item() < ref.vsepp(scores, [0, 1, 2, 3], 0.2, True) - 0.1


def test_scores_path_for_cross_attention_models():
    scores = torch.randn(5, 5, requires_grad=True)
    t = SF.cosine_similarity_matrix(torch.randn(5, 3))
    loss = SoftAlignLoss(beta=0.0, return_parts=True)
    out = loss(scores=scores, teacher=TeacherSimilarities(t, t), image_ids=torch.arange(5))
    assert out["base"].item() == pytest.approx(SF.vsepp_hinge(scores.detach()).item(), rel=1e-6)
    out["loss"].backward()
    assert scores.grad is not None
    with pytest.raises(ValueError, match="USA .* need image_emb and text_emb"):
        SoftAlignLoss(beta=0.5)(scores=scores, teacher=TeacherSimilarities(t, t))


def test_mixed_precision_inputs_give_fp32_loss():
    img, txt = torch.randn(4, 6).half(), torch.randn(4, 6).bfloat16()
    t = SF.cosine_similarity_matrix(torch.randn(4, 3))
    out = SoftAlignLoss(embed_dim=6, gamma=1.0)(img, txt, teacher=TeacherSimilarities(t, t))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_config_round_trip_and_unknown_key():
    loss = SoftAlignLoss(embed_dim=16, base="infonce", alpha=0.2, beta=0.0, gamma=0.1, csa_mode="dot")
    cfg = loss.get_config_dict()
    again = SoftAlignLoss.from_config(cfg)
    assert again.get_config_dict() == cfg
    assert isinstance(again.base, InfoNCELoss) and again.usa is None and again.csa.mode == "dot"
    with pytest.raises(ValueError, match=r"unknown SoftAlignLoss option\(s\) \['alfa'\]"):
        SoftAlignLoss.from_config({"alfa": 0.1})
    with pytest.raises(ValueError, match="base must be one of"):
        SoftAlignLoss(base="triplet")


@pytest.mark.parametrize("csa_mode", ["each", "add"])
def test_config_round_trip_after_calibration_gives_the_same_loss(csa_mode):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(8, 5, generator=g)
    t_img, t_txt = t @ t.T / 5, (t + 0.5) @ (t + 0.5).T / 5
    img, txt = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)
    loss = SoftAlignLoss(embed_dim=12, base="infonce", csa_mode=csa_mode, learn_temperatures=False)
    loss.calibrate(teacher_image_sim=t_img, teacher_text_sim=t_txt)
    cfg = loss.get_config_dict()
    again = SoftAlignLoss.from_config(cfg)
    assert again.get_config_dict() == cfg and again.calibration == loss.calibration
    torch.manual_seed(0)
    heads = {k: v for k, v in loss.state_dict().items() if "head" in k}
    again.load_state_dict({**again.state_dict(), **heads})  # the same USA heads (random initialisation)
    a = loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    b = again(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_from_config_refuses_a_miner_it_cannot_carry():
    from softalign.mining import TopKMiner

    cfg = SoftAlignLoss(base="vsepp_sum", miner=TopKMiner(k=3)).get_config_dict()
    with pytest.raises(ValueError, match=r"names a miner \('TopKMiner'\), an object a config cannot carry"):
        SoftAlignLoss.from_config(cfg)
    assert isinstance(SoftAlignLoss.from_config(cfg, miner=TopKMiner(k=3)).miner, TopKMiner)


def test_state_dict_round_trip_restores_heads_and_temperatures():
    a = SoftAlignLoss(embed_dim=8)
    with torch.no_grad():
        a.csa.temperature.value.fill_(0.3)
        a.usa.image_head[1].weight.add_(1.0)
    b = SoftAlignLoss(embed_dim=8)
    b.load_state_dict(a.state_dict())
    assert b.csa.temperature().item() == pytest.approx(0.3)
    torch.testing.assert_close(b.usa.image_head[1].weight, a.usa.image_head[1].weight)


def test_calibrated_state_dict_is_tensors_only_and_round_trips_through_safetensors():
    from safetensors.torch import load, save

    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(3, 8, 8, generator=g), dim=-1)
    a = SoftAlignLoss(embed_dim=8)
    record = a.calibrate(
        teacher_image_sim=e @ e.transpose(1, 2), teacher_text_sim=e.flip(0) @ e.flip(0).transpose(1, 2)
    )
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors / weights_only friendly
    b = SoftAlignLoss(embed_dim=8)
    assert b._needs_calibration
    b.load_state_dict(load(save(state)))
    assert b.calibration == record and not b._needs_calibration
    assert float(b.usa.teacher_temperature.value) == pytest.approx(record["image"])
    c = SoftAlignLoss(embed_dim=8)  # older state dicts held the record as a dict
    c.load_state_dict({**state, "_extra_state": {"calibration": record}})
    assert c.calibration == record and not c._needs_calibration


def test_combined_bad_input_messages():
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    loss = SoftAlignLoss(embed_dim=6)
    with pytest.raises(ValueError, match="need a teacher: give the loss a cache"):
        loss(img, txt)
    with pytest.raises(ValueError, match="image_emb has 4 rows but text_emb has 3"):
        loss(img, txt[:3])
    with pytest.raises(ValueError, match="ids are caption ids: pass image_ids too"):
        SoftAlignLoss(alpha=0, beta=0)(img, txt, ids=torch.arange(4))
    t = SF.cosine_similarity_matrix(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"TeacherSimilarities.image has shape \(5, 5\) but the batch has 4 pairs"):
        loss(img, txt, teacher=TeacherSimilarities(t, t))
    bad = img.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"image_emb contains non-finite values \(first at index \(2, 1\)\)"):
        loss(bad, txt)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        SoftAlignLoss(alpha=-1)


def test_loss_computes_in_fp32_under_autocast():
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    t = SF.cosine_similarity_matrix(torch.randn(6, 3))
    loss = SoftAlignLoss(embed_dim=8, gamma=1.0, return_parts=True)
    plain = loss(img, txt, teacher=TeacherSimilarities(t, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(img, txt, teacher=TeacherSimilarities(t, t))
    for key in plain:
        assert auto[key].dtype == torch.float32
        assert auto[key].item() == pytest.approx(plain[key].item(), rel=1e-6), key


def test_return_parts_per_call_overrides_constructor():
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    loss = SoftAlignLoss(alpha=0, beta=0)
    assert isinstance(loss(img, txt), torch.Tensor)
    parts = loss(img, txt, return_parts=True)
    assert set(parts) == {"loss", "base"} and parts["loss"].item() == pytest.approx(loss(img, txt).item())


def test_temperature_clamp_keeps_an_earlier_graph_valid():
    # two forwards before one backward (e.g. a trainer summing two losses): no in-place autograd error
    loss = CSALoss()
    t = SF.cosine_similarity_matrix(torch.randn(4, 3))
    img, txt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    first = loss(img, txt, teacher=TeacherSimilarities(t, t))
    second = loss(img * 2, txt, teacher=TeacherSimilarities(t, t))
    (first + second).backward()
    assert loss.temperature.value.grad is not None


@pytest.mark.parametrize(
    "embed_dim,base,csa_mode",
    [(None, "vsepp", "each"), (8, "vsepp", "each"), (None, "vsepp_sum", "add"), (None, "infonce", "dot")],
)
def test_combined_fast_path_equals_the_separate_modules_values_and_gradients(embed_dim, base, csa_mode):
    # SoftAlignLoss shares work between its terms (one normalisation/Gram node, USA's similarities without
    # heads, the base hinge as CMC's inter term, the teacher soft labels): values and gradients must be those
    # of the terms computed one by one.
    torch.manual_seed(5)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    t_i, t_t = SF.cosine_similarity_matrix(torch.randn(7, 5)), SF.cosine_similarity_matrix(torch.randn(7, 4))
    loss = SoftAlignLoss(
        embed_dim=embed_dim, base=base, alpha=0.3, beta=0.5, gamma=0.7, csa_mode=csa_mode, return_parts=True
    )
    with torch.no_grad():
        loss.csa.temperature.value.fill_(0.3)
        loss.usa.text_temperature.value.fill_(0.6)
    img, txt = torch.randn(7, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True)
    out = loss(img, txt, image_ids=ids, teacher=TeacherSimilarities(t_i, t_t))
    out["loss"].backward()

    img2, txt2 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    ref_loss = SoftAlignLoss(embed_dim=embed_dim, base=base, alpha=0.3, beta=0.5, gamma=0.7, csa_mode=csa_mode)
    ref_loss.load_state_dict(loss.state_dict())
    kw = dict(teacher=TeacherSimilarities(t_i, t_t))
    hinge = base.startswith("vsepp")
    scale = 7.0 if hinge else 1.0  # on a hinge base (a sum over anchors) the KL terms are summed over anchors too
    cmc = (
        SF.intra_modal_consistency(SF.cosine_similarity_matrix(img2), SF.cosine_similarity_matrix(txt2))
        if hinge
        else ref_loss.cmc(img2, txt2, image_ids=ids)
    )  # a hinge base is CMC's inter term already
    parts = {
        "base": ref_loss.base(img2, txt2, image_ids=ids),
        "csa": scale * ref_loss.csa(img2, txt2, **kw),
        "usa": scale * ref_loss.usa(img2, txt2, **kw),
        "cmc": cmc,
    }
    total = parts["base"] + 0.3 * parts["csa"] + 0.5 * parts["usa"] + 0.7 * parts["cmc"]
    total.backward()
    for key, value in parts.items():
        assert out[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    torch.testing.assert_close(img.grad, img2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt.grad, txt2.grad, rtol=1e-4, atol=1e-6)
    ref_grads = dict(ref_loss.named_parameters())
    for name, p in loss.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_usa_uses_given_similarities_only_without_heads():
    img, txt = torch.randn(5, 6), torch.randn(5, 6)
    t = SF.cosine_similarity_matrix(torch.randn(5, 3))
    s_ii, s_tt = SF.cosine_similarity_matrix(img), SF.cosine_similarity_matrix(txt)
    plain = USALoss()
    assert plain(img, txt, teacher=TeacherSimilarities(t, t), image_sim=s_ii, text_sim=s_tt).item() == pytest.approx(
        plain(img, txt, teacher=TeacherSimilarities(t, t)).item(), rel=1e-6
    )
    heads = USALoss(embed_dim=6)
    wrong = torch.zeros(5, 5)  # ignored: with heads the similarities come after the heads
    assert heads(img, txt, teacher=TeacherSimilarities(t, t), image_sim=wrong, text_sim=wrong).item() == pytest.approx(
        heads(img, txt, teacher=TeacherSimilarities(t, t)).item(), rel=1e-6
    )


def test_standalone_terms_backpropagate_under_autocast():
    # outside SoftAlignLoss the terms run under the caller's autocast (low-precision products); the fused
    # backward passes must accept the low-precision gradients
    t = SF.cosine_similarity_matrix(torch.randn(5, 3))
    img, txt = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    for loss in (USALoss(embed_dim=6), USALoss(), CSALoss(), CMCLoss()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(img, txt, teacher=TeacherSimilarities(t, t))
        out.backward()
        assert torch.isfinite(img.grad).all() and img.grad.dtype == torch.float32
        img.grad = txt.grad = None


def test_infonce_mean_reduction_is_cusa_mean_mode():
    img, txt = _batch()
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    scores = SF.cosine_similarity_matrix(img.detach().double(), txt.detach().double())
    summed = SoftAlignLoss(alpha=0, beta=0, base="infonce")(img, txt, image_ids=ids)
    mean = SoftAlignLoss(alpha=0, beta=0, base="infonce", infonce_reduction="cusa_mean")(img, txt, image_ids=ids)
    assert summed.item() == pytest.approx(ref.info_nce(scores, 0.05, ids.tolist()), rel=1e-5)
    assert mean.item() == pytest.approx(ref.info_nce(scores, 0.05, ids.tolist()) / 6, rel=1e-5)
    with pytest.raises(ValueError, match="reduction must be"):
        InfoNCELoss(reduction="avg")


def test_custom_base_module_is_called_with_scores_and_image_ids():
    class Margin(torch.nn.Module):
        def forward(self, scores, image_ids=None):
            return scores.diagonal().neg().mean()

    img, txt = _batch()
    got = SoftAlignLoss(base=Margin(), alpha=0, beta=0)(img, txt)
    assert got.item() == pytest.approx(-SF.cosine_similarity_matrix(img, txt).diagonal().mean().item(), rel=1e-6)


def test_pml_miner_works_inside_the_combined_loss():
    from pytorch_metric_learning.miners import TripletMarginMiner

    from softalign.mining import PMLMiner

    img, txt = _batch()
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    miner = PMLMiner(TripletMarginMiner(margin=0.5, type_of_triplets="all"))
    got = SoftAlignLoss(alpha=0, beta=0, miner=miner)(img, txt, image_ids=ids)
    want = VSEHingeLoss(miner=miner)(img, txt, image_ids=ids)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
