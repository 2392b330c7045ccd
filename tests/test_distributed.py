"""Distributed exactness: 2 CPU processes (gloo) via accelerate.debug_launcher give the loss and gradients of the
whole batch, as the papers' formulas compute them on one process (tests/reference_terms.py), with unequal
per-process batch sizes."""

from __future__ import annotations

import copy

import pytest
import torch

from softalign import distributed
from softalign import functional as SF
from softalign.losses import SoftAlignLoss
from softalign.teacher_inputs import TeacherEmbeddings, TeacherSimilarities
from tests.launch import debug_launch
from tests.reference_terms import reference_parts

SIZES = (3, 5)  # per-process batch sizes (unequal on purpose)


CONFIGS = {
    "vsepp": dict(embed_dim=8, base="vsepp", alpha=0.1, beta=0.5, gamma=0.2),
    # InfoNCE base, CSA's fused mode, CMC with its own hinge, USA heads on separate backbone features
    "infonce_add_features": dict(
        embed_dim=(6, 5),
        base="infonce",
        alpha=0.3,
        beta=0.4,
        gamma=0.5,
        csa_mode="add",
        teacher_temperature=(0.2, 0.4),
    ),
    "vsepp_sum_mean_nce": dict(embed_dim=None, base="vsepp_sum", alpha=1.0, beta=1.0, gamma=1.0),
}


def _setup(config: str = "vsepp"):
    g = torch.Generator().manual_seed(1234)
    n = sum(SIZES)
    x_img, x_txt = torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    teacher_img, teacher_txt = torch.randn(n, 7, generator=g), torch.randn(n, 4, generator=g)
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])
    torch.manual_seed(99)
    model = torch.nn.ModuleDict({"img": torch.nn.Linear(6, 8), "txt": torch.nn.Linear(5, 8)})
    loss = SoftAlignLoss(return_parts=True, **CONFIGS[config])
    with torch.no_grad():  # move temperatures off their defaults so a wrong gradient would show
        loss.csa.temperature.value.fill_(0.3)
    return x_img, x_txt, teacher_img, teacher_txt, image_ids, model, loss


def _loss_and_grads(model, loss, x_img, x_txt, t_img, t_txt, ids):
    feats = dict(image_features=x_img, text_features=x_txt) if isinstance(loss.usa.embed_dim, tuple) else {}
    out = loss(
        model["img"](x_img),
        model["txt"](x_txt),
        image_ids=ids,
        teacher=TeacherEmbeddings(t_img, t_txt),
        **feats,
    )
    out["loss"].backward()
    return (
        out,
        {n: p.grad.clone() for n, p in model.named_parameters()},
        {n: p.grad.clone() for n, p in loss.named_parameters()},
    )


def _reference_loss_and_grads(model, loss, x_img, x_txt, t_img, t_txt, ids):
    import torch.nn.functional as F

    features = (x_img, x_txt) if isinstance(loss.usa.embed_dim, tuple) else None
    e_img, e_txt = F.normalize(t_img, dim=1), F.normalize(t_txt, dim=1)
    parts = reference_parts(
        loss, model["img"](x_img), model["txt"](x_txt), e_img @ e_img.T, e_txt @ e_txt.T, ids, features
    )
    parts["loss"] = sum(w * parts[k] for k, w in loss._weights().items() if k in parts)
    parts["loss"].backward()
    return (
        parts,
        {n: p.grad.clone() for n, p in model.named_parameters()},
        {n: p.grad.clone() for n, p in loss.named_parameters()},
    )


def _worker(config="vsepp"):
    import torch.distributed as dist

    assert distributed.is_distributed() and distributed.world_size() == 2
    rank, world = distributed.rank(), distributed.world_size()
    x_img, x_txt, t_img, t_txt, ids, model, loss = _setup(config)
    if loss._needs_calibration:  # tau_s from the whole batch's teacher matrices, as its first forward would
        e_img, e_txt = SF.cosine_similarity_matrix(t_img), SF.cosine_similarity_matrix(t_txt)
        loss.calibrate(teacher_image_sim=e_img, teacher_text_sim=e_txt)
    # the reference: the terms written out from the papers over the whole batch (tests/reference_terms.py)
    ref = _reference_loss_and_grads(copy.deepcopy(model), copy.deepcopy(loss), x_img, x_txt, t_img, t_txt, ids)

    start = sum(SIZES[:rank])
    part = slice(start, start + SIZES[rank])
    out, model_grads, loss_grads = _loss_and_grads(
        model, loss, x_img[part], x_txt[part], t_img[part], t_txt[part], ids[part]
    )
    for name, grad in model_grads.items():  # what DDP / Accelerate do to the model's gradients
        dist.all_reduce(grad)
        grad /= world
        torch.testing.assert_close(grad, ref[1][name], rtol=1e-5, atol=1e-5, msg=f"model grad {name}")
    for name, grad in loss_grads.items():  # the loss is not wrapped: its gradients are already global
        torch.testing.assert_close(grad, ref[2][name], rtol=1e-5, atol=1e-5, msg=f"loss grad {name}")
    for key in ref[0]:
        torch.testing.assert_close(out[key], ref[0][key].detach(), rtol=1e-5, atol=1e-5, msg=f"loss part {key}")
    assert set(out) == set(ref[0])
    assert loss._grad_sync_installed  # rows of this process x columns of the batch

    # the gather helpers themselves
    mine = torch.arange(SIZES[rank]) + 10 * rank
    torch.testing.assert_close(distributed.gather_batch(mine), torch.cat([torch.arange(3), torch.arange(5) + 10]))
    assert distributed.batch_sizes(mine) == list(SIZES)
    torch.testing.assert_close(distributed.gather_batch(mine, list(SIZES)), distributed.gather_batch(mine))
    with pytest.raises(ValueError, match="cannot be gathered"):
        loss(torch.randn(2, 8), torch.randn(2, 8), teacher=TeacherSimilarities(torch.eye(2), torch.eye(2)))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_two_process_loss_and_gradients_equal_single_process(config):
    debug_launch(_worker, config, num_processes=2)


def test_identity_when_not_distributed():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x and distributed.gather_batch(x) is x
    assert distributed.world_size() == 1 and distributed.rank() == 0


def test_single_process_reference_is_itself_consistent():
    # sanity of the reference used above: per-pair positives via ids, teacher embeddings -> cosine sims
    x_img, x_txt, t_img, t_txt, ids, model, loss = _setup()
    out, _, _ = _loss_and_grads(model, loss, x_img, x_txt, t_img, t_txt, ids)
    explicit = loss(
        model["img"](x_img),
        model["txt"](x_txt),
        image_ids=ids,
        teacher=TeacherSimilarities(SF.cosine_similarity_matrix(t_img), SF.cosine_similarity_matrix(t_txt)),
    )
    torch.testing.assert_close(out["loss"], explicit["loss"])


def _clip_loss_worker():
    """SoftAlignClipLoss (open_clip_train's drop-in) over 2 processes equals one process holding the batch."""
    import torch.distributed as dist

    from softalign.integrations.open_clip import SoftAlignClipLoss

    rank, world = distributed.rank(), distributed.world_size()
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    x_img, x_txt = torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    t_img, t_txt = torch.randn(n, 7, generator=g), torch.randn(n, 4, generator=g)
    torch.manual_seed(3)
    model = torch.nn.ModuleDict({"img": torch.nn.Linear(6, 8), "txt": torch.nn.Linear(5, 8)})
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.5))  # CLIP's log scale, a model parameter
    loss = SoftAlignClipLoss(diagnostics_every=0)

    def run(m, lo, sl):
        out = lo(
            m["img"](x_img[sl]),
            m["txt"](x_txt[sl]),
            m.logit_scale.exp(),
            output_dict=True,
            dist_image_features=t_img[sl],
            dist_text_features=t_txt[sl],
        )
        sum(out.values()).backward()
        return (
            {k: v.detach() for k, v in out.items()},
            {k: p.grad.clone() for k, p in m.named_parameters()},
            {k: p.grad.clone() for k, p in lo.named_parameters() if p.grad is not None},
        )

    single = copy.deepcopy(loss)
    single.soft.gather = False
    ref = run(copy.deepcopy(model), single, slice(0, n))
    start = sum(SIZES[:rank])
    gathers = []
    real_gather = distributed.all_gather_with_grad

    def counting(x, sizes=None):
        gathers.append(tuple(x.shape))
        return real_gather(x, sizes)

    distributed.all_gather_with_grad = counting
    try:
        out, model_grads, loss_grads = run(model, loss, slice(start, start + SIZES[rank]))
    finally:
        distributed.all_gather_with_grad = real_gather
    assert len(gathers) == 2, gathers  # the embeddings once (images, captions), shared by every term
    for key, value in ref[0].items():
        torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-5, msg=f"term {key}")
    for name, grad in model_grads.items():  # DDP's average over processes
        dist.all_reduce(grad)
        grad /= world
        torch.testing.assert_close(grad, ref[1][name], rtol=1e-5, atol=1e-5, msg=f"model grad {name}")
    assert set(loss_grads) == set(ref[2]) and loss_grads
    for name, grad in loss_grads.items():
        torch.testing.assert_close(grad, ref[2][name], rtol=1e-5, atol=1e-5, msg=f"loss grad {name}")


def test_two_process_clip_drop_in_loss_equals_single_process():
    debug_launch(_clip_loss_worker, num_processes=2)
