"""Accelerate: device placement and autocast for the shims, and multi-process gathering of a patched step."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from softalign.integrations import generic, vsepp
from tests.test_integrations_common import (
    EMBED,
    TinyCache,
    VSEStandIn,
    loader,
    record_loss_inputs,
    single_thread,  # noqa: F401  (autouse fixture)
    soft_loss,
    vse_opt,
)

accelerate = pytest.importorskip("accelerate")


def autocast_probe(loss):
    seen = []
    loss.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_vsepp_step_under_an_accelerator(fresh_accelerate_state, precision):
    acc = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    torch.manual_seed(0)
    model = VSEStandIn(vse_opt())
    loss = soft_loss(base="vsepp")
    autocast_seen = autocast_probe(loss)
    seen = record_loss_inputs(loss)
    vsepp.patch(model, loss, cache=TinyCache(), accelerator=acc)
    # the user's Accelerate lines: encoders and optimizer are prepared, the loss is not
    model.img_enc, model.txt_enc, model.optimizer = acc.prepare(model.img_enc, model.txt_enc, model.optimizer)
    assert len(model.optimizer.param_groups) == 2  # the loss's group survived prepare
    assert all(m is not loss for m in acc._models)
    before = loss.usa.image_head[1].weight.detach().clone()
    batch = next(iter(loader()))
    model.train_emb(*batch)
    assert autocast_seen == [precision == "bf16"]
    assert all(p.device == acc.device and p.dtype == torch.float32 for p in loss.parameters())
    assert seen[0]["ids"].device == acc.device
    assert model.logger.values["Le"] and all(v == v for v in model.logger.values["Le"])  # finite scalar
    assert not torch.equal(before, loss.usa.image_head[1].weight)  # the optimizer stepped the loss's head


def _gather_worker(rank, world, init_file, batch_ids, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        loss = soft_loss(base="vsepp", gamma=0.2)
        img, txt = torch.load(os.path.join(out_dir, "emb.pt"))
        rows = slice(rank * len(batch_ids) // world, (rank + 1) * len(batch_ids) // world)
        hook = generic.SoftAlignHook(loss, cache=TinyCache())
        parts = hook(img[rows], txt[rows], batch_ids[rows])
        torch.save({k: v.detach() for k, v in parts.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file init")
def test_hook_gathers_across_processes_with_teacher_rows(tmp_path):
    """Two processes with half a batch each compute the loss of the whole batch (teacher *embeddings* are
    gathered, since [B, B] similarities cannot be)."""
    ids = torch.tensor([3, 17, 0, 22, 9, 38, 14, 30])
    torch.manual_seed(1)
    img, txt = torch.randn(8, EMBED), torch.randn(8, EMBED)
    torch.save((img, txt), tmp_path / "emb.pt")
    mp.start_processes(
        _gather_worker, args=(2, str(tmp_path / "init"), ids, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    torch.manual_seed(0)
    loss = soft_loss(base="vsepp", gamma=0.2)
    expected = generic.SoftAlignHook(loss, cache=TinyCache())(img, txt, ids)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in expected:
            assert torch.allclose(got[key], expected[key].detach(), atol=1e-5), (rank, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loss_follows_the_trainers_cuda_tensors_without_an_accelerator():
    """VSE++/SCAN move their batches with .cuda() themselves; a loss built on the CPU must follow."""
    torch.manual_seed(0)
    model = VSEStandIn(vse_opt())
    model.img_enc.cuda()
    model.txt_enc.cuda()
    loss = soft_loss(base="vsepp")
    vsepp.patch(model, loss, cache=TinyCache())
    images, targets, lengths, ids = next(iter(loader()))
    model.train_emb(images.cuda(), targets.cuda(), lengths, ids)
    assert all(p.is_cuda for p in loss.parameters())
    assert model.optimizer.param_groups[1]["params"][0] is next(iter(loss.parameters()))


def test_teran_patched_before_prepare_runs_inside_the_prepared_models_autocast(fresh_accelerate_state):
    from softalign.integrations import teran
    from tests.test_integrations_teran import TERANStandIn, build_optimizer, teran_loader

    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    torch.manual_seed(0)
    model = TERANStandIn()
    loss = soft_loss(base="none")
    autocast_seen = autocast_probe(loss)
    teran.patch(model, loss, cache=TinyCache(), accelerator=acc)  # the documented order: patch, then prepare
    optimizer = build_optimizer(model)
    model, optimizer = acc.prepare(model, optimizer)
    before = loss.usa.text_head[1].weight.detach().clone()
    batch = next(iter(teran_loader()))
    loss_dict = model(*batch)
    assert {"csa", "usa"} <= set(loss_dict) and all(v.dtype == torch.float32 for v in loss_dict.values())
    optimizer.zero_grad()
    acc.backward(sum(loss_dict.values()))
    optimizer.step()
    assert autocast_seen == [True]
    assert not torch.equal(before, loss.usa.text_head[1].weight)
