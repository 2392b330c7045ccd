"""How CSA's and USA's weights move over training: DecayingWeight and TargetShare, inside SoftAlignLoss."""

from __future__ import annotations

import math

import pytest
import torch

from softalign.losses import SoftAlignLoss
from softalign.losses.diagnostics import gradient_norms
from softalign.losses.soft_weight import DecayingWeight, TargetShare, soft_weight_from_config
from softalign.teacher_inputs import TeacherSimilarities


def _batch(b=8, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    t = torch.randn(b, 6, generator=g)
    return img.requires_grad_(), txt.requires_grad_(), t @ t.T / 6, (t + 0.3) @ (t + 0.3).T / 6


def test_decaying_weight_follows_warmup_then_half_cosine_or_line():
    w = DecayingWeight(total_steps=110, final=0.2, warmup_steps=10)
    assert [w.scale(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for step in (10, 40, 60, 109, 110, 500):
        x = min(1.0, (step - 10) / 100)
        assert w.scale(step) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * x)) / 2)
    lin = DecayingWeight(total_steps=50, kind="linear")
    assert [lin.scale(s) for s in (0, 25, 50, 80)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"total_steps": 0}, r"total_steps must be >= 1"),
        ({"total_steps": 10, "warmup_steps": 10}, r"warmup_steps must lie in \[0, total_steps=10\)"),
        ({"total_steps": 10, "final": 1.5}, r"final must lie in \[0, 1\]"),
        ({"total_steps": 10, "kind": "step"}, r"kind must be 'cosine' or 'linear', got 'step'"),
    ],
)
def test_decaying_weight_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecayingWeight(**kwargs)


def test_target_share_refuses_bad_settings_and_unknown_configs():
    with pytest.raises(ValueError, match=r"share must lie in \(0, 1\), got 1.0"):
        TargetShare(1.0)
    with pytest.raises(ValueError, match=r"every must be >= 1"):
        TargetShare(every=0)
    with pytest.raises(ValueError, match=r"'name' in \['DecayingWeight', 'TargetShare'\]"):
        soft_weight_from_config({"name": "Exponential"})
    with pytest.raises(ValueError, match=r"soft_weight TargetShare: .*unexpected keyword argument 'speed'"):
        soft_weight_from_config({"name": "TargetShare", "speed": 2})


def test_the_loss_weights_csa_and_usa_by_the_scale_of_the_step():
    img, txt, t_img, t_txt = _batch()
    sched = DecayingWeight(total_steps=4, kind="linear")
    loss = SoftAlignLoss(
        embed_dim=12,
        base="infonce",
        alpha=0.3,
        beta=0.7,
        teacher_temperature=0.1,
        return_parts=True,
        soft_weight=sched,
        diagnostics_every=0,
    )
    for step in range(5):
        out = loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
        s = max(0.0, 1 - step / 4)
        expected = out["base"] + 0.3 * s * out["csa"] + 0.7 * s * out["usa"]
        assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        weighted = loss.weighted_parts(out)
        assert float(weighted["csa"].detach()) == pytest.approx(
            0.3 * s * float(out["csa"].detach()), rel=1e-6, abs=1e-9
        )
    # evaluation keeps the last training scale (no step is taken)
    loss.eval()
    out = loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    assert float(out["loss"].detach()) == pytest.approx(float(out["base"].detach()), rel=1e-6)


def test_target_share_reaches_the_share_in_one_update_when_inputs_stay_fixed():
    """Gradient norms are proportional to the weights, so with momentum 1 one update gives the share exactly; the
    check recomputes the norms with plain autograd at the new scale."""
    img, txt, t_img, t_txt = _batch()
    loss = SoftAlignLoss(
        embed_dim=12,
        base="infonce",
        teacher_temperature=0.1,
        return_parts=True,
        learn_temperatures=False,
        soft_weight=TargetShare(0.3, every=1, momentum=1.0),
    )
    assert loss.diagnostics_every == 1  # the schedule asks for a diagnostic every step
    loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    first = dict(loss.gradient_shares)
    assert first["soft"] != pytest.approx(0.3, abs=0.05)  # not there by chance
    out = loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    scale = loss._soft_scale
    assert scale == pytest.approx(0.3 * first["norm_base"] / (0.7 * (first["norm_csa"] + first["norm_usa"])))
    norms = gradient_norms(
        {"base": out["base"], "soft": scale * (loss.alpha * out["csa"] + loss.beta * out["usa"])}, [img, txt]
    )
    soft_norms = gradient_norms(
        {"csa": scale * loss.alpha * out["csa"], "usa": scale * loss.beta * out["usa"]}, [img, txt]
    )
    share = (soft_norms["csa"] + soft_norms["usa"]) / (soft_norms["csa"] + soft_norms["usa"] + norms["base"])
    assert share == pytest.approx(0.3, abs=1e-5)
    assert loss.gradient_shares["soft"] == pytest.approx(0.3, abs=1e-5)


def test_target_share_smooths_and_clamps():
    ts = TargetShare(0.5, momentum=0.5, max_scale=4.0)
    ts.observe({"norm_base": 1.0, "norm_csa": 0.25, "norm_usa": 0.25})  # wanted 2 -> sqrt(1 * 2)
    assert ts.scale(0) == pytest.approx(math.sqrt(2.0))
    for _ in range(20):
        ts.observe({"norm_base": 1.0, "norm_csa": 1e-6, "norm_usa": 0.0})
    assert ts.scale(0) == 4.0
    ts.observe({"norm_base": 1.0, "norm_csa": 0.0, "norm_usa": 0.0})  # nothing to steer by: unchanged
    assert ts.scale(0) == 4.0


def test_the_schedule_resumes_with_the_loss_state_and_round_trips_through_the_config():
    img, txt, t_img, t_txt = _batch()

    def make():
        return SoftAlignLoss(
            embed_dim=12, base="infonce", teacher_temperature=0.1, soft_weight=TargetShare(0.4, every=1, momentum=0.7)
        )

    loss = make()
    for _ in range(3):
        loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt)).backward()
    resumed = make()
    resumed.load_state_dict(loss.state_dict())
    assert resumed.soft_weight.scale(0) == loss.soft_weight.scale(0) != 1.0 and resumed._steps == 3
    cfg = loss.get_config_dict()
    assert cfg["soft_weight"] == {
        "name": "TargetShare",
        "share": 0.4,
        "every": 1,
        "momentum": 0.7,
        "min_scale": 0.01,
        "max_scale": 100.0,
    }
    rebuilt = SoftAlignLoss.from_config(cfg)
    assert isinstance(rebuilt.soft_weight, TargetShare) and rebuilt.soft_weight.share == 0.4


def test_a_schedule_that_lowers_the_weights_on_purpose_raises_no_silent_terms_warning():
    import warnings

    from softalign.losses.diagnostics import SoftTermsSilentWarning

    img, txt, t_img, t_txt = _batch()
    loss = SoftAlignLoss(
        embed_dim=12,
        base="infonce",
        teacher_temperature=0.1,
        diagnostics_every=1,
        soft_weight=DecayingWeight(total_steps=2, kind="linear"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoftTermsSilentWarning)
        for _ in range(4):  # the scale reaches 0 at step 2
            loss(img, txt, teacher=TeacherSimilarities(t_img, t_txt))
    assert loss.gradient_shares["soft"] == 0.0 and loss.gradient_shares["soft_scale"] == 0.0
