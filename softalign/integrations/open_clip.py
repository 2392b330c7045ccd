"""open_clip's training loop (``open_clip_train``): a drop-in for ``ClipLoss`` that adds CUSA's soft labels.

:class:`SoftAlignClipLoss` takes ``ClipLoss``'s call convention, ``loss(image_features, text_features,
logit_scale, output_dict=True)``, so ``open_clip_train.train.train_one_epoch`` runs it unchanged. The contrastive
term is CLIP's (the model's own ``logit_scale``; equal to ``ClipLoss`` when every pair is its own positive). CSA
and USA [Huang et al., AAAI 2024] need teacher similarities, from either

* **teacher features**: with ``--distill-model`` / ``--distill-pretrained`` the loop passes the teacher's
  ``dist_image_features`` / ``dist_text_features``; they become the soft labels (instead of
  ``DistillClipLoss``'s logit distillation), or
* **caption ids** into a teacher cache (``caption_ids=``, from your own loop: open_clip's data pipeline yields
  ``(images, texts)`` only); the cache also makes captions of one image positives of each other.

With open_clip's own script, run ``python -m softalign.integrations.open_clip_train`` with its usual flags
(:mod:`softalign.integrations.open_clip_train`): the loss becomes a submodule of the student, so main.py's
optimizer, checkpoints and ``--resume`` carry it, with no edit of main.py. In your own loop::

    loss = create_loss(args)                                   # or SoftAlignClipLoss(cache=...)
    optimizer.add_param_group({"params": loss.trainable_parameters(), "weight_decay": 0.0})

:func:`create_loss` follows open_clip's ``create_loss(args)`` (it reads ``args.distill``, ``args.siglip``,
``args.model``) and refuses the losses it does not replace (SigLIP, CoCa) by name. :func:`load_checkpoint` reads a
checkpoint of the runner into a plain open_clip model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softalign.losses import SoftAlignLoss, citations
from softalign.teacher_inputs import TeacherEmbeddings

__all__ = ["SoftAlignClipLoss", "create_loss", "load_checkpoint", "LOSS_KEY"]

#: the student's submodule that holds the loss in ``python -m softalign.integrations.open_clip_train`` runs
LOSS_KEY = "softalign_loss"


class SoftAlignClipLoss(nn.Module):
    """``L = L_CLIP(logit_scale) + alpha L_CSA + beta L_USA`` with ``ClipLoss``'s call convention.

    ``L_CLIP`` is CLIP's symmetric cross-entropy over ``logit_scale * img @ txt.T`` (Radford et al., ICML 2021),
    with id-aware positives when caption ids and a cache are given. All three terms come from one
    ``SoftAlignLoss(base="infonce")`` called with ``base_temperature = 1 / logit_scale`` (the model's learnable
    scale replaces the base's own temperature, which is frozen and unused). ``alpha`` / ``beta`` default to the
    loss's for a cross-entropy base (10 / 10; CUSA's 0.1 / 0.5 belong to its CE / B mode); the calibrated ``tau_s``
    and the rest of its options come via ``**kwargs``. Under ``torch.distributed`` every term is computed
    over the global batch with exact gradients, from one all-gather of the features and with local rows x global
    columns per process (open_clip's ``local_loss``), not the full global matrices.

    Returns ``{"contrastive_loss", "csa_loss", "usa_loss"}`` (the weighted terms; open_clip's loop sums them) with
    ``output_dict=True``, else their sum.
    """

    citation = citations.join(citations.CUSA, citations.INFONCE)

    def __init__(self, cache: Any = None, alpha: float | None = None, beta: float | None = None, **kwargs):
        super().__init__()
        if "base" in kwargs:
            raise ValueError(
                "SoftAlignClipLoss's base is CLIP's contrastive loss with the model's logit_scale; "
                "use softalign.losses.SoftAlignLoss directly for another base"
            )
        self.soft = SoftAlignLoss(base="infonce", alpha=alpha, beta=beta, cache=cache, return_parts=True, **kwargs)
        assert self.soft.base is not None
        self.soft.base.requires_grad_(False)  # the model's logit_scale is the temperature

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The loss's own parameters (USA heads, CSA / USA temperatures) for the host's optimizer."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        caption_ids: torch.Tensor | None = None,
        dist_image_features: torch.Tensor | None = None,
        dist_text_features: torch.Tensor | None = None,
        dist_logit_scale: Any = None,
        **unused: Any,
    ):
        if logit_bias is not None:
            raise ValueError(
                "SoftAlignClipLoss replaces ClipLoss (softmax); the model returned a logit_bias "
                "(SigLIP's sigmoid loss), which it does not replace"
            )
        teacher = {}
        if dist_image_features is not None and dist_text_features is not None:
            teacher = dict(teacher=TeacherEmbeddings(dist_image_features.detach(), dist_text_features.detach()))
        elif caption_ids is None:
            raise ValueError(
                "SoftAlignClipLoss needs teacher similarities: run open_clip_train with "
                "--distill-model/--distill-pretrained (teacher features), or pass caption_ids= with a "
                "teacher cache"
            )
        # positives from the caption ids: SoftAlignLoss maps them to images through its cache (after the gather)
        parts = self.soft(
            image_features, text_features, ids=caption_ids, base_temperature=1.0 / logit_scale.float(), **teacher
        )
        weighted = self.soft.weighted_parts(parts)
        losses = {"contrastive_loss": weighted.pop("base"), **{f"{k}_loss": v for k, v in weighted.items()}}
        return losses if output_dict else sum(losses.values())

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "base": "clip (model logit_scale)",
            **{k: v for k, v in self.soft.get_config_dict().items() if k not in ("base", "margin", "temperature")},
        }


def check_args(args: Any, cache: Any = None) -> None:
    """Refuse, by name, what :class:`SoftAlignClipLoss` does not replace (``--siglip``, CoCa models) and training
    without a teacher (``--distill-model`` / ``--distill-pretrained``, or a ``cache``)."""
    model = str(getattr(args, "model", ""))
    if getattr(args, "siglip", False):
        raise ValueError(
            "softalign's create_loss replaces ClipLoss / DistillClipLoss; --siglip selects SigLipLoss, "
            "which it does not replace"
        )
    if "coca" in model.lower():
        raise ValueError(
            f"softalign's create_loss replaces ClipLoss / DistillClipLoss; --model {model} selects "
            "CoCaLoss, which it does not replace"
        )
    if not getattr(args, "distill", False) and cache is None:
        raise ValueError(
            "softalign's create_loss needs teacher features or a cache: run with --distill-model and "
            "--distill-pretrained, or pass cache= and give the loss caption_ids="
        )


def create_loss(args: Any, cache: Any = None, **kwargs: Any) -> SoftAlignClipLoss:
    """open_clip's ``create_loss(args)`` for softalign: a :class:`SoftAlignClipLoss` in place of ``ClipLoss`` /
    ``DistillClipLoss`` (:func:`check_args` first). ``cache`` (a :class:`~softalign.teachers.TeacherCache`) and
    ``**kwargs`` (``alpha``, ``beta``, ``soft_label_entropy``, ...) go to the loss."""
    check_args(args, cache)
    return SoftAlignClipLoss(cache=cache, **kwargs)


def load_checkpoint(model: nn.Module, path: str, loss: SoftAlignClipLoss | None = None) -> int:
    """Load an ``open_clip_train`` checkpoint written by ``python -m softalign.integrations.open_clip_train`` into
    a plain open_clip ``model`` (strictly: every model key, no other), and its ``softalign_loss.*`` state into
    ``loss`` when given. Read with ``weights_only=True``. Returns the checkpoint's epoch (0 for a bare state dict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an open_clip checkpoint (expected a dict with 'state_dict')")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    prefix = LOSS_KEY + "."
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})
    if loss is not None:
        loss_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not loss_state:
            raise ValueError(f"{path}: holds no {LOSS_KEY}.* state (not written by softalign's open_clip_train)")
        loss.load_state_dict(loss_state)
    return int(checkpoint.get("epoch", 0)) if isinstance(checkpoint, dict) else 0
