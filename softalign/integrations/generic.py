"""Soft-label alignment for any trainer that exposes embeddings (or a score matrix) and caption ids.

Three levels, from least to most automatic:

* :func:`soft_align_step` -- a function for loops you own::

      parts = soft_align_step(loss, img_emb, cap_emb, ids, captions_per_image=5)
      (base_loss + parts["soft"]).backward()

* :class:`SoftAlignHook` -- the same as a reusable object that also registers the loss's heads and temperatures
  with an optimizer and saves/restores them (``hook.register(optimizer)``, ``hook.state_dict()``).
* :func:`patch` -- wraps a trainer's loss method in place, capturing ids from the method that receives them.
  The wrapped method adds the weighted CSA/USA/CMC terms (CUSA: Huang et al., AAAI 2024; TGDT: Liu et al.,
  IEEE TIP 2023) to what it returned: a tensor gets ``+ alpha L_CSA + beta L_USA + gamma L_CMC``; a dict of
  losses gets named entries ``"csa"``, ``"usa"``, ``"cmc"``. When the loss has a base (``base="vsepp"`` ...) and
  the method returns a tensor, the soft-label loss's total *replaces* the trainer's own criterion (its id-aware
  hinge never treats two captions of one image as negatives); with ``base="none"`` the trainer's criterion is
  kept and the terms are added. Calls without ids (evaluation) run the original method unchanged.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from softalign.integrations._common import (
    PatchRecord,
    SoftAlignHook,
    capture_ids,
    drop_record,
    find_argument,
    get_record,
    log_values,
    new_record,
)

__all__ = ["SoftAlignHook", "soft_align_step", "patch", "unpatch", "default_inputs"]


def soft_align_step(
    loss: nn.Module,
    image_emb: torch.Tensor | None = None,
    text_emb: torch.Tensor | None = None,
    ids: Any = None,
    *,
    scores: torch.Tensor | None = None,
    cache: Any = None,
    captions_per_image: int | None = None,
    image_ids: Callable | None = None,
    accelerator: Any = None,
) -> dict[str, torch.Tensor]:
    """Soft-label terms of one batch.

    Returns ``{"loss": total of the SoftAlignLoss, "soft": alpha L_CSA + beta L_USA + gamma L_CMC,
    "base"?: base loss, "csa"?: alpha L_CSA, "usa"?: beta L_USA, "cmc"?: gamma L_CMC}`` (weighted; only enabled
    terms). ``ids`` are the batch's global caption ids in row order; see :class:`SoftAlignHook` for the
    other arguments. For repeated use build a :class:`SoftAlignHook` once instead.
    """
    hook = SoftAlignHook(
        loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids, accelerator=accelerator
    )
    return _step(hook, image_emb, text_emb, ids, scores)


def _step(hook: SoftAlignHook, image_emb, text_emb, ids, scores) -> dict[str, torch.Tensor]:
    parts = hook(image_emb, text_emb, ids, scores=scores)
    return {"loss": parts["loss"], "soft": hook.soft_terms(parts), **hook.weighted(parts)}


def default_inputs(image_emb, text_emb, *args, **kwargs) -> dict[str, Any]:
    """Inputs of a loss method called as ``method(image_emb, text_emb, ...)`` (VSE++'s ``forward_loss``)."""
    return {"image_emb": image_emb, "text_emb": text_emb}


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def install(
    obj: Any,
    hook: SoftAlignHook,
    kind: str,
    *,
    loss_method: str,
    ids_from: str | None = None,
    ids_arg: str = "ids",
    inputs: Callable[..., Mapping[str, Any]] = default_inputs,
    optimizer: Any = None,
    logger_attr: str | None = "logger",
    base_name: str = "softalign-base",
    total_name: str | None = None,
) -> PatchRecord:
    """Wrap ``obj.<loss_method>`` (and ``obj.<ids_from>``) in place; used by every shim. See :func:`patch`."""
    original = getattr(obj, loss_method, None)
    if not callable(original):
        raise TypeError(f"{type(obj).__name__} has no method {loss_method!r} to patch")
    if ids_from is not None and not callable(getattr(obj, ids_from, None)):
        raise TypeError(f"{type(obj).__name__} has no method {ids_from!r} to take the ids from")
    if not callable(inputs):
        raise TypeError(f"inputs must be a callable returning image_emb/text_emb/scores, got {type(inputs).__name__}")
    strip_ids = ids_from is None and not _accepts(original, ids_arg)
    record = new_record(obj, hook, kind)

    @functools.wraps(original)
    def loss_wrapper(*args, **kwargs):
        if ids_from is None:
            ids = find_argument(original, ids_arg, args, kwargs) if not strip_ids else kwargs.pop(ids_arg, None)
        else:
            ids = record.ids
        if ids is None:  # evaluation, or a caller that has no ids: the trainer's own loss, unchanged
            return original(*args, **kwargs)
        found = dict(inputs(*args, **kwargs))
        unknown = sorted(set(found) - {"image_emb", "text_emb", "scores"})
        if unknown:
            raise ValueError(f"inputs returned unknown key(s) {unknown}; expected image_emb, text_emb, scores")
        shares_before = getattr(hook.loss, "gradient_shares", None)
        parts = hook(found.get("image_emb"), found.get("text_emb"), ids, scores=found.get("scores"))
        weighted = hook.weighted(parts, base_name=base_name)
        ref = found.get("scores") if found.get("scores") is not None else found.get("image_emb")
        assert ref is not None  # hook() refused a call without scores or embeddings
        n = int(ref.shape[0])
        if hook.base_enabled and total_name is not None:
            result = parts["loss"]
            log_values(obj, logger_attr, {total_name: result, **weighted}, n, hook)
            return result
        out = original(*args, **kwargs)
        if getattr(hook.loss, "gradient_shares", None) is not shares_before:  # measured in this call: the host's
            # own loss (to which the soft terms are added) joins the shares, on the tensors it reads
            host = [v for v in (out.values() if isinstance(out, Mapping) else [out]) if isinstance(v, torch.Tensor)]
            if host:
                hook.add_host_share(
                    torch.stack([v.float() for v in host]).sum(),
                    [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)],
                )
        soft = {k: v for k, v in weighted.items() if k != base_name or not isinstance(out, torch.Tensor)}
        log_values(obj, logger_attr, soft, n, hook)
        if isinstance(out, Mapping):
            clash = sorted(set(out) & set(soft))
            if clash:
                raise ValueError(f"{loss_method} already returns loss entries named {clash}")
            return {**out, **soft}
        if isinstance(out, torch.Tensor):
            return out + (torch.stack([v.to(out.dtype) for v in soft.values()]).sum() if soft else 0.0)
        raise TypeError(
            f"{type(obj).__name__}.{loss_method} returned {type(out).__name__}; expected a loss tensor "
            "or a dict of loss tensors"
        )

    hook.host_loss_in_shares = total_name is None or not hook.base_enabled
    try:
        if ids_from is not None:
            capture_ids(record, ids_from, ids_arg)
        record.replace(loss_method, loss_wrapper)
    except Exception:
        record.restore()
        drop_record(obj)
        raise
    if optimizer is not None:
        hook.register(optimizer)
        record.optimizer = optimizer
    return record


def patch(
    obj: Any,
    loss: nn.Module,
    *,
    loss_method: str,
    ids_from: str | None = None,
    ids_arg: str = "ids",
    inputs: Callable[..., Mapping[str, Any]] = default_inputs,
    optimizer: Any = None,
    cache: Any = None,
    captions_per_image: int | None = None,
    image_ids: Callable | None = None,
    accelerator: Any = None,
    logger_attr: str | None = "logger",
    returns: str = "tensor",
    replace_base: bool = True,
) -> Any:
    """Add soft-label alignment to ``obj.<loss_method>`` in place; returns ``obj``.

    Args:
        loss_method: name of the method that computes the loss from embeddings or scores; it returns a tensor
            or a dict of named losses.
        ids_from: name of the method that receives the batch's caption ids (e.g. a ``train_step(batch, ids)``)
            when the loss method does not; ``None``: ids are the loss method's own ``ids_arg`` argument
            (removed before calling the original if it does not take one).
        ids_arg: the argument holding the ids.
        inputs: ``inputs(*args, **kwargs) -> {"image_emb", "text_emb", "scores"}`` from the loss method's
            arguments; default: the first two positional arguments are the image and text embeddings.
        optimizer: the loss's heads and temperatures are added to it as a new param group.
        returns: ``"tensor"`` (the method returns one loss) or ``"dict"`` (named losses, summed by the loop:
            entries ``csa``/``usa``/``cmc`` and, with a base, ``softalign-base`` are added).
        replace_base: for ``returns="tensor"``, when the loss has a base, return the loss's total instead of
            the original criterion (``False``: keep the original and add only the soft-label terms).
        logger_attr: attribute of ``obj`` holding a logger with ``update(name, value, n)`` (VSE++'s
            ``LogCollector``); the weighted terms are logged there when it exists.
        cache, captions_per_image, image_ids, accelerator: see :class:`SoftAlignHook`.

    :func:`unpatch` restores the object and removes the param group.
    """
    if returns not in ("tensor", "dict"):
        raise ValueError(f"returns must be 'tensor' or 'dict', got {returns!r}")
    hook = SoftAlignHook(
        loss, cache=cache, captions_per_image=captions_per_image, image_ids=image_ids, accelerator=accelerator
    )
    install(
        obj,
        hook,
        "generic",
        loss_method=loss_method,
        ids_from=ids_from,
        ids_arg=ids_arg,
        inputs=inputs,
        optimizer=optimizer,
        logger_attr=logger_attr,
        total_name="loss" if (replace_base and returns == "tensor") else None,
    )
    return obj


def unpatch(obj: Any, optimizer: Any = None, kind: str | None = None) -> Any:
    """Undo :func:`patch` (or any softalign shim; ``kind`` insists on one): original methods back, the loss's
    parameters out of the optimizer the shim registered them with and, when given, out of ``optimizer`` too (an
    optimizer built from the patched model's parameter list after patching, e.g. TERAN's). Without it, a warning says
    when such an optimizer may still hold them. The record is dropped even if a step fails, so the object can be
    patched again."""
    record = get_record(obj, kind)
    if record is None:
        where = f"softalign.integrations.{kind}" if kind else "softalign.integrations"
        raise ValueError(f"{type(obj).__name__} is not patched by {where}")
    if optimizer is None and record.optimizer is None and record.handed_out:
        n = sum(1 for _ in record.hook.loss.parameters())
        warnings.warn(
            f"an optimizer built from the patched model's parameters still holds the loss's {n} "
            "parameters: pass it as unpatch(model, optimizer=optimizer) to take them out",
            UserWarning,
            stacklevel=3,
        )
    try:
        record.restore(optimizer)
    finally:
        drop_record(obj)
    return obj


def is_patched(obj: Any, kind: str | None = None) -> bool:
    """Whether ``obj`` is patched by a softalign shim (by the ``kind`` one, when given)."""
    record = get_record(obj)
    return record is not None and (kind is None or record.kind == kind)


def shim_api(kind: str):
    """The ``unpatch(model, optimizer=None)`` and ``is_patched(model)`` of the shim ``kind``: one implementation
    (:func:`unpatch`, :func:`is_patched`) shared by every upstream module."""

    def unpatch_kind(model: Any, optimizer: Any = None) -> Any:
        return unpatch(model, optimizer, kind=kind)

    def is_patched_kind(model: Any) -> bool:
        return is_patched(model, kind)

    unpatch_kind.__name__, is_patched_kind.__name__ = "unpatch", "is_patched"
    unpatch_kind.__doc__ = (
        f"Undo softalign.integrations.{kind}.patch: see softalign.integrations.generic.unpatch "
        "(``optimizer``: one built from the patched model after patching)."
    )
    is_patched_kind.__doc__ = f"Whether the model is patched by softalign.integrations.{kind}."
    return unpatch_kind, is_patched_kind
