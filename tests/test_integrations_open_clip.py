"""open_clip for real: SoftAlignClipLoss inside open_clip_train's own train_one_epoch (tiny random model,
synthetic data), checked against open_clip's ClipLoss."""

from __future__ import annotations

import argparse

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
from open_clip_train.data import DataInfo  # noqa: E402
from open_clip_train.scheduler import cosine_lr  # noqa: E402
from open_clip_train.train import train_one_epoch  # noqa: E402

from softalign.integrations.open_clip import SoftAlignClipLoss, create_loss  # noqa: E402
from softalign.losses import SoftAlignLoss  # noqa: E402
from softalign.teacher_inputs import TeacherEmbeddings  # noqa: E402

CAPTIONS = [
    "a red car",
    "a blue car",
    "a green cat",
    "a grey cat",
    "a black dog",
    "a white dog",
    "a pink bird",
    "a brown bird",
]


def _args(model_name, **over):
    from open_clip_train.params import parse_args

    args = parse_args(["--model", model_name, "--batch-size", "4"])
    args.device, args.precision, args.distill, args.world_size, args.rank, args.local_rank = (
        "cpu",
        "fp32",
        True,
        1,
        0,
        0,
    )
    args.wandb, args.log_every_n_steps = False, 1
    for k, v in over.items():
        setattr(args, k, v)
    return args


def _loader(tokenizer, n=8, batch=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = tokenizer(CAPTIONS[:n])
    loader = torch.utils.data.DataLoader(list(zip(images, texts)), batch_size=batch, shuffle=False)
    loader.num_batches, loader.num_samples = len(loader), n
    return loader


def test_contrastive_term_equals_open_clips_clip_loss(tiny_open_clip):
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    t_img, t_txt = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    scale = torch.tensor(14.3)
    ours = SoftAlignClipLoss(alpha=0.1, beta=0.5, diagnostics_every=0)(
        img, txt, scale, output_dict=True, dist_image_features=t_img, dist_text_features=t_txt
    )
    # unset, the weights are the loss's own for a cross-entropy base (CUSA's 0.1 / 0.5 are for its CE / B)
    assert (SoftAlignClipLoss().soft.alpha, SoftAlignClipLoss().soft.beta) == (10.0, 10.0)
    n_img, n_txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    want = open_clip.ClipLoss()(n_img, n_txt, scale)
    torch.testing.assert_close(ours["contrastive_loss"], want, rtol=1e-5, atol=1e-6)
    # the soft terms: SoftAlignLoss(base="none") with the teacher features, weighted
    ref = SoftAlignLoss(base="none", alpha=0.1, beta=0.5, diagnostics_every=0, return_parts=True)
    parts = ref(img, txt, teacher=TeacherEmbeddings(t_img, t_txt))
    torch.testing.assert_close(ours["csa_loss"], 0.1 * parts["csa"])
    torch.testing.assert_close(ours["usa_loss"], 0.5 * parts["usa"])
    # the model's logit_scale is the contrastive temperature: the same gradient as through ClipLoss
    mine, theirs = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    loss = SoftAlignClipLoss(diagnostics_every=0)
    loss(img, txt, mine, output_dict=True, dist_image_features=t_img, dist_text_features=t_txt)[
        "contrastive_loss"
    ].backward()
    open_clip.ClipLoss()(n_img, n_txt, theirs).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in loss.soft.base.parameters())  # its own temperature is unused
    with pytest.raises(ValueError, match="base_temperature is the temperature of an InfoNCE base.*'vsepp'"):
        SoftAlignLoss(base="vsepp")(img, txt, base_temperature=0.1)


def test_loss_refuses_what_it_does_not_replace(tiny_open_clip):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="needs teacher similarities"):
        SoftAlignClipLoss()(x, x, torch.tensor(10.0))
    with pytest.raises(ValueError, match="SigLIP"):
        SoftAlignClipLoss()(x, x, torch.tensor(10.0), torch.tensor(-10.0))
    with pytest.raises(ValueError, match="SigLipLoss"):
        create_loss(argparse.Namespace(model="ViT-B-32", siglip=True, distill=True))
    with pytest.raises(ValueError, match="CoCaLoss"):
        create_loss(argparse.Namespace(model="coca_ViT-B-32", siglip=False, distill=True))
    with pytest.raises(ValueError, match="--distill-model"):
        create_loss(argparse.Namespace(model="ViT-B-32", siglip=False, distill=False))


def test_two_steps_of_open_clip_train_one_epoch(tiny_open_clip):
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(tiny_open_clip, pretrained=None, output_dict=True)
    torch.manual_seed(1)
    teacher = open_clip.create_model(tiny_open_clip, pretrained=None, output_dict=True).eval()  # main.py's
    tokenizer = open_clip.get_tokenizer(tiny_open_clip)
    args = _args(tiny_open_clip)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # the user's lines in open_clip_train/main.py
    loss = create_loss(args, diagnostics_every=0)
    optimizer.add_param_group({"params": loss.trainable_parameters(), "weight_decay": 0.0})

    seen = []
    real_forward = loss.forward

    def recording(*a, **k):  # what open_clip's loop passes, and what the loss returns
        out = real_forward(*a, **k)
        seen.append((sorted(k), {n: float(v.detach()) for n, v in out.items()}))
        return out

    loss.forward = recording
    before = [p.detach().clone() for p in loss.trainable_parameters()]
    tower0 = model.visual.conv1.weight.detach().clone()
    data = {"train": DataInfo(_loader(tokenizer))}
    scheduler = cosine_lr(optimizer, 1e-3, 0, 2)
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, teacher, args)
    assert len(seen) == 2
    keys, values = seen[0]
    assert {
        "image_features",
        "text_features",
        "logit_scale",
        "dist_image_features",
        "dist_text_features",
        "output_dict",
    } <= set(keys)
    assert set(values) == {"contrastive_loss", "csa_loss", "usa_loss"} and all(v == v for v in values.values())
    assert not torch.equal(model.visual.conv1.weight.detach(), tower0)
    for p, p0 in zip(loss.trainable_parameters(), before):
        assert not torch.equal(p.detach(), p0)  # CSA / USA temperatures trained through the loop's optimizer
