"""SoftAlignLoss's one code path (a process's anchor rows against the batch's columns; one process is the whole
batch) against the terms written out from the papers (tests/reference_terms.py): values and gradients, for every
base and term. The 2-process case is tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softalign.losses import SoftAlignLoss, anchor_rows
from softalign.teacher_inputs import TeacherEmbeddings
from tests.reference_terms import reference_parts

CONFIGS = {
    "vsepp_heads_cmc": dict(embed_dim=8, base="vsepp", alpha=0.7, beta=0.4, gamma=0.3),
    "vsepp_sum_no_heads": dict(embed_dim=None, base="vsepp_sum", alpha=1.0, beta=1.0, gamma=1.0),
    "infonce_add_features_cmc": dict(embed_dim=(6, 5), base="infonce", alpha=0.3, beta=0.4, gamma=0.5, csa_mode="add"),
    "infonce_cusa_mean": dict(embed_dim=8, base="infonce", infonce_reduction="cusa_mean", alpha=0.1, beta=0.5),
    "csa_only": dict(embed_dim=8, base="none", alpha=1.0, beta=0.0),
}


@pytest.mark.parametrize("shared", [True, False], ids=["products-shared", "products-recomputed"])
@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_values_and_gradients_equal_the_papers_formulas(config, with_ids, shared, monkeypatch):
    # small blocks are computed once and scaled per term; large ones are recomputed per term from the scaled rows
    if not shared:
        monkeypatch.setattr(anchor_rows, "SHARED_PRODUCT_LIMIT", 0)
    g = torch.Generator().manual_seed(5)
    b = 7
    x_img, x_txt = torch.randn(b, 6, generator=g), torch.randn(b, 5, generator=g)
    e_img, e_txt = torch.randn(b, 9, generator=g), torch.randn(b, 4, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4]) if with_ids else None
    torch.manual_seed(0)
    proj = torch.nn.ModuleDict({"img": torch.nn.Linear(6, 8), "txt": torch.nn.Linear(5, 8)})
    loss = SoftAlignLoss(return_parts=True, teacher_temperature=(0.2, 0.3), diagnostics_every=0, **CONFIGS[config])
    with torch.no_grad():  # temperatures off their defaults, so that a wrong gradient shows
        for p in loss.parameters():
            if p.dim() == 0:
                p.mul_(0.8)
    features = (x_img, x_txt) if isinstance(loss._config["embed_dim"], tuple) else None

    def run(compute):
        proj.zero_grad()
        loss.zero_grad()
        parts = compute(proj["img"](x_img), proj["txt"](x_txt))
        total = sum(w * parts[k] for k, w in loss._weights().items() if k in parts)
        total.backward()
        grads = {
            k: p.grad.clone() for k, p in [*proj.named_parameters(), *loss.named_parameters()] if p.grad is not None
        }
        return {k: v.detach() for k, v in parts.items() if k != "loss"}, grads

    feats = {} if features is None else dict(image_features=x_img, text_features=x_txt)
    got = run(lambda i, t: loss(i, t, image_ids=ids, teacher=TeacherEmbeddings(e_img, e_txt), **feats))
    t_img, t_txt = F.normalize(e_img, dim=1), F.normalize(e_txt, dim=1)
    want = run(lambda i, t: reference_parts(loss, i, t, t_img @ t_img.T, t_txt @ t_txt.T, ids, features))
    assert set(got[0]) == set(want[0])
    for k in want[0]:
        torch.testing.assert_close(got[0][k], want[0][k], rtol=1e-5, atol=1e-6, msg=f"term {k}")
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=f"gradient of {k}")


def test_precomputed_scores_take_the_same_path_as_embeddings():
    # SCAN / TERAN pass a [B, B] matrix: the rows of that matrix give the same terms as the embeddings' product
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    e_img, e_txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss = SoftAlignLoss(embed_dim=8, alpha=1.0, beta=0.5, teacher_temperature=0.2, return_parts=True)
    teacher = dict(teacher=TeacherEmbeddings(e_img, e_txt))
    from_emb = loss(img, txt, **teacher)
    scores = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    from_scores = loss(img, txt, scores=scores, **teacher)
    for k in from_emb:
        torch.testing.assert_close(from_scores[k], from_emb[k], rtol=1e-5, atol=1e-6, msg=k)
