"""transformers.Trainer and PyTorch Lightning for real, with the documented snippets of docs/hosts.md: two
optimizer steps each, the loss's parameters trained and saved with the host's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.doc_blocks import doc_block

N_IMG, K = 8, 2  # 16 captions of 8 images


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from softalign.teachers.importers import import_npy

    d = tmp_path_factory.mktemp("hosts") / "cache"
    rng = np.random.default_rng(0)
    import_npy(
        d,
        rng.normal(size=(N_IMG, 12)).astype(np.float32),
        [i // K for i in range(N_IMG * K)],
        text_features=rng.normal(size=(N_IMG * K, 8)).astype(np.float32),
        progress=False,
    )
    return str(d)


def _images(n=N_IMG, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class _TinyImageTower(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, dim)
        )

    def forward(self, x):
        return self.net(x)


def _lightning_rows():
    """The Lightning tests' data: each of the 8 images with 2 captions of 6 random word ids, and caption ids."""
    images = _images()
    g = torch.Generator().manual_seed(1)
    return [
        {"image": images[i // K], "caption": torch.randint(0, 50, (6,), generator=g), "caption_id": i}
        for i in range(N_IMG * K)
    ]


def _loss_params(loss):
    params = [p for p in loss.parameters() if p.requires_grad]
    assert params, "the loss has learnable temperatures"
    return params, [p.detach().clone() for p in params]


# ------------------------------------------------------------------------------------- transformers.Trainer
class MiniLMDualEncoder(nn.Module):
    """A user's model: the packaged all-MiniLM-L6-v2 (transformers) for text, a tiny CNN for images."""

    def __init__(self):
        super().__init__()
        from transformers import AutoModel

        from softalign.teachers.packaged import offline_minilm_path

        self.text = AutoModel.from_pretrained(offline_minilm_path())
        self.image = _TinyImageTower(self.text.config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        text = (hidden * mask).sum(1) / mask.sum(1)
        return F.normalize(self.image(pixel_values), dim=-1), F.normalize(text, dim=-1)


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        words = ["red", "blue", "green", "grey", "black", "white", "pink", "brown"]
        caps = [f"a {words[i // K]} thing number {i % K}" for i in range(N_IMG * K)]
        self.tok = tokenizer(caps, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        self.images = _images()

    def __len__(self):
        return N_IMG * K

    def __getitem__(self, i):
        return {
            "pixel_values": self.images[i // K],
            "input_ids": self.tok["input_ids"][i],
            "attention_mask": self.tok["attention_mask"][i],
            "caption_id": torch.tensor(i),
        }


def test_transformers_trainer_snippet_trains_two_steps(tmp_path, cache_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from softalign.teachers.packaged import offline_minilm_path

    snippet = doc_block("hosts.md", "transformers.Trainer")
    model = MiniLMDualEncoder()
    data = _PairDataset(AutoTokenizer.from_pretrained(offline_minilm_path()))
    trainer = snippet["make_trainer"](
        model,
        data,
        str(tmp_path / "out"),
        cache_dir=cache_dir,
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    params, before = _loss_params(model.soft_align)
    text0 = model.text.embeddings.word_embeddings.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for p, p0 in zip(params, before):
        assert id(p) in in_opt and not torch.equal(p.detach(), p0)
    assert not torch.equal(model.text.embeddings.word_embeddings.weight.detach(), text0)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert model.soft_align.calibration is not None and model.soft_align.calibration["batch_size"] == 8
    # the loss is saved with the model (safetensors): temperatures and the calibration record
    trainer.save_model(str(tmp_path / "saved"))
    state = load_file(str(tmp_path / "saved" / "model.safetensors"))
    saved = {k for k in state if k.startswith("soft_align.")}
    assert {f"soft_align.{n}" for n, p in model.soft_align.named_parameters() if p.requires_grad} <= saved


# ------------------------------------------------------------------------------------------------- Lightning
class _TinyDualEncoder(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.image = _TinyImageTower(dim)
        self.text = nn.EmbeddingBag(vocab, dim)

    def forward(self, images, captions):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(captions), dim=-1)


def test_lightning_snippet_trains_two_steps_and_checkpoints_the_loss(tmp_path, cache_dir):
    pl = pytest.importorskip("pytorch_lightning")
    snippet = doc_block("hosts.md", "Lightning")
    loader = torch.utils.data.DataLoader(_lightning_rows(), batch_size=8, shuffle=True, drop_last=True)
    module = snippet["SoftAlignModule"](_TinyDualEncoder(), cache_dir=cache_dir, lr=1e-2)
    params, before = _loss_params(module.loss)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    for p, p0 in zip(params, before):
        assert not torch.equal(p.detach(), p0)
    logged = trainer.logged_metrics
    assert {"train/base", "train/csa", "train/usa"} <= set(logged)
    total = sum(float(logged[k]) for k in ("train/base", "train/csa", "train/usa"))
    assert np.isfinite(total)
    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))
    ckpt = torch.load(str(tmp_path / "last.ckpt"), map_location="cpu", weights_only=True)
    for n, p in module.loss.named_parameters():
        torch.testing.assert_close(ckpt["state_dict"][f"loss.{n}"], p.detach())


# --------------------------------------------------------------------------------------------- resume, per host
def _stop_at(step):
    """A transformers callback that ends training right after the checkpoint of ``step`` (a killed run)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return Stop()


def _hf_run(out, cache_dir, stop_at=None, resume=False, seed=0):
    from transformers import AutoTokenizer

    from softalign.teachers.packaged import offline_minilm_path

    snippet = doc_block("hosts.md", "transformers.Trainer")
    torch.manual_seed(seed)  # a fresh model and loss: the resumed run must take their values from the checkpoint
    model = MiniLMDualEncoder()
    data = _PairDataset(AutoTokenizer.from_pretrained(offline_minilm_path()))
    trainer = snippet["make_trainer"](
        model,
        data,
        str(out),
        cache_dir=cache_dir,
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    if stop_at:
        trainer.add_callback(_stop_at(stop_at))
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
    return trainer, model.soft_align


def test_transformers_trainer_resume_restores_the_loss_as_an_uninterrupted_run(tmp_path, cache_dir):
    _, whole = _hf_run(tmp_path / "whole", cache_dir)
    _hf_run(tmp_path / "split", cache_dir, stop_at=2)
    trainer, resumed = _hf_run(tmp_path / "split", cache_dir, resume=True, seed=1)
    assert trainer.state.global_step == 4
    _assert_same_loss_state(resumed, whole)


def _lightning_run(tmp_path, cache_dir, max_steps, ckpt_path=None, seed=0):
    pl = pytest.importorskip("pytorch_lightning")
    snippet = doc_block("hosts.md", "Lightning")
    loader = torch.utils.data.DataLoader(_lightning_rows(), batch_size=8, shuffle=False, drop_last=True)
    torch.manual_seed(seed)
    module = snippet["SoftAlignModule"](_TinyDualEncoder(), cache_dir=cache_dir, lr=1e-2)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module.loss


def test_lightning_fit_from_a_checkpoint_restores_the_loss_as_an_uninterrupted_run(tmp_path, cache_dir):
    _, whole = _lightning_run(tmp_path / "whole", cache_dir, max_steps=4)
    _lightning_run(tmp_path / "split", cache_dir, max_steps=2)
    ckpt = next((tmp_path / "split" / "ckpt").glob("*step=2.ckpt"))
    trainer, resumed = _lightning_run(tmp_path / "split", cache_dir, max_steps=4, ckpt_path=str(ckpt), seed=1)
    assert trainer.global_step == 4
    _assert_same_loss_state(resumed, whole)


def _assert_same_loss_state(resumed, whole):
    from tests.test_integrations_common import assert_same_loss_state

    assert_same_loss_state(resumed, whole)
