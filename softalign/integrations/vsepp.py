"""VSE++ trainer shim (fartashf/vsepp, ``VSE`` model object, python3 and master branches).

The VSE++ model is a plain object: ``train_emb(images, captions, lengths, ids=None, *args)`` runs one step,
calling ``forward_emb`` and then ``forward_loss(img_emb, cap_emb, **kwargs)``, which calls
``criterion(im, s)`` (the hinge of Faghri et al., BMVC 2018); ``model.optimizer`` is built in ``__init__``;
``state_dict()`` is the list ``[img_enc state, txt_enc state]`` saved as ``{'model': model.state_dict(), ...}``.

One line after building the model adds CUSA's CSA/USA (Huang et al., AAAI 2024) and TGDT's CMC (Liu et al.,
IEEE TIP 2023)::

    model = softalign.integrations.vsepp.patch(VSE(opt), SoftAlignLoss(embed_dim=opt.embed_size, cache=cache))

What :func:`patch` changes:

* ``train_emb`` keeps the batch's ``ids`` (the collate function sorts the batch by caption length and returns
  the dataset indices in that sorted order, so ids travel with their rows; batch positions are never used);
* ``forward_loss`` adds ``alpha L_CSA + beta L_USA + gamma L_CMC`` to VSE++'s hinge when the loss has
  ``base="none"``; with a base the loss's id-aware total replaces ``criterion``. Called without captured ids
  (``evaluation.encode_data``) it is the original;
* a hinge base (``"vsepp"``/``"vsepp_sum"``, a :class:`~softalign.losses.VSEHingeLoss`) takes the margin and
  max-violation setting of VSE++'s criterion (``opt.margin``, ``opt.max_violation``; VSE++'s default is the
  *sum* of hinges) when they differ, with a warning naming both (``match_criterion=False``: warn only);
* the loss's heads and temperatures join ``model.optimizer`` as a new param group and ``model.params`` (so
  VSE++'s gradient clipping covers them);
* ``state_dict()`` appends ``{"softalign_loss": ...}`` to the list; ``load_state_dict`` restores it and still
  accepts checkpoints saved before patching (the unpatched VSE++ code ignores the extra element).

Image ids: without a cache, caption ``i`` shows image ``i // captions_per_image`` (VSE++ precomp data; the
``10crop`` features have one image row per caption: ``captions_per_image=1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from softalign.integrations import generic
from softalign.integrations._common import (
    SoftAlignHook,
    extend_list_state,
    match_criterion_hinge,
    restore_list_state,
)

__all__ = ["patch", "unpatch", "is_patched"]

KIND = "vsepp"


def patch(
    model: Any,
    loss: nn.Module,
    *,
    captions_per_image: int = 5,
    cache: Any = None,
    image_ids: Callable | None = None,
    accelerator: Any = None,
    optimizer: Any = None,
    replace_base: bool = True,
    match_criterion: bool = True,
) -> Any:
    """Patch a VSE++ ``VSE`` object in place (see the module docstring) and return it.

    Args:
        loss: a :class:`~softalign.losses.SoftAlignLoss` (``embed_dim=opt.embed_size`` for USA's heads).
        captions_per_image: caption -> image map when no cache is given (``ids // captions_per_image``).
        cache: teacher cache used when the loss has none.
        image_ids: callable ``caption ids -> image ids`` (overrides ``captions_per_image``).
        accelerator: ``accelerate.Accelerator``; the loss goes to its device and runs under its autocast.
        optimizer: defaults to ``model.optimizer``.
        replace_base: with a loss that has a base, use its total instead of ``model.criterion`` (``False``:
            keep VSE++'s criterion and add only the soft-label terms).
        match_criterion: when the loss's hinge base replaces the criterion and its margin / max_violation differ
            from ``model.criterion``'s, use the criterion's (``loss.base`` is changed, restored by
            :func:`unpatch`) and warn; ``False``: keep the loss's settings and warn.
    """
    for name in ("train_emb", "forward_loss", "state_dict", "load_state_dict"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"expected a VSE++ model with {name}(); {type(model).__name__} has none")
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "the VSE++ model has no .optimizer; pass optimizer=... so the loss's heads and temperatures are trained"
        )
    hook = SoftAlignHook(
        loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids, accelerator=accelerator
    )
    record = generic.install(
        model,
        hook,
        KIND,
        loss_method="forward_loss",
        ids_from="train_emb",
        optimizer=optimizer,
        total_name="Le" if replace_base else None,
    )
    if replace_base and hook.base_enabled:
        undo = match_criterion_hinge(loss, getattr(model, "criterion", None), "VSE++", adopt=match_criterion)
        if undo is not None:
            record.undo.append(undo)
    record.replace("state_dict", extend_list_state(model.state_dict, hook))
    record.replace("load_state_dict", restore_list_state(model.load_state_dict, hook))
    params = getattr(model, "params", None)
    if isinstance(params, list):  # VSE++ clips the gradient norm of model.params
        known = {id(p) for p in params}
        record.replace("params", params + [p for p in hook.parameters() if id(p) not in known])
    return model


unpatch, is_patched = generic.shim_api(KIND)
