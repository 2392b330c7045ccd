"""TERAN trainer shim (mesnico/TERAN, ``TERAN`` ``nn.Module``).

TERAN's ``forward(images, targets, img_lengths, cap_lengths, boxes=None, ids=None, *args)`` computes the
aggregated embeddings and returns ``forward_loss(img_emb, cap_emb, img_emb_set, cap_emb_seq, img_lengths,
cap_lengths)``: a dict of named losses (``matching-loss``, ``alignment-loss``) that the training loop sums
(``loss = sum(loss_dict.values())``). The optimizer is built in ``train.py`` from ``model.get_parameters()``,
which must return every parameter of the model, and checkpoints hold ``model.state_dict()``.

One line right after ``model = get_model(config)``::

    model = softalign.integrations.teran.patch(model, SoftAlignLoss(embed_dim=1024, base="none", cache=cache))

What :func:`patch` changes:

* ``forward`` keeps ``ids`` (the dataset indices of the batch, in batch order) for the step;
* ``forward_loss`` adds named entries ``"csa"`` (``alpha L_CSA``), ``"usa"`` (``beta L_USA``) and ``"cmc"``
  (``gamma L_CMC``) computed on the aggregated embeddings (and ``"softalign-base"`` if the loss has a base;
  TERAN keeps its own losses, so ``base="none"`` is the natural choice); the loop's sum picks them up;
* the loss becomes the submodule ``softalign_loss``: it moves with ``model.to()``/``.cuda()``, is saved in
  ``model.state_dict()`` (TERAN loads checkpoints with ``strict=False``, so old checkpoints still load), and
  ``get_parameters()`` returns its parameters in the first group, so ``train.py``'s "all parameters" check and
  its optimizer include them. With Accelerate, patch before ``accelerator.prepare(model)``; the loss then runs
  inside the prepared model's autocast and is never prepared on its own.

Image ids: TERAN's COCO ids are annotation-list indices, not grouped by image: use a teacher cache built with
the dataset's ``caption_to_image`` (or ``image_ids=callable``). ``captions_per_image`` (``ids // 5``) is right
only for Flickr30k-style datasets that list the captions of each image consecutively.

Reference: Messina et al., "Fine-grained Visual Textual Alignment for Cross-Modal Retrieval using Transformer
Encoders", ACM TOMM 2021.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from torch import nn

from softalign.integrations import generic
from softalign.integrations._common import SoftAlignHook, get_record

__all__ = ["patch", "unpatch", "is_patched", "SUBMODULE"]

KIND = "teran"
#: name under which the loss is registered on the TERAN model (its state_dict keys start with it)
SUBMODULE = "softalign_loss"


def patch(model: nn.Module, loss: nn.Module, *, captions_per_image: Optional[int] = None, cache: Any = None,
          image_ids: Optional[Callable] = None, accelerator: Any = None, optimizer: Any = None) -> nn.Module:
    """Patch a TERAN model in place and return it.

    Args:
        loss: a :class:`~softalign.losses.SoftAlignLoss`; ``embed_dim`` is TERAN's embedding size (1024).
        captions_per_image / cache / image_ids / accelerator: see :class:`~softalign.integrations.generic.SoftAlignHook`.
        optimizer: an optimizer built already (the loss is added as a param group); not needed when the
            optimizer is built afterwards from ``model.get_parameters()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a TERAN nn.Module, got {type(model).__name__}")
    for name in ("forward", "forward_loss"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"expected a TERAN model with {name}(); {type(model).__name__} has none")
    if hasattr(model, SUBMODULE):
        raise ValueError(f"{type(model).__name__} already has an attribute {SUBMODULE!r}")
    hook = SoftAlignHook(loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids,
                         accelerator=accelerator)
    record = generic.install(model, hook, KIND, loss_method="forward_loss", ids_from="forward",
                             optimizer=optimizer, total_name=None)
    model.add_module(SUBMODULE, loss)
    record.submodule = SUBMODULE
    original = getattr(model, "get_parameters", None)
    if callable(original):
        @functools.wraps(original)
        def get_parameters(*args, **kwargs):
            groups, *rest = original(*args, **kwargs)
            if not isinstance(groups, (list, tuple)) or not groups:
                raise TypeError("expected TERAN's get_parameters() to return ([params, ...], lr_multiplier)")
            groups = [list(g) for g in groups]
            known = {id(p) for g in groups for p in g}
            groups[0] = groups[0] + [p for p in hook.parameters() if id(p) not in known]
            return (groups, *rest)

        record.replace("get_parameters", get_parameters)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original methods and remove the ``softalign_loss`` submodule (and its param group)."""
    if get_record(model, KIND) is None:
        raise ValueError(f"{type(model).__name__} is not patched by softalign.integrations.teran")
    return generic.unpatch(model)


def is_patched(model: Any) -> bool:
    record = get_record(model)
    return record is not None and record.kind == KIND
