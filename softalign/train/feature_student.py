"""A student on frozen pre-trained features: the regime where soft labels from a stronger teacher can help.

The backbones (e.g. EfficientNet-Lite0 for images, all-MiniLM-L6-v2 for text) run once; their pooled features
are stored (in a :class:`~softalign.teachers.TeacherCache`, which is just a table of embeddings). The student
trains, in CUSA's layout [Huang et al., AAAI 2024, Fig. 2]:

    features -> FeatureMLP (trainable backbone part) -> cross-modal ProjectionHead -> joint embedding (base, CSA)
                                                    `-> uni-modal heads inside the loss (USA), in parallel

so USA's gradient reaches the shared MLP but never the cross-modal head. Training samples one random caption
of each image per step (CUSA's and the demo's loaders sample images), with ``SoftAlignLoss`` as the only loss.

**Trained-encoder regime** (``text_layers = k > 0``): the text side's top ``k`` transformer layers train too
(:class:`~softalign.train.text_top_layers.TopLayersTextEncoder`, initialised from the pre-trained model, at
``backbone_lr``); the split's text then holds the frozen bottom layers' token states instead of sentence features.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from softalign.data.base import RetrievalData


@dataclass
class FeatureStudentConfig:
    """Student size and optimisation (AdamW, cosine schedule to ``min_lr``)."""

    dim: int = 256  # backbone output (input of the cross-modal and uni-modal heads)
    hidden: int = 512
    embed_dim: int = 256  # joint space
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    text_layers: int = 0  # top transformer layers of the text backbone that train (0: frozen features)
    backbone_lr: float = 3e-4  # their learning rate (same cosine schedule)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureSplit:
    """Frozen features of one split: images ``[N_i, D_i]``, captions ``[N_c, D_t]`` (or the token states of the
    frozen bottom layers, :class:`~softalign.train.text_top_layers.TokenStates`) and the split itself."""

    image: torch.Tensor
    text: Any
    data: RetrievalData

    def select_images(self, image_indices) -> FeatureSplit:
        """The split restricted to ``image_indices`` (in that order) and their captions, as
        :meth:`RetrievalData.select_images` renumbers them."""
        idx = torch.as_tensor(np.asarray(image_indices, dtype=np.int64))
        c2i = torch.as_tensor(self.data.caption_to_image).long()
        remap = torch.full((self.data.num_images,), -1, dtype=torch.long)
        remap[idx] = torch.arange(len(idx))
        keep = torch.nonzero(remap[c2i] >= 0).flatten()
        keep = keep[torch.argsort(remap[c2i[keep]], stable=True)]
        return FeatureSplit(self.image[idx], self.text[keep], self.data.select_images(idx.tolist()))


def build_student(image_dim: int, text_dim: int, cfg: FeatureStudentConfig, text_backbone=None):
    """CUSA's layout over frozen features; with ``cfg.text_layers > 0`` the top layers of ``text_backbone`` (a
    ``transformers`` model) train under the text MLP."""
    from softalign.train.models import DualEncoder, FeatureMLP

    text: torch.nn.Module = FeatureMLP(text_dim, cfg.dim, cfg.hidden)
    if cfg.text_layers:
        from softalign.train.text_top_layers import TopLayersTextEncoder

        if text_backbone is None:
            raise ValueError(f"text_layers={cfg.text_layers} needs the text backbone whose top layers train")
        text = torch.nn.Sequential(TopLayersTextEncoder(text_backbone, cfg.text_layers), text)
    return DualEncoder(
        FeatureMLP(image_dim, cfg.dim, cfg.hidden), text, cfg.embed_dim, feature_dims=(cfg.dim, cfg.dim)
    )


@torch.no_grad()
def evaluate(model, loss_fn, split: FeatureSplit) -> dict[str, float]:
    """Cross-modal and uni-modal metrics of ``split`` (:func:`softalign.train.evaluation.evaluate_embeddings`), the
    uni-modal ones on USA's heads when the loss has them."""
    from softalign.train.evaluation import encode_uni_modal, evaluate_embeddings

    model.eval()
    loss_fn.eval()
    img, img_f = model.encode_image(split.image, return_features=True)
    txt, txt_f = model.encode_text(split.text, return_features=True)
    uni = encode_uni_modal(loss_fn, img_f, txt_f)
    model.train()
    loss_fn.train()
    return evaluate_embeddings(img, txt, split.data, *(uni if uni is not None else (None, None)))


def train_feature_student(
    train: FeatureSplit,
    evals: Mapping[str, FeatureSplit],
    loss_kwargs: Mapping[str, Any],
    cfg: FeatureStudentConfig,
    seed: int,
    cache=None,
    train_images=None,
    text_backbone=None,
) -> dict[str, Any]:
    """Train one student; returns ``{"metrics": {split: {...}}, "history", "loss_config", "gradient_shares",
    "seconds"}``. ``cache``: the teacher cache over ``train``'s captions (caption ids = row numbers of
    ``train.text``), needed when ``loss_kwargs`` switch CSA or USA on. ``train_images``: the image indices of
    ``train`` to train on (default: all; e.g. the folds that are not validation), which also calibrate tau_s.
    ``text_backbone``: the pre-trained text model when ``cfg.text_layers > 0``."""
    from softalign import soft_labels as cal
    from softalign.losses import SoftAlignLoss
    from softalign.train.trainer import _jsonable

    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_student(train.image.shape[1], train.text.shape[-1], cfg, text_backbone)
    pool = (
        torch.arange(train.data.num_images)
        if train_images is None
        else torch.as_tensor(np.asarray(train_images, dtype=np.int64))
    )
    num_images = len(pool)
    batch_size = min(cfg.batch_size, num_images)
    c2i = torch.as_tensor(train.data.caption_to_image).long()
    order = torch.argsort(c2i, stable=True)
    counts = torch.bincount(c2i, minlength=train.data.num_images)
    starts = torch.cumsum(counts, 0) - counts
    loss_fn = SoftAlignLoss(embed_dim=(cfg.dim, cfg.dim), cache=cache, return_parts=True, **dict(loss_kwargs))
    if loss_fn._needs_calibration:
        # tau_s from training-size batches of the training images only (one caption per image, as in training)
        cal_gen = torch.Generator().manual_seed(seed)
        picks = torch.stack([pool[torch.randperm(num_images, generator=cal_gen)[:batch_size]] for _ in range(16)])
        ids = order[starts[picks] + (torch.rand(picks.shape, generator=cal_gen) * counts[picks]).long()]
        t_img, t_txt = cal.teacher_batches(cache, ids)
        loss_fn.calibrate(teacher_image_sim=t_img, teacher_text_sim=t_txt)
    backbone = [p for n, p in model.named_parameters() if ".layers." in n and n.startswith("text_encoder.")]
    rest = [p for p in model.parameters() if all(p is not q for q in backbone)]
    params = [
        {"params": rest, "weight_decay": cfg.weight_decay},
        {"params": backbone, "weight_decay": cfg.weight_decay, "lr": cfg.backbone_lr},
        {"params": [p for p in loss_fn.parameters() if p.requires_grad], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in params if g["params"]], lr=cfg.lr)
    steps_per_epoch = max(1, num_images // batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_cosine(total, cfg.min_lr / cfg.lr)] * len(optimizer.param_groups)
    )
    history = []
    shares_seen = []
    for epoch in range(cfg.epochs):
        perm = pool[torch.randperm(num_images, generator=gen)]
        sums: dict[str, float] = {}
        for s in range(steps_per_epoch):
            imgs = perm[s * batch_size : (s + 1) * batch_size]
            pick = (torch.rand(len(imgs), generator=gen) * counts[imgs]).long()
            ids = order[starts[imgs] + pick]
            img, txt, img_f, txt_f = model(train.image[imgs], train.text[ids], return_features=True)
            parts = loss_fn(img, txt, ids=ids, image_ids=imgs, image_features=img_f, text_features=txt_f)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(loss_fn.parameters()), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            every = loss_fn.diagnostics_every
            if every and loss_fn.gradient_shares is not None and (loss_fn._steps - 1) % every == 0:
                shares_seen.append({"step": loss_fn._steps - 1, **loss_fn.gradient_shares})
        history.append({"epoch": epoch + 1, **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()}})
    metrics = {name: evaluate(model, loss_fn, split) for name, split in evals.items()}
    return {
        "seed": seed,
        "metrics": metrics,
        "history": history,
        "gradient_shares": shares_seen,
        "loss_config": _jsonable(loss_fn.get_config_dict()),
        "student": cfg.to_dict(),
        "seconds": round(time.time() - t0, 2),
    }


def _cosine(total: int, floor: float):
    """Cosine decay of a group's learning rate from its own value to ``floor`` times it over ``total`` steps."""
    import math

    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def mean_share(records, key: str = "soft") -> float | None:
    """Mean of a gradient-share key over the diagnostics of a run (None when there were none)."""
    vals = [r[key] for r in records if key in r]
    return float(np.mean(vals)) if vals else None
