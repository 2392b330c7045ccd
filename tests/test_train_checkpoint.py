"""softalign.train.checkpoint: accelerate's save_state / load_state carrying the loss (safetensors) and the run's
progress (JSON), committed through the ``latest`` pointer."""

from __future__ import annotations

import pytest
import torch

from softalign.losses import SoftAlignLoss
from softalign.train.checkpoint import (
    TrainProgress,
    latest_checkpoint,
    load_checkpoint,
    register_checkpoint_hooks,
    resolve,
    restore_training_state,
    save_training_state,
)


def _setup(accelerator, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    loss = SoftAlignLoss(embed_dim=3, base="infonce", alpha=0.1, beta=0.5)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    return model, loss, opt


def _release(accelerator, handles, *objs):
    for h in handles:
        h.remove()
    accelerator._models[:] = [m for m in accelerator._models if all(m is not o for o in objs)]
    accelerator._optimizers[:] = [m for m in accelerator._optimizers if all(m is not o for o in objs)]


def test_save_and_restore_carry_model_optimizer_loss_and_progress(tmp_path, accelerator):
    model, loss, opt = _setup(accelerator, 0)
    loss.usa.teacher_temperature.set_frozen_value(0.37)  # a calibrated value: a buffer, not a parameter
    out = model(torch.randn(5, 4)).sum() + sum(p.sum() for p in loss.parameters())
    out.backward()
    opt.step()
    progress = TrainProgress(
        recipe={"name": "x"}, vocab=["<pad>", "a"], epoch=2, step=7, batch=3, partial={"sums": {"loss": 1.5}, "n": 3}
    )
    handles = register_checkpoint_hooks(accelerator, loss, progress)
    folder = save_training_state(accelerator, tmp_path / "checkpoints", progress)
    _release(accelerator, handles, model, opt)
    assert folder.name == "step-00000007" and latest_checkpoint(tmp_path / "checkpoints") == folder

    model2, loss2, opt2 = _setup(accelerator, 1)
    assert not torch.equal(model2.weight, model.weight)
    handles = register_checkpoint_hooks(accelerator, loss2, TrainProgress(recipe={}))
    restore_training_state(accelerator, folder, model2, loss2, opt2)
    _release(accelerator, handles, model2, opt2)
    torch.testing.assert_close(model2.weight, model.weight, rtol=0, atol=0)
    for (k, a), b in zip(loss.state_dict().items(), loss2.state_dict().values()):
        assert torch.equal(a, b), k
    assert float(loss2.usa.teacher_temperature()) == pytest.approx(0.37)
    state_a, state_b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a
    )
    ck = load_checkpoint(tmp_path)  # the output directory resolves to the committed folder
    assert (ck["epoch"], ck["step"], ck["batch"], ck["partial"], ck["vocab"]) == (
        2,
        7,
        3,
        {"sums": {"loss": 1.5}, "n": 3},
        ["<pad>", "a"],
    )
    assert torch.equal(ck["model"]["weight"], model.weight.detach())


def test_a_second_save_of_the_committed_step_never_leaves_it_missing(tmp_path, accelerator, monkeypatch):
    model, loss, opt = _setup(accelerator, 0)
    progress = TrainProgress(recipe={}, step=4)
    handles = register_checkpoint_hooks(accelerator, loss, progress)
    root = tmp_path / "checkpoints"
    first = save_training_state(accelerator, root, progress)
    real = accelerator.save_state

    def dies_half_way(output_dir, **kw):
        real(output_dir, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(accelerator, root, progress)
    assert latest_checkpoint(root) == first and load_checkpoint(root)["step"] == 4  # still whole
    monkeypatch.setattr(accelerator, "save_state", real)
    second = save_training_state(accelerator, root, progress)
    _release(accelerator, handles, model, opt)
    assert second != first and latest_checkpoint(root) == second
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", second.name])


def test_resolve_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: \S*nothing \(expected a softalign train"):
        resolve(tmp_path / "nothing")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000001\n")
    with pytest.raises(ValueError, match=r"latest: it names 'step-00000001', which does not exist"):
        resolve(tmp_path)


def test_a_bf16_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, data, fresh_accelerate_state):
    from accelerate import Accelerator

    from tests.test_train_trainer import _train, tiny_recipe

    acc = Accelerator(cpu=True, mixed_precision="bf16")  # autocast on the CPU; the trainer's checkpoint under it
    over = dict(
        train={"epochs": 2, "batch_size": 12, "eval_batch_size": 16, "progress": False, "mixed_precision": "bf16"}
    )
    full = _train(tiny_recipe(tmp_path / "full", **over), data, acc)
    _train(tiny_recipe(tmp_path / "resumed", **{**over, "train": {**over["train"], "epochs": 1}}), data, acc)
    resumed = _train(tiny_recipe(tmp_path / "resumed", **over), data, acc)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "resumed")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert resumed["history"][1]["train_loss"] == pytest.approx(full["history"][1]["train_loss"], rel=1e-4)
