"""softalign.functional: each formula against an independent loop implementation, gradients, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softalign import functional as SF
from tests import reference_formulas as ref


def _pairs(b=6, d=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(b * 100 + d)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


def _sims(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SF.cosine_similarity_matrix(torch.randn(b, 7, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
def test_csa_matches_reference(mode):
    img, txt = _pairs()
    scores = SF.cosine_similarity_matrix(img, txt)
    t_img, t_txt = _sims(seed=2), _sims(seed=3)
    got = SF.cross_modal_soft_label_alignment(scores, t_img, t_txt, 0.45, 1.0, mode)
    want = ref.csa(scores, t_img, t_txt, 0.45, 1.0, mode)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_csa_each_uses_image_teacher_for_i2t_rows_and_text_teacher_for_t2i_rows():
    img, txt = _pairs(b=6, d=5)
    scores = SF.cosine_similarity_matrix(img, txt)  # not symmetric: i2t and t2i rows differ
    t_img, t_txt = _sims(seed=5), _sims(seed=6)
    got = SF.cross_modal_soft_label_alignment(scores, t_img, t_txt, 0.3, 0.7, "each")
    i2t = ref.kl_rows(scores.tolist(), t_img.tolist(), 0.3, 0.7)
    t2i = ref.kl_rows(scores.t().tolist(), t_txt.tolist(), 0.3, 0.7)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-10)
    swapped = SF.cross_modal_soft_label_alignment(scores, t_txt, t_img, 0.3, 0.7, "each")
    assert swapped.item() != pytest.approx(got.item(), rel=1e-6)


def test_usa_matches_reference():
    s_ii, s_tt, t_ii, t_tt = (_sims(seed=s) for s in (7, 8, 9, 10))
    got = SF.uni_modal_soft_label_alignment(s_ii, s_tt, t_ii, t_tt, (0.4, 0.6), 1.0)
    assert got.item() == pytest.approx(ref.usa(s_ii, s_tt, t_ii, t_tt, 0.4, 0.6, 1.0), rel=1e-10)


@pytest.mark.parametrize("max_violation", [True, False])
def test_vsepp_matches_reference_with_shared_images(max_violation):
    scores = _sims(b=7, seed=11)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    got = SF.vsepp_hinge(scores, ids, margin=0.2, max_violation=max_violation)
    assert got.item() == pytest.approx(ref.vsepp(scores, ids.tolist(), 0.2, max_violation), rel=1e-10)


def test_vsepp_never_uses_a_caption_of_the_same_image_as_negative():
    # Pair 0 and 1 show the same image; make their cross score huge: an id-blind hinge would explode.
    scores = torch.eye(4, dtype=torch.float64) * 0.5
    scores[0, 1] = scores[1, 0] = 5.0
    ids = torch.tensor([7, 7, 8, 9])
    assert SF.vsepp_hinge(scores, ids, margin=0.2).item() == pytest.approx(ref.vsepp(scores, [7, 7, 8, 9], 0.2, True))
    assert SF.vsepp_hinge(scores, ids, margin=0.2).item() < SF.vsepp_hinge(scores, None, margin=0.2).item()


def test_info_nce_matches_reference_with_multi_positive_targets():
    scores = _sims(b=6, seed=12)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    got = SF.info_nce(scores, 0.07, ids)
    assert got.item() == pytest.approx(ref.info_nce(scores, 0.07, ids.tolist()), rel=1e-10)


def test_cmc_matches_reference():
    img, txt = _pairs(b=6, d=4)
    scores = SF.cosine_similarity_matrix(img, txt)
    s_ii, s_tt = SF.cosine_similarity_matrix(img), SF.cosine_similarity_matrix(txt)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])
    got = SF.consistent_multimodal_contrastive(scores, s_ii, s_tt, ids, margin=0.2, intra_margin=0.3)
    want = ref.vsepp(scores, ids.tolist(), 0.2, True) + ref.intra(ref.cosine(img), ref.cosine(txt), 0.3)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_cosine_similarity_matches_numpy():
    img, txt = _pairs(b=4, d=3)
    a = img.numpy() / np.linalg.norm(img.numpy(), axis=1, keepdims=True)
    b = txt.numpy() / np.linalg.norm(txt.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(SF.cosine_similarity_matrix(img, txt).numpy(), a @ b.T, rtol=1e-12)


# ------------------------------------------------------------------------------------------ gradients


def test_gradcheck_csa_scores_and_temperature():
    t_img, t_txt = _sims(b=5, seed=13), _sims(b=5, seed=14)
    scores = _sims(b=5, seed=15).clone().requires_grad_(True)
    tau = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    for mode in SF.CSA_MODES:
        assert torch.autograd.gradcheck(
            lambda s, t: SF.cross_modal_soft_label_alignment(s, t_img, t_txt, t, 1.0, mode), (scores, tau)
        )


def test_gradcheck_usa_vsepp_infonce_cmc_through_embeddings():
    img, txt = _pairs(b=5, d=4)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    t_img, t_txt = _sims(b=5, seed=16), _sims(b=5, seed=17)
    ids = torch.tensor([0, 0, 1, 2, 3])

    def usa(i, t):
        return SF.uni_modal_soft_label_alignment(
            SF.cosine_similarity_matrix(i), SF.cosine_similarity_matrix(t), t_img, t_txt, (0.4, 0.5), 1.0
        )

    def hinge(i, t):
        return SF.vsepp_hinge(SF.cosine_similarity_matrix(i, t), ids, max_violation=False)

    def nce(i, t):
        return SF.info_nce(SF.cosine_similarity_matrix(i, t), 0.1, ids)

    def cmc(i, t):
        return SF.consistent_multimodal_contrastive(
            SF.cosine_similarity_matrix(i, t),
            SF.cosine_similarity_matrix(i),
            SF.cosine_similarity_matrix(t),
            ids,
            intra_margin=0.05,
        )

    for fn in (usa, hinge, nce, cmc):
        assert torch.autograd.gradcheck(fn, (img, txt)), fn.__name__


def test_teacher_similarities_receive_no_gradient():
    scores = _sims(b=4, seed=18).requires_grad_(True)
    t_img = _sims(b=4, seed=19).requires_grad_(True)
    t_txt = _sims(b=4, seed=20).requires_grad_(True)
    SF.cross_modal_soft_label_alignment(scores, t_img, t_txt).backward()
    assert scores.grad is not None and t_img.grad is None and t_txt.grad is None


# ------------------------------------------------------------------------------------------ properties

square = st.integers(min_value=2, max_value=7).flatmap(
    lambda n: st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n * n, max_size=n * n).map(
        lambda xs, n=n: torch.tensor(xs, dtype=torch.float64).view(n, n)
    )
)
temps = st.floats(0.1, 2.0)


@settings(max_examples=60, deadline=None)
@given(square, temps)
def test_kl_zero_when_student_equals_teacher_at_equal_temperatures(s, t):
    assert SF.soft_label_kl(s, s, t, t).item() == pytest.approx(0.0, abs=1e-9)
    assert SF.cross_modal_soft_label_alignment(s, s, s.t(), t, t, "each").item() == pytest.approx(0.0, abs=1e-9)
    assert SF.uni_modal_soft_label_alignment(s, s, s, s, t, t).item() == pytest.approx(0.0, abs=1e-9)


square_pair = st.integers(min_value=2, max_value=7).flatmap(
    lambda n: st.tuples(
        *[
            st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n * n, max_size=n * n).map(
                lambda xs, n=n: torch.tensor(xs, dtype=torch.float64).view(n, n)
            )
        ]
        * 2
    )
)


@settings(max_examples=60, deadline=None)
@given(square_pair, temps, temps)
def test_kl_terms_non_negative(pair, tc, ts):
    s, t = pair
    assert SF.soft_label_kl(s, t, tc, ts).item() >= -1e-12
    for mode in SF.CSA_MODES:
        assert SF.cross_modal_soft_label_alignment(s, t, t.t(), tc, ts, mode).item() >= -1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(0, 10_000))
def test_losses_permutation_equivariant(n, seed):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    ti, tt = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64)
    ids = torch.randint(0, max(1, n - 1), (n,), generator=g)
    perm = torch.randperm(n, generator=g)

    def all_terms(i, t, a, b, k):
        s = SF.cosine_similarity_matrix(i, t)
        sii, stt = SF.cosine_similarity_matrix(i), SF.cosine_similarity_matrix(t)
        ta, tb = SF.cosine_similarity_matrix(a), SF.cosine_similarity_matrix(b)
        return torch.stack(
            [
                SF.cross_modal_soft_label_alignment(s, ta, tb),
                SF.uni_modal_soft_label_alignment(sii, stt, ta, tb),
                SF.vsepp_hinge(s, k),
                SF.vsepp_hinge(s, k, max_violation=False),
                SF.info_nce(s, 0.1, k),
                SF.consistent_multimodal_contrastive(s, sii, stt, k),
            ]
        )

    torch.testing.assert_close(
        all_terms(img, txt, ti, tt, ids),
        all_terms(img[perm], txt[perm], ti[perm], tt[perm], ids[perm]),
        rtol=1e-10,
        atol=1e-10,
    )


# ------------------------------------------------------------------------------------------ bad input


def test_non_finite_input_is_rejected_with_location():
    s = _sims(b=3)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores contains non-finite values \(first at index \(1, 2\)\)"):
        SF.vsepp_hinge(s)
    with pytest.raises(ValueError, match="teacher_image_sim contains non-finite"):
        SF.cross_modal_soft_label_alignment(_sims(b=3), s, _sims(b=3))


def test_shape_mismatches_are_rejected():
    with pytest.raises(ValueError, match=r"teacher_text_sim has shape \(4, 4\) but the batch has 3 pairs"):
        SF.cross_modal_soft_label_alignment(_sims(b=3), _sims(b=3), _sims(b=4))
    with pytest.raises(ValueError, match="must be a square"):
        SF.vsepp_hinge(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"image_ids must have shape \[3\]"):
        SF.info_nce(_sims(b=3), 0.1, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        SF.vsepp_hinge(torch.zeros(3, 3, dtype=torch.long))


def test_bad_temperature_and_mode():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        SF.soft_label_kl(_sims(b=3), _sims(b=3), 0.0)
    with pytest.raises(ValueError, match="csa mode must be one of"):
        SF.cross_modal_soft_label_alignment(_sims(b=3), _sims(b=3), _sims(b=3), mode="mul")


def test_low_precision_inputs_are_upcast():
    s16 = _sims(b=5, seed=21).to(torch.bfloat16)
    t = _sims(b=5, seed=22)
    out = SF.cross_modal_soft_label_alignment(s16, t.half(), t.half())
    assert out.dtype == torch.float32
    want = ref.csa(s16.double(), t.half().double(), t.half().double(), 0.45, 1.0)
    assert out.item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------ fused kernels


def _plain_kl(student, teacher, t, ts):
    """The unfused autograd formula the fused soft_label_kl replaces."""
    target = torch.softmax(teacher.detach() / ts, dim=1)
    return torch.nn.functional.kl_div(torch.log_softmax(student / t, dim=1), target, reduction="batchmean")


def test_soft_label_kl_gradcheck_with_zero_soft_labels_and_learnable_temperature():
    teacher = _sims(b=5, seed=30)
    teacher[0, 1] = teacher[2, 4] = -1e4  # P_ij underflows to exactly 0 (xlogy semantics)
    assert (torch.softmax(teacher, dim=1) == 0).any()
    student = _sims(b=5, seed=31).clone().requires_grad_(True)
    tau = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: SF.soft_label_kl(s, teacher, t, 1.0), (student, tau))
    assert torch.autograd.gradcheck(lambda s: SF.soft_label_kl(s.t(), teacher, 0.6, 0.8), (student,))
    got = SF.soft_label_kl(student, teacher, tau, 1.0)
    assert got.item() == pytest.approx(ref.kl_rows(student.tolist(), teacher.tolist(), 0.37, 1.0), rel=1e-10)


def test_fused_soft_label_kl_equals_plain_autograd_values_and_gradients():
    teacher = _sims(b=6, seed=32)
    for ts in (1.0, torch.tensor(0.5, dtype=torch.float64)):
        s1 = _sims(b=6, seed=33).clone().requires_grad_(True)
        s2 = s1.detach().clone().requires_grad_(True)
        t1 = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
        t2 = t1.detach().clone().requires_grad_(True)
        fused, plain = SF.soft_label_kl(s1, teacher, t1, ts), _plain_kl(s2, teacher, t2, ts)
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)
        (3.0 * fused).backward()
        (3.0 * plain).backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-10, atol=1e-14)


def test_fused_soft_label_kl_float32_temperature_and_retained_graph():
    teacher = _sims(b=5, seed=34).float()
    s = _sims(b=5, seed=35).float().requires_grad_(True)
    tau = torch.tensor(0.45, requires_grad=True)
    loss = SF.soft_label_kl(s, teacher, tau)
    loss.backward(retain_graph=True)
    g_s, g_t = s.grad.clone(), tau.grad.clone()
    loss.backward()  # a retained graph gives the same gradient again
    torch.testing.assert_close(s.grad, 2 * g_s)
    torch.testing.assert_close(tau.grad, 2 * g_t)
    assert tau.grad.dtype == torch.float32 and tau.grad.shape == tau.shape


def test_learnable_teacher_temperature_still_receives_its_gradient():
    teacher, student = _sims(b=4, seed=36), _sims(b=4, seed=37)
    ts = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    SF.soft_label_kl(student, teacher, 0.45, ts).backward()
    assert ts.grad is not None and ts.grad.abs() > 0


def test_precomputed_soft_labels_equal_the_inline_ones_and_the_old_cache_is_a_loud_no_op():
    scores, s_ii, s_tt = _sims(b=5, seed=38), _sims(b=5, seed=39), _sims(b=5, seed=40)
    t_img, t_txt = _sims(b=5, seed=41), _sims(b=5, seed=42)
    targets = (SF.soft_labels(t_img, 0.5), SF.soft_labels(t_txt, 0.5))
    csa = SF.cross_modal_soft_label_alignment(scores, None, None, 0.45, targets=targets)
    assert csa.item() == pytest.approx(ref.csa(scores, t_img, t_txt, 0.45, 0.5), rel=1e-10)
    usa = SF.uni_modal_soft_label_alignment(s_ii, s_tt, None, None, 0.45, targets=targets)
    assert usa.item() == pytest.approx(ref.usa(s_ii, s_tt, t_img, t_txt, 0.45, 0.45, 0.5), rel=1e-10)
    again = SF.uni_modal_soft_label_alignment(s_ii, s_tt, t_img, t_txt, 0.45, 0.5)  # targets computed inside
    assert again.item() == pytest.approx(usa.item(), rel=1e-12)


@pytest.mark.parametrize("uni", [False, True])
def test_cosine_similarities_values_and_gradients_of_every_order(uni):
    img, txt = _pairs(b=5, d=4)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    w = [_sims(b=5, seed=s) for s in (43, 44, 45)]

    def shared(i, t):
        out = SF.cosine_similarities(i, t, uni)
        return sum((o * wk).sum() for o, wk in zip(out, w) if o is not None) + out[0][1, 2] ** 2

    def separate(i, t):
        n_i, n_t = torch.nn.functional.normalize(i, dim=1), torch.nn.functional.normalize(t, dim=1)
        out = (n_i @ n_t.t(), n_i @ n_i.t(), n_t @ n_t.t()) if uni else (n_i @ n_t.t(),)
        return sum((o * wk).sum() for o, wk in zip(out, w)) + out[0][1, 2] ** 2

    torch.testing.assert_close(shared(img, txt), separate(img, txt), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(shared, (img, txt))
    assert torch.autograd.gradgradcheck(shared, (img, txt))  # plain autograd: double backward works


def test_soft_label_kl_has_second_order_gradients():
    teacher = _sims(b=4, seed=60)
    s = _sims(b=4, seed=61).clone().requires_grad_(True)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, t: SF.soft_label_kl(x, teacher, t, 0.7), (s, tau))


@pytest.mark.parametrize("max_violation", [True, False])
def test_vsepp_anchor_without_negatives_and_with_mined_negatives(max_violation):
    scores = _sims(b=5, seed=47).clone().requires_grad_(True)
    same = torch.zeros(5, dtype=torch.long)  # every pair shows the same image: no negatives at all
    loss = SF.vsepp_hinge(scores, same, max_violation=max_violation)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(scores.grad).all() and (scores.grad == 0).all()
    ids = torch.tensor([0, 0, 1, 2, 3])
    i2t = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    t2i = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)) > 0.4
    got = SF.vsepp_hinge(scores, ids, margin=0.3, max_violation=max_violation, negatives=SF.MinedNegatives(i2t, t2i))
    s, n = scores.detach(), 5
    total = 0.0
    for p in range(n):
        row = [max(0.0, 0.3 - s[p, p] + s[p, k]) for k in range(n) if ids[k] != ids[p] and i2t[p, k]]
        col = [max(0.0, 0.3 - s[p, p] + s[k, p]) for k in range(n) if ids[k] != ids[p] and t2i[k, p]]
        agg = max if max_violation else sum
        total += (agg(row) if row else 0.0) + (agg(col) if col else 0.0)
    assert got.item() == pytest.approx(float(total), rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: SF.vsepp_hinge(
            x, ids, margin=0.3, max_violation=max_violation, negatives=SF.MinedNegatives(i2t, t2i)
        ),
        (scores,),
    )
