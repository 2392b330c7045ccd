"""VSE++ shim on a stand-in with VSE++'s call structure (train_emb -> forward_emb -> forward_loss -> criterion)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from softalign.integrations import vsepp
from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherSimilarities
from tests.test_integrations_common import (
    CAPS_PER_IMAGE,
    EMBED,
    TinyCache,
    VSEStandIn,
    hinge_criterion,
    id_aware_hinge,
    ids_from_targets,
    loader,
    record_loss_inputs,
    single_thread,  # noqa: F401  (autouse fixture)
    soft_loss,
    teacher_sims,
    train,
    vse_opt,
)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return VSEStandIn(vse_opt())


def test_ids_follow_their_rows_through_the_length_sort():
    cache = TinyCache()
    model = fresh_model()
    loss = soft_loss()
    seen = record_loss_inputs(loss)
    vsepp.patch(model, loss, cache=cache)
    batch = next(iter(loader()))
    images, targets, lengths, ids = batch
    assert list(ids) != sorted(ids)  # the collate reordered the batch
    model.train_emb(*batch)
    assert len(seen) == 1
    true_ids = ids_from_targets(targets)  # read back from the tokens of each row
    assert seen[0]["ids"].tolist() == true_ids.tolist()
    assert seen[0]["image_ids"].tolist() == (true_ids // CAPS_PER_IMAGE).tolist()
    t_img, t_txt = teacher_sims(cache, true_ids)
    assert seen[0]["teacher"] is cache  # the loss reads the teacher at the ids it gets
    _, e_img, e_txt = cache.lookup(seen[0]["ids"])
    assert torch.allclose(e_img @ e_img.T, t_img)
    assert torch.allclose(e_txt @ e_txt.T, t_txt)


def test_patched_forward_loss_equals_independent_computation():
    cache = TinyCache()
    model = fresh_model()
    loss = soft_loss(base="none", gamma=0.2)
    vsepp.patch(model, loss, cache=cache)
    images, targets, lengths, ids = next(iter(loader()))
    img, cap = model.forward_emb(images, targets, lengths)
    rec = model._softalign_patch
    with rec.capturing(ids):
        got = model.forward_loss(img, cap)
    t_img, t_txt = teacher_sims(cache, torch.tensor(ids))
    soft = loss(img, cap, image_ids=torch.tensor(ids) // 5, teacher=TeacherSimilarities(t_img, t_txt))
    assert torch.allclose(got, hinge_criterion(img @ cap.t(), 0.2, True) + soft)
    for name in ("csa", "usa", "cmc"):
        assert name in model.logger.values
    # evaluation path (encode_data calls forward_loss outside train_emb): VSE++'s criterion only
    assert torch.allclose(model.forward_loss(img, cap), hinge_criterion(img @ cap.t(), 0.2, True))


def test_loss_with_base_replaces_criterion():
    cache = TinyCache()
    model = fresh_model()
    loss = soft_loss(base="vsepp")
    vsepp.patch(model, loss, cache=cache)
    calls = []
    model.criterion.register_forward_hook(lambda *a: calls.append(1))
    images, targets, lengths, ids = next(iter(loader()))
    img, cap = model.forward_emb(images, targets, lengths)
    with model._softalign_patch.capturing(ids):
        got = model.forward_loss(img, cap)
    t_img, t_txt = teacher_sims(cache, torch.tensor(ids))
    assert torch.allclose(
        got, loss(img, cap, image_ids=torch.tensor(ids) // 5, teacher=TeacherSimilarities(t_img, t_txt))
    )
    assert calls == [] and "Le" in model.logger.values


def test_patched_training_lowers_the_loss_and_trains_heads_and_temperatures():
    model = fresh_model()
    loss = soft_loss(base="vsepp")
    vsepp.patch(model, loss, cache=TinyCache())
    assert len(model.optimizer.param_groups) == 2
    assert {id(p) for p in loss.parameters()} <= {id(p) for p in model.params}  # clipped with the rest
    before = copy.deepcopy(loss.state_dict())
    losses = train(model, epochs=6)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    after = loss.state_dict()
    assert not torch.equal(before["usa.image_head.1.weight"], after["usa.image_head.1.weight"])
    assert not torch.equal(before["csa.temperature.value"], after["csa.temperature.value"])


def test_checkpoint_round_trip(tmp_path):
    model = fresh_model()
    loss = soft_loss()
    vsepp.patch(model, loss, cache=TinyCache())
    train(model, epochs=1)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"model": model.state_dict(), "Eiters": model.Eiters}, path)
    checkpoint = torch.load(path, weights_only=True)

    restored_loss = soft_loss()
    restored = vsepp.patch(fresh_model(seed=1), restored_loss, cache=TinyCache())
    restored.load_state_dict(checkpoint["model"])
    for key, value in loss.state_dict().items():
        assert _same(restored_loss.state_dict()[key], value), key
    for a, b in zip(model.state_dict()[:2], restored.state_dict()[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # the original VSE++ code loads the patched checkpoint (it reads [0] and [1] only) ...
    plain = fresh_model(seed=2)
    plain.load_state_dict(checkpoint["model"])
    assert torch.equal(plain.img_enc.fc.weight, model.img_enc.fc.weight)
    # ... and a patched model loads a checkpoint saved before patching, keeping its loss as initialised
    fresh_loss = soft_loss()
    init = copy.deepcopy(fresh_loss.state_dict())
    vsepp.patch(fresh_model(seed=3), fresh_loss, cache=TinyCache()).load_state_dict(fresh_model(4).state_dict())
    assert all(_same(init[k], v) for k, v in fresh_loss.state_dict().items())
    with pytest.raises(ValueError, match="softalign loss state"):
        restored.load_state_dict(fresh_model(5).state_dict() + [{"softalign_loss": [1, 2]}])


def test_unpatched_path_is_unchanged():
    reference = fresh_model()
    ref_losses = train(reference, epochs=1)

    model = fresh_model()
    vsepp.patch(model, soft_loss(), cache=TinyCache())
    assert vsepp.is_patched(model)
    vsepp.unpatch(model)
    assert not vsepp.is_patched(model)
    assert len(model.optimizer.param_groups) == 1 and len(model.params) == len(reference.params)
    assert {"train_emb", "forward_loss", "state_dict", "load_state_dict", "_softalign_patch"}.isdisjoint(
        model.__dict__
    )
    assert train(model, epochs=1) == ref_losses
    for a, b in zip(model.state_dict(), reference.state_dict()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not patched by softalign.integrations.vsepp"):
        vsepp.unpatch(model)


def test_without_cache_image_ids_come_from_captions_per_image():
    model = fresh_model()
    loss = SoftAlignLoss(embed_dim=EMBED, alpha=0.0, beta=0.0, gamma=0.5)  # CMC needs no teacher
    seen = record_loss_inputs(loss)
    vsepp.patch(model, loss, captions_per_image=CAPS_PER_IMAGE)
    batch = next(iter(loader()))
    model.train_emb(*batch)
    assert seen[0]["image_ids"].tolist() == (ids_from_targets(batch[1]) // CAPS_PER_IMAGE).tolist()


def test_bad_setups_fail_clearly():
    with pytest.raises(ValueError, match="need teacher similarities"):
        vsepp.patch(fresh_model(), soft_loss())
    with pytest.raises(TypeError, match="expected a VSE\\+\\+ model with train_emb"):
        vsepp.patch(object(), soft_loss(), cache=TinyCache())
    model = fresh_model()
    del model.optimizer
    with pytest.raises(ValueError, match="no .optimizer"):
        vsepp.patch(model, soft_loss(), cache=TinyCache())
    model = fresh_model()
    vsepp.patch(model, soft_loss(), cache=TinyCache())
    with pytest.raises(ValueError, match="already patched"):
        vsepp.patch(model, soft_loss(), cache=TinyCache())


def test_hinge_base_adopts_vsepp_defaults_sum_of_hinges_and_opt_margin():
    """VSE++ without --max_violation (its default) sums the hinges; the replacing base must do the same."""
    cache = TinyCache()
    torch.manual_seed(0)
    model = VSEStandIn(vse_opt(margin=0.1, max_violation=False))
    loss = soft_loss(base="vsepp", gamma=0.2)
    with pytest.warns(UserWarning) as caught:
        vsepp.patch(model, loss, cache=cache)
    (w,) = [w for w in caught if "criterion uses" in str(w.message)]
    msg = str(w.message)
    for needle in (
        "VSE++'s criterion uses margin=0.1, max_violation=False",
        "--margin 0.1",
        "no --max_violation",
        "had margin=0.2, max_violation=True",
        'SoftAlignLoss(base="vsepp_sum", margin=0.1, ...)',
        "match_criterion=False",
    ):
        assert needle in msg, msg
    assert w.filename == __file__  # points at the line that called patch
    assert (loss.base.margin, loss.base.max_violation) == (0.1, False)
    images, targets, lengths, ids = next(iter(loader()))
    img, cap = model.forward_emb(images, targets, lengths)
    with model._softalign_patch.capturing(ids):
        got = model.forward_loss(img, cap)
    ids = torch.tensor(ids)
    t_img, t_txt = teacher_sims(cache, ids)
    parts = loss(img, cap, image_ids=ids // 5, teacher=TeacherSimilarities(t_img, t_txt), return_parts=True)
    hinge = id_aware_hinge(img @ cap.t(), ids // CAPS_PER_IMAGE, 0.1, max_violation=False)
    assert torch.allclose(parts["base"], hinge, atol=1e-5)
    assert torch.allclose(
        got, hinge + loss.alpha * parts["csa"] + loss.beta * parts["usa"] + loss.gamma * parts["cmc"], atol=1e-5
    )
    vsepp.unpatch(model)
    assert (loss.base.margin, loss.base.max_violation) == (0.2, True)


def test_matching_criterion_is_silent_and_other_cases_keep_the_loss_settings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vsepp.patch(fresh_model(), soft_loss(base="vsepp"), cache=TinyCache())  # 0.2, max violation: same
        loss = soft_loss(base="vsepp_sum", margin=0.1)
        vsepp.patch(VSEStandIn(vse_opt(margin=0.1, max_violation=False)), loss, cache=TinyCache())
        # the criterion is kept (base="none", or replace_base=False): nothing to match
        vsepp.patch(VSEStandIn(vse_opt(max_violation=False)), soft_loss(base="none"), cache=TinyCache())
        loss = soft_loss(base="vsepp")
        vsepp.patch(VSEStandIn(vse_opt(max_violation=False)), loss, cache=TinyCache(), replace_base=False)
        assert loss.base.max_violation is True
    loss = soft_loss(base="vsepp")
    with pytest.warns(
        UserWarning,
        match=r"VSE\+\+'s criterion uses margin=0.2, max_violation=False .*keeping the loss's "
        r"settings \(match_criterion=False\)",
    ):
        vsepp.patch(VSEStandIn(vse_opt(max_violation=False)), loss, cache=TinyCache(), match_criterion=False)
    assert loss.base.max_violation is True


def _same(a, b) -> bool:
    """Equal state-dict entries: tensors element-wise, extra state (the loss's calibration record) by value."""
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_shim_logs_the_gradient_share_diagnostic(caplog):
    import logging

    model = fresh_model()
    loss = soft_loss(base="vsepp", diagnostics_every=1)
    vsepp.patch(model, loss, cache=TinyCache())
    with caplog.at_level(logging.INFO, logger="softalign"):
        train(model, epochs=1)
    assert loss.gradient_shares is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "softalign"]
    assert lines and "gradient shares at loss step 0" in lines[0] and "soft" in lines[0]
    assert model.logger.values["grad_share_soft"][-1] == pytest.approx(loss.gradient_shares["soft"])


def test_unpatch_when_the_trainer_group_holds_as_many_tensors_as_the_loss_group():
    # list.remove compared the param-group dicts (tensors) and crashed when both groups had equal length
    model = fresh_model()
    loss = soft_loss(base="vsepp")
    n = len([p for p in loss.parameters() if p.requires_grad])
    own = [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]
    model.optimizer = torch.optim.Adam([{"params": own}])
    vsepp.patch(model, loss, cache=TinyCache())
    assert len(model.optimizer.param_groups) == 2
    vsepp.unpatch(model)
    groups = model.optimizer.param_groups
    assert len(groups) == 1 and groups[0]["params"] == own
    vsepp.patch(model, soft_loss(base="vsepp"), cache=TinyCache())  # re-patching works


def test_a_default_loss_follows_vsepps_default_criterion_silently():
    """The plain `python train.py` case: VSE++'s default is the sum of hinges, and a SoftAlignLoss that states no
    hinge settings takes it (with the weights of that base) without a warning; stated settings still warn."""
    from softalign.losses.combined import DEFAULT_WEIGHTS

    loss = SoftAlignLoss(embed_dim=EMBED)  # nothing stated
    assert (loss.base.max_violation, loss.alpha, loss.beta) == (True, *DEFAULT_WEIGHTS["vsepp"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = vsepp.patch(VSEStandIn(vse_opt(margin=0.1, max_violation=False)), loss, cache=TinyCache())
    assert (loss.base.margin, loss.base.max_violation) == (0.1, False)
    assert (loss.alpha, loss.beta) == DEFAULT_WEIGHTS["vsepp_sum"]
    assert loss.get_config_dict()["base"] == "vsepp_sum"
    vsepp.unpatch(model)
    assert (loss.base.margin, loss.base.max_violation, loss.alpha, loss.beta) == (0.2, True, *DEFAULT_WEIGHTS["vsepp"])
    # stated weights are kept, a stated base still warns
    loss = SoftAlignLoss(embed_dim=EMBED, alpha=1.0, beta=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vsepp.patch(VSEStandIn(vse_opt(max_violation=False)), loss, cache=TinyCache())
    assert (loss.base.max_violation, loss.alpha, loss.beta) == (False, 1.0, 2.0)
    with pytest.warns(UserWarning, match="criterion uses"):
        vsepp.patch(
            VSEStandIn(vse_opt(max_violation=False)), SoftAlignLoss(embed_dim=EMBED, base="vsepp"), cache=TinyCache()
        )
    with pytest.warns(UserWarning, match="criterion uses margin=0.1"):
        vsepp.patch(VSEStandIn(vse_opt(margin=0.1)), SoftAlignLoss(embed_dim=EMBED, margin=0.3), cache=TinyCache())


def test_unpatch_with_two_layer_trainer_groups_and_a_failing_step_leaves_nothing_half_patched(monkeypatch):
    """--num_layers 2 / --bi_gru give a first param group as long as the loss's; and if one restore step fails,
    the others still run and the model can be patched again."""
    model = fresh_model()
    loss = soft_loss(base="vsepp")
    n = len(list(loss.parameters()))
    model.optimizer = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]}])
    vsepp.patch(model, loss, cache=TinyCache())
    rec = model._softalign_patch

    def broken():
        raise RuntimeError("undo failed")

    rec.undo.insert(0, broken)
    with pytest.raises(RuntimeError, match="undo failed"):
        vsepp.unpatch(model)
    assert not vsepp.is_patched(model) and "train_emb" not in model.__dict__
    assert len(model.optimizer.param_groups) == 1
    vsepp.patch(model, soft_loss(base="vsepp"), cache=TinyCache())


def test_patched_checkpoints_load_with_weights_only(tmp_path):
    """The upstream `--resume` does torch.load(path); the loss state added to the checkpoint must not need
    pickled code (weights_only=True, PyTorch >= 2.6's default), calibration record included."""
    from softalign.integrations import teran
    from tests.test_integrations_teran import fresh_model as teran_model

    model = fresh_model()
    loss = soft_loss(base="vsepp")
    vsepp.patch(model, loss, cache=TinyCache())
    train(model, 1)  # calibrates tau_s and trains a step
    assert loss.calibration is not None
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "ckpt.pth.tar")
    back = torch.load(tmp_path / "ckpt.pth.tar", weights_only=True)
    fresh = fresh_model(1)
    loss2 = soft_loss(base="vsepp")
    vsepp.patch(fresh, loss2, cache=TinyCache())
    fresh.load_state_dict(back["model"])
    assert loss2.calibration == loss.calibration
    for k, v in loss.state_dict().items():
        assert _same(v, loss2.state_dict()[k]), k
    tmodel = teran_model()
    teran.patch(tmodel, soft_loss(base="none"), cache=TinyCache())
    torch.save(tmodel.state_dict(), tmp_path / "teran.pth")
    torch.load(tmp_path / "teran.pth", weights_only=True)
