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
the dataset's ``caption_to_image`` (``softalign cache build-teran`` builds it in TERAN's caption order), or
``image_ids=dataset_image_ids(train_loader.dataset)``. ``captions_per_image`` (``ids // 5``) is right only for
Flickr30k-style datasets that list the captions of each image consecutively, so it is accepted only together
with ``dataset=`` (the training dataset), against which the ``i // k`` rule is checked for every caption; a
dataset that breaks it is refused, naming the first caption that does.

Reference: Messina et al., "Fine-grained Visual Textual Alignment for Cross-Modal Retrieval using Transformer
Encoders", ACM TOMM 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from softalign.integrations import generic
from softalign.integrations._common import SoftAlignHook

__all__ = ["patch", "unpatch", "is_patched", "SUBMODULE", "dataset_image_ids", "check_grouped_ids"]

KIND = "teran"
#: name under which the loss is registered on the TERAN model (its state_dict keys start with it)
SUBMODULE = "softalign_loss"


def _raw_dataset(dataset: Any) -> Any:
    """TERAN's CocoDataset / FlickrDataset behind a BottomUpFeaturesDataset (or the dataset itself)."""
    return getattr(dataset, "underlying_dataset", dataset)


def dataset_image_ids(dataset: Any) -> Callable[[Any], torch.Tensor]:
    """``caption ids -> image ids`` read from a TERAN training dataset (``CocoDataset``, ``FlickrDataset`` or a
    ``BottomUpFeaturesDataset`` around one): COCO's ``coco.anns[ids[i]]['image_id']`` (annotation ids of the
    train and restval parts), Flickr30k's image index. Computed once for every caption, then looked up."""
    raw = _raw_dataset(dataset)
    n = len(raw)
    if hasattr(raw, "get_raw_item"):

        def image_of(i):
            return raw.get_raw_item(i, False)[2]
    elif hasattr(raw, "__getitem__"):

        def image_of(i):
            return raw[i][-1]
    else:
        raise TypeError(
            f"cannot read image ids from a {type(dataset).__name__}; expected TERAN's CocoDataset, "
            "FlickrDataset or BottomUpFeaturesDataset"
        )
    index: dict = {}
    table = torch.tensor([index.setdefault(image_of(i), len(index)) for i in range(n)], dtype=torch.long)

    def image_ids(ids: Any) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        return table.to(ids.device)[ids]

    return image_ids


def check_grouped_ids(dataset: Any, captions_per_image: int) -> None:
    """Raise unless caption ``i`` of ``dataset`` shows image ``i // captions_per_image`` for every ``i``: the
    captions of one group share one image, and no image appears in two groups."""
    k = int(captions_per_image)
    table = dataset_image_ids(dataset)(torch.arange(len(_raw_dataset(dataset)))).tolist()
    fix = (
        "Use a teacher cache (softalign cache build-teran) or image_ids=dataset_image_ids(dataset); TERAN's COCO "
        "ids are annotation-list indices, not grouped by image"
    )
    group_of_image: dict = {}
    for i, image in enumerate(table):
        g = i // k
        if image != table[g * k]:
            raise ValueError(
                f"captions_per_image={k} does not hold for this dataset: caption {i} shows another image "
                f"than caption {g * k}, although both are in group {g} ({i} // {k}). {fix}"
            )
        if group_of_image.setdefault(image, g) != g:
            raise ValueError(
                f"captions_per_image={k} does not hold for this dataset: caption {i} (group {g}) shows the "
                f"image of group {group_of_image[image]}, so captions of one image would be negatives "
                f"of each other. {fix}"
            )


def patch(
    model: nn.Module,
    loss: nn.Module,
    *,
    captions_per_image: int | None = None,
    cache: Any = None,
    image_ids: Callable | None = None,
    accelerator: Any = None,
    optimizer: Any = None,
    dataset: Any = None,
) -> nn.Module:
    """Patch a TERAN model in place and return it.

    Args:
        loss: a :class:`~softalign.losses.SoftAlignLoss`; ``embed_dim`` is TERAN's embedding size (1024).
        cache / image_ids / accelerator: see :class:`~softalign.integrations.generic.SoftAlignHook`.
        captions_per_image: ``image = caption id // captions_per_image``; needs ``dataset=`` to be checked, since
            TERAN's COCO ids break that rule (see the module docstring).
        dataset: the training dataset (``train_loader.dataset``), to check ``captions_per_image``.
        optimizer: an optimizer built already (the loss is added as a param group); not needed when the
            optimizer is built afterwards from ``model.get_parameters()`` (pass that one to :func:`unpatch`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a TERAN nn.Module, got {type(model).__name__}")
    for name in ("forward", "forward_loss"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"expected a TERAN model with {name}(); {type(model).__name__} has none")
    if hasattr(model, SUBMODULE):
        raise ValueError(f"{type(model).__name__} already has an attribute {SUBMODULE!r}")
    if captions_per_image is not None and image_ids is None and cache is None and getattr(loss, "cache", None) is None:
        if dataset is None:
            raise ValueError(
                "captions_per_image cannot be checked for TERAN without the dataset: TERAN's COCO caption ids are "
                "annotation-list indices, not grouped by image, so ids // k would pair wrong captions as positives. "
                "Pass dataset=train_loader.dataset (the i // k rule is then checked for every caption), or use a "
                "teacher cache (softalign cache build-teran) or image_ids=dataset_image_ids(train_loader.dataset)"
            )
        check_grouped_ids(dataset, captions_per_image)
    hook = SoftAlignHook(
        loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids, accelerator=accelerator
    )
    record = generic.install(
        model, hook, KIND, loss_method="forward_loss", ids_from="forward", optimizer=optimizer, total_name=None
    )
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
            record.handed_out = True  # an optimizer built from these now holds the loss's parameters
            return (groups, *rest)

        record.replace("get_parameters", get_parameters)
    return model


unpatch, is_patched = generic.shim_api(KIND)
