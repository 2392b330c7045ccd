"""A student on frozen pre-trained features: the regime where soft labels from a stronger teacher can help.

The backbones (e.g. EfficientNet-Lite0 for images, all-MiniLM-L6-v2 for text) run once; their pooled features
are stored (in a :class:`~softalign.teachers.TeacherCache`, which is just a table of embeddings). The student
trains, in CUSA's layout [Huang et al., AAAI 2024, Fig. 2]:

    features -> FeatureMLP (trainable backbone part) -> cross-modal ProjectionHead -> joint embedding (base, CSA)
                                                    `-> uni-modal heads inside the loss (USA), in parallel

so USA's gradient reaches the shared MLP but never the cross-modal head. Training samples one random caption
of each image per step (CUSA's and the demo's loaders sample images), with ``SoftAlignLoss`` as the only loss.
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

    dim: int = 256            # backbone output (input of the cross-modal and uni-modal heads)
    hidden: int = 512
    embed_dim: int = 256      # joint space
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureSplit:
    """Frozen features of one split: images ``[N_i, D_i]``, captions ``[N_c, D_t]`` and the split itself."""

    image: torch.Tensor
    text: torch.Tensor
    data: RetrievalData


def build_student(image_dim: int, text_dim: int, cfg: FeatureStudentConfig):
    from softalign.train.models import DualEncoder, FeatureMLP

    return DualEncoder(FeatureMLP(image_dim, cfg.dim, cfg.hidden), FeatureMLP(text_dim, cfg.dim, cfg.hidden),
                       cfg.embed_dim, feature_dims=(cfg.dim, cfg.dim))


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


def train_feature_student(train: FeatureSplit, evals: Mapping[str, FeatureSplit], loss_kwargs: Mapping[str, Any],
                          cfg: FeatureStudentConfig, seed: int, cache=None) -> dict[str, Any]:
    """Train one student; returns ``{"metrics": {split: {...}}, "history", "loss_config", "gradient_shares",
    "seconds"}``. ``cache``: the teacher cache over ``train``'s captions (caption ids = row numbers of
    ``train.text``), needed when ``loss_kwargs`` switch CSA or USA on."""
    from softalign.losses import SoftAlignLoss
    from softalign.train.trainer import _jsonable

    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_student(train.image.shape[1], train.text.shape[1], cfg)
    loss_fn = SoftAlignLoss(embed_dim=(cfg.dim, cfg.dim), cache=cache, return_parts=True, **dict(loss_kwargs))
    if loss_fn._needs_calibration:
        loss_fn.calibrate(cache, batch_size=min(cfg.batch_size, train.data.num_images), seed=seed)
    params = [{"params": [p for p in model.parameters()], "weight_decay": cfg.weight_decay},
              {"params": [p for p in loss_fn.parameters() if p.requires_grad], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in params if g["params"]], lr=cfg.lr)
    c2i = torch.as_tensor(train.data.caption_to_image).long()
    order = torch.argsort(c2i, stable=True)
    counts = torch.bincount(c2i, minlength=train.data.num_images)
    starts = torch.cumsum(counts, 0) - counts
    num_images = train.data.num_images
    steps_per_epoch = max(1, num_images // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr)
    history = []
    shares_seen = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(num_images, generator=gen)
        sums: dict[str, float] = {}
        for s in range(steps_per_epoch):
            imgs = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
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
    return {"seed": seed, "metrics": metrics, "history": history, "gradient_shares": shares_seen,
            "loss_config": _jsonable(loss_fn.get_config_dict()), "student": cfg.to_dict(),
            "seconds": round(time.time() - t0, 2)}


def mean_share(records, key: str = "soft") -> float | None:
    """Mean of a gradient-share key over the diagnostics of a run (None when there were none)."""
    vals = [r[key] for r in records if key in r]
    return float(np.mean(vals)) if vals else None
