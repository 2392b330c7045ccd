"""Shared machinery of the trainer shims: ids, teacher inputs, Accelerate, optimizer and patch records.

Nothing here knows a particular trainer. :class:`SoftAlignHook` turns ``(embeddings or scores, caption ids)``
into the soft-label terms of a :class:`~softalign.losses.SoftAlignLoss`; the helpers below install and remove
method wrappers on a trainer object so that ``unpatch`` restores it exactly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from softalign.losses import VSEHingeLoss

__all__ = [
    "SoftAlignHook",
    "as_ids",
    "find_argument",
    "PatchRecord",
    "PATCH_ATTR",
    "STATE_KEY",
    "TERMS",
    "match_criterion_hinge",
]

#: attribute under which a patched trainer keeps its :class:`PatchRecord`
PATCH_ATTR = "_softalign_patch"
#: key of the soft-label loss state inside an extended checkpoint
STATE_KEY = "softalign_loss"
#: soft-label term names (the parts of SoftAlignLoss other than the base loss) and their weight attributes
TERMS = (("csa", "alpha"), ("usa", "beta"), ("cmc", "gamma"))


def as_ids(ids: Any, device=None, name: str = "ids") -> torch.Tensor:
    """Caption ids (tensor, numpy array, list or tuple of ints, as collate functions return them) as int64 ``[B]``."""
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        try:
            t = torch.as_tensor(list(ids) if isinstance(ids, (tuple, list)) else ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of integer caption ids, got {type(ids).__name__}") from exc
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        # the precomp datasets of VSE++/SCAN compute image ids with '/', ids themselves must stay integral
        if t.is_floating_point() and bool((t == t.round()).all()):
            t = t.round()
        else:
            raise TypeError(f"{name} must hold integer caption ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one caption id per pair), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def find_argument(fn: Callable, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Value that argument ``name`` of ``fn`` takes in the call ``fn(*args, **kwargs)`` (``None`` if absent)."""
    if name in kwargs:
        return kwargs[name]
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(name)


def loss_needs_teacher(loss: nn.Module) -> bool:
    """Whether the loss's enabled terms (CSA, USA, a teacher-filtered miner) need teacher similarities."""
    needs = getattr(loss, "_needs_teacher", None)
    if callable(needs):
        return bool(needs())
    return getattr(loss, "csa", None) is not None or getattr(loss, "usa", None) is not None


class SoftAlignHook:
    """Evaluates a :class:`~softalign.losses.SoftAlignLoss` for one batch from its caption ids.

    Args:
        loss: the soft-label loss (its ``base`` may be ``"none"`` when the trainer keeps its own criterion).
        cache: a teacher cache (``image_ids(ids)``, ``similarities(ids, device)`` and, for multi-process
            training, ``embeddings(ids, device)``), used when the loss was built without one.
        captions_per_image: without any cache, ``image_id = caption_id // captions_per_image`` (VSE++/SCAN
            precomp data: 5 captions per image, caption ``i`` shows image ``i // 5``).
        image_ids: callable ``caption ids -> image ids``; overrides ``captions_per_image``.
        accelerator: an ``accelerate.Accelerator``; the loss is moved to ``accelerator.device`` (never passed to
            ``accelerator.prepare``) and evaluated under ``accelerator.autocast()`` when mixed precision is on.
            Without one, the loss follows the device of the embeddings it receives.

    Calling the hook returns the loss's parts ``{"loss", "base"?, "csa"?, "usa"?, "cmc"?}``; :meth:`weighted`
    turns them into the weighted terms whose sum is ``loss``.
    """

    def __init__(
        self,
        loss: nn.Module,
        *,
        cache: Any = None,
        captions_per_image: int | None = None,
        image_ids: Callable[[torch.Tensor], Any] | None = None,
        accelerator: Any = None,
    ):
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a softalign SoftAlignLoss (an nn.Module), got {type(loss).__name__}")
        if captions_per_image is not None and (
            isinstance(captions_per_image, bool)
            or int(captions_per_image) != captions_per_image
            or int(captions_per_image) < 1
        ):
            raise ValueError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
        if image_ids is not None and not callable(image_ids):
            raise TypeError(
                f"image_ids must be a callable mapping caption ids to image ids, got {type(image_ids).__name__}"
            )
        for method in ("image_ids", "lookup"):
            if cache is not None and not callable(getattr(cache, method, None)):
                raise TypeError(
                    f"cache must provide {method}(ids, ...) (a softalign TeacherCache), got {type(cache).__name__}"
                )
        self.loss, self.cache, self.accelerator = loss, cache, accelerator
        self.captions_per_image = None if captions_per_image is None else int(captions_per_image)
        self.image_ids_fn = image_ids
        loss_cache = getattr(loss, "cache", None)
        if loss_cache is None and cache is None:
            if loss_needs_teacher(loss):
                raise ValueError(
                    "the soft-label terms (alpha > 0 or beta > 0) need teacher similarities: build the "
                    "loss with cache=TeacherCache.load(...) or pass cache=... to the integration"
                )
            if image_ids is None and captions_per_image is None:
                raise ValueError(
                    "without a teacher cache the caption->image map must come from captions_per_image "
                    "(e.g. 5 for COCO/Flickr30k precomp data) or image_ids=callable"
                )
        self._placed_on = None
        self._logged_shares = None
        #: set by a shim that adds the soft terms to the host's own loss (TERAN): the shares are logged after the
        #: host's loss joins them (add_host_share)
        self.host_loss_in_shares = False
        if accelerator is not None:
            loss.to(accelerator.device)

    # ------------------------------------------------------------------------------------------
    @property
    def base_enabled(self) -> bool:
        return getattr(self.loss, "base", None) is not None

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.loss.parameters() if p.requires_grad]

    def _autocast(self):
        acc = self.accelerator
        if acc is not None and str(getattr(acc, "mixed_precision", "no")) not in ("no", "None"):
            return acc.autocast()
        return contextlib.nullcontext()

    def image_ids(self, ids: Any, device=None) -> torch.Tensor:
        """Image id of each caption id: from the loss's cache, this hook's cache, ``image_ids`` or
        ``ids // captions_per_image`` (first that applies)."""
        ids = as_ids(ids, device)
        loss_cache = getattr(self.loss, "cache", None)
        if loss_cache is not None:
            out = as_ids(loss_cache.image_ids(ids), device, "cache.image_ids(ids)")
        elif self.cache is not None:
            out = as_ids(self.cache.image_ids(ids), device, "cache.image_ids(ids)")
        elif self.image_ids_fn is not None:
            out = as_ids(self.image_ids_fn(ids), device, "image_ids(ids)")
        else:
            out = torch.div(ids, int(self.captions_per_image or 1), rounding_mode="floor")
        if out.shape != ids.shape:
            raise ValueError(
                f"the caption->image map returned shape {tuple(out.shape)} for "
                f"{tuple(ids.shape)} caption ids; expected one image id per caption"
            )
        return out

    def _place(self, device) -> None:
        """Without an accelerator, follow the trainer's tensors: VSE++/SCAN/TERAN move their batches with
        ``.cuda()`` themselves, so the loss goes where the embeddings are. ``Module.to`` keeps the parameter
        objects, so the optimizer's param group stays valid."""
        if self.accelerator is not None or self._placed_on == device:
            return
        tensors = list(self.loss.parameters()) + list(self.loss.buffers())
        if any(t.device != device for t in tensors):
            self.loss.to(device)
        self._placed_on = device

    def loss_inputs(self, ids: Any, device) -> dict[str, Any]:
        """Keyword arguments of ``SoftAlignLoss.forward`` that carry ids, image ids and the teacher."""
        ids = as_ids(ids, device)
        if getattr(self.loss, "cache", None) is not None:
            return {"ids": ids}  # the loss maps ids to images and looks the teacher up itself
        out: dict[str, Any] = {"ids": ids, "image_ids": self.image_ids(ids, device)}
        if self.cache is not None and loss_needs_teacher(self.loss):
            out["teacher"] = self.cache  # the loss reads the teacher rows at the ids (gathered across processes)
        return out

    def __call__(
        self,
        image_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        ids: Any = None,
        *,
        scores: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if ids is None:
            raise ValueError(
                "the soft-label loss needs the batch's caption ids (the dataset indices the collate "
                "function returns, in the batch's order)"
            )
        ref = scores if scores is not None else image_emb
        if ref is None:
            raise ValueError("pass image_emb and text_emb ([B, D]) or scores ([B, B] images x captions)")
        ids = as_ids(ids, ref.device)
        if ids.shape[0] != ref.shape[0]:
            raise ValueError(
                f"got {ids.shape[0]} caption ids for a batch of {ref.shape[0]} pairs; "
                "pass one id per row, in the (sorted) order of the batch"
            )
        self._place(ref.device)
        kwargs = self.loss_inputs(ids, ref.device)
        with self._autocast():
            parts = self.loss(image_emb, text_emb, scores=scores, return_parts=True, **kwargs)
        if not isinstance(parts, dict) or "loss" not in parts:
            raise TypeError(f"{type(self.loss).__name__} did not return its parts dict with return_parts=True")
        if not self.host_loss_in_shares:
            self._log_gradient_shares()
        return parts

    def add_host_share(self, host_loss: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Put the host trainer's own loss (e.g. TERAN's matching and alignment losses, which the shim adds the
        soft terms to) into the loss's last gradient shares as ``"host"``: its gradient norm on the tensors the host's
        loss reads, next to each weighted term's (:mod:`softalign.losses.diagnostics`); then log them."""
        from softalign.losses.diagnostics import gradient_norms, shares_from_norms

        shares = getattr(self.loss, "gradient_shares", None)
        if shares is not None and host_loss.requires_grad:
            norms = {k[len("norm_") :]: v for k, v in shares.items() if k.startswith("norm_")}
            norms["host"] = gradient_norms({"host": host_loss}, [t for t in tensors if t.requires_grad])["host"]
            setattr(self.loss, "gradient_shares", shares_from_norms(norms))  # noqa: B010 - SoftAlignLoss's attribute
        self._log_gradient_shares()

    def _log_gradient_shares(self) -> None:
        """Log each new term-balance diagnostic of the loss (``logging`` logger ``softalign``, level INFO)."""
        shares = getattr(self.loss, "gradient_shares", None)
        if shares is None or shares is self._logged_shares:
            return
        self._logged_shares = shares
        terms = ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items() if not k.startswith("norm_"))
        logging.getLogger("softalign").info(
            "gradient shares at loss step %d: %s", getattr(self.loss, "_steps", 0) - 1, terms
        )

    def gradient_share_values(self) -> dict[str, float]:
        """``{"grad_share_soft": CSA + USA share}`` of the last diagnostic, for the trainer's logger; {} before."""
        shares = getattr(self.loss, "gradient_shares", None)
        return {} if shares is None else {"grad_share_soft": float(shares["soft"])}

    def weighted(self, parts: Mapping[str, torch.Tensor], base_name: str = "base") -> dict[str, torch.Tensor]:
        """``{"csa": alpha * L_csa, "usa": beta * L_usa, "cmc": gamma * L_cmc}`` (enabled terms only), plus the
        base loss under ``base_name`` when the loss has one; the values sum to ``parts["loss"]``."""
        out: dict[str, torch.Tensor] = {}
        if "base" in parts:
            out[base_name] = parts["base"]
        for name, weight in TERMS:
            if name in parts:
                out[name] = float(getattr(self.loss, weight)) * parts[name]
        return out

    def soft_terms(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the soft-label terms only (CSA, USA, CMC), without the base loss."""
        terms = [v for k, v in self.weighted(parts).items() if k != "base"]
        if not terms:
            return parts["loss"].new_zeros(())
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------------------------------
    def register(self, optimizer: Any) -> bool:
        """Add the loss's heads and temperatures to ``optimizer`` as a new param group (once)."""
        params = self.parameters()
        if optimizer is None or not params:
            return False
        ids = {id(p) for p in params}
        for group in optimizer.param_groups:
            if any(id(p) in ids for p in group["params"]):
                return False  # already there (e.g. the user added them)
        optimizer.add_param_group({"params": params})
        return True

    def unregister(self, optimizer: Any) -> int:
        """Take the loss's heads and temperatures out of ``optimizer`` (and their optimizer state): the param group
        :meth:`register` added, and the loss's tensors inside any other group (TERAN's optimizer is built from
        ``get_parameters()``, which the shim extends, so they sit in its first group). Groups left empty are
        dropped. Returns how many tensors were removed."""
        if optimizer is None:
            return 0
        ids = {id(p) for p in self.loss.parameters()}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
        kept, removed = [], 0
        for group in inner.param_groups:
            mine = [p for p in group["params"] if id(p) in ids]
            for p in mine:
                inner.state.pop(p, None)
            removed += len(mine)
            if mine and len(mine) == len(group["params"]):
                continue  # the loss's own group
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            kept.append(group)
        # rebuilt by identity: list.remove would compare the groups' dicts of tensors (ambiguous truth value)
        inner.param_groups[:] = kept
        return removed

    def state_dict(self) -> dict[str, Any]:
        state = {
            k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in self.loss.state_dict().items()
        }
        config = getattr(self.loss, "get_config_dict", None)
        return {"state": state, "config": config() if callable(config) else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "state" not in state:
            raise ValueError(
                f"expected the softalign loss state saved by a patched model (a dict with 'state'), "
                f"got {type(state).__name__}"
            )
        self.loss.load_state_dict(state["state"])


_MISSING = object()


class PatchRecord:
    """What a shim changed on a trainer object, so that ``unpatch`` puts back exactly what was there."""

    def __init__(self, obj: Any, hook: SoftAlignHook, kind: str):
        self.obj, self.hook, self.kind = obj, hook, kind
        self.saved: dict[str, Any] = {}
        self.optimizer: Any = None
        self.submodule: str | None = None
        self.ids: Any = None  # caption ids of the step in flight
        self.undo: list[Callable[[], None]] = []  # other changes to reverse on restore (e.g. adopted settings)
        self.handed_out = False  # TERAN: get_parameters() returned the loss's parameters to an optimizer

    def replace(self, name: str, value: Any) -> None:
        """Set ``obj.<name> = value`` on the instance, remembering the instance attribute it shadows (if any)."""
        if name not in self.saved:
            self.saved[name] = self.obj.__dict__.get(name, _MISSING) if hasattr(self.obj, "__dict__") else _MISSING
        setattr(self.obj, name, value)

    def restore(self, optimizer: Any = None) -> None:
        """Undo every change, each step independently: a step that fails does not leave the rest half patched
        (the first error is raised after all steps ran). ``optimizer``: another optimizer to take the loss's
        parameters out of (one built from the patched ``get_parameters()``, as TERAN's train.py does)."""
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - collected and re-raised below
                errors.append(err)

        def put_back(name: str, old: Any) -> None:
            if old is _MISSING:
                self.obj.__dict__.pop(name, None)
            else:
                setattr(self.obj, name, old)

        for name, old in list(self.saved.items()):
            attempt(functools.partial(put_back, name, old))
        self.saved.clear()
        while self.undo:
            attempt(self.undo.pop())
        attempt(lambda: self.hook.unregister(self.optimizer))
        if optimizer is not None and optimizer is not self.optimizer:
            attempt(lambda: self.hook.unregister(optimizer))
        submodule = self.submodule
        if submodule is not None and isinstance(self.obj, nn.Module):
            attempt(lambda: delattr(self.obj, submodule))
            self.submodule = None
        if errors:
            raise errors[0]

    @contextlib.contextmanager
    def capturing(self, ids: Any):
        """Keep ``ids`` for the loss call inside one training step; cleared afterwards, even on error."""
        previous, self.ids = self.ids, ids
        try:
            yield
        finally:
            self.ids = previous


def get_record(obj: Any, kind: str | None = None) -> PatchRecord | None:
    record = getattr(obj, "__dict__", {}).get(PATCH_ATTR)
    if record is not None and kind is not None and record.kind != kind:
        raise ValueError(f"this object is patched by softalign.integrations.{record.kind}, not {kind}")
    return record


def new_record(obj: Any, hook: SoftAlignHook, kind: str) -> PatchRecord:
    existing = get_record(obj)
    if existing is not None:
        raise ValueError(
            f"{type(obj).__name__} is already patched by softalign.integrations."
            f"{existing.kind}; call unpatch(model) first"
        )
    record = PatchRecord(obj, hook, kind)
    obj.__dict__[PATCH_ATTR] = record
    return record


def drop_record(obj: Any) -> PatchRecord | None:
    return obj.__dict__.pop(PATCH_ATTR, None)


def extend_list_state(original: Callable[[], Any], hook: SoftAlignHook) -> Callable[[], Any]:
    """Wrap a ``state_dict()`` that returns a list of encoder states (VSE++, SCAN) with the loss state appended
    as a last element ``{STATE_KEY: ...}``; the unpatched ``load_state_dict`` reads ``[0]`` and ``[1]`` only, so
    the checkpoint stays loadable by the original code."""

    def state_dict(*args, **kwargs):
        state = original(*args, **kwargs)
        if not isinstance(state, list):
            raise TypeError(
                f"expected the trainer's state_dict() to return a list of module states, got {type(state).__name__}"
            )
        return state + [{STATE_KEY: hook.state_dict()}]

    return state_dict


def restore_list_state(original: Callable[[Any], Any], hook: SoftAlignHook) -> Callable[[Any], Any]:
    """Inverse of :func:`extend_list_state`: feed the original ``load_state_dict`` the encoder states and the loss
    its own; a checkpoint saved before patching (no loss entry) leaves the loss as initialised."""

    def load_state_dict(state, *args, **kwargs):
        if isinstance(state, (list, tuple)) and state and isinstance(state[-1], Mapping) and STATE_KEY in state[-1]:
            hook.load_state_dict(state[-1][STATE_KEY])
            state = list(state[:-1])
        return original(state, *args, **kwargs)

    return load_state_dict


def capture_ids(record: PatchRecord, method: str, ids_arg: str = "ids") -> None:
    """Wrap ``obj.<method>`` so that the ids it receives (argument ``ids_arg``) are kept in ``record.ids`` for the
    duration of the call: the loss computed inside that call (a training step) sees them."""
    obj = record.obj
    original = getattr(obj, method, None)
    if not callable(original):
        raise TypeError(f"{type(obj).__name__} has no method {method!r} to take the ids from")
    try:
        params = inspect.signature(original).parameters
        accepts = ids_arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        accepts = True
    if not accepts:
        raise TypeError(f"{type(obj).__name__}.{method} has no argument {ids_arg!r}; pass ids_arg=<its name>")

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with record.capturing(find_argument(original, ids_arg, args, kwargs)):
            return original(*args, **kwargs)

    record.replace(method, wrapper)


def log_values(
    obj: Any, logger_attr: str | None, values: Mapping[str, torch.Tensor], n: int, hook: SoftAlignHook | None = None
) -> None:
    """``obj.<logger_attr>.update(name, float(value), n)`` for each value, when such a logger exists (the
    ``LogCollector`` of VSE++/SCAN/TERAN); with ``hook`` also the soft terms' last gradient share
    (``grad_share_soft``)."""
    logger = getattr(obj, logger_attr, None) if logger_attr else None
    update = getattr(logger, "update", None)
    if callable(update):
        for name, value in values.items():
            update(name, float(value.detach()), n)
        if hook is not None:
            for name, share in hook.gradient_share_values().items():
                update(name, share, 1)


def match_criterion_hinge(
    loss: Any, criterion: Any, trainer: str, *, adopt: bool = True, stacklevel: int = 3
) -> Callable[[], None] | None:
    """Make the hinge that replaces a trainer's criterion use that criterion's ``margin`` and ``max_violation``.

    VSE++ and SCAN build ``ContrastiveLoss(margin=opt.margin, max_violation=opt.max_violation)``; VSE++'s
    default is the *sum* of hinges (no ``--max_violation``), while ``SoftAlignLoss``'s default base
    ``"vsepp"`` is the max-violation hinge with margin 0.2. When the loss's base is a
    :class:`~softalign.losses.VSEHingeLoss` whose settings differ from the criterion's, ``adopt=True`` sets
    ``loss.base.margin`` / ``loss.base.max_violation`` to the criterion's (what the training script asked for)
    and warns that it did; ``adopt=False`` only warns. Both warnings name the two settings and the
    ``SoftAlignLoss(...)`` call that matches the trainer. Returns a callable that puts the loss's own settings
    back (``None`` when nothing changed). Other bases (InfoNCE, custom modules) are left alone.
    """
    base = getattr(loss, "base", None)
    if not isinstance(base, VSEHingeLoss):
        return None
    sim = getattr(criterion, "sim", None)
    if getattr(sim, "__name__", "") == "order_sim":
        warnings.warn(
            f"{trainer}'s criterion uses the order-embedding similarity (--measure order), but the "
            "SoftAlignLoss base that replaces it scores with cosine similarity; build the loss with "
            'base="none" to keep the trainer\'s criterion and add only the soft-label terms',
            UserWarning,
            stacklevel=stacklevel,
        )
    upstream: dict[str, Any] = {}
    margin = getattr(criterion, "margin", None)
    if isinstance(margin, numbers.Real) and not isinstance(margin, bool):
        upstream["margin"] = float(margin)
    max_violation = getattr(criterion, "max_violation", None)
    if isinstance(max_violation, (bool, int)):
        upstream["max_violation"] = bool(max_violation)
    differs = {k: v for k, v in upstream.items() if getattr(base, k) != v}
    if not differs:
        return None
    stated = getattr(loss, "_stated", {"base": True, "margin": True, "alpha": True, "beta": True})
    silent = all(not stated["base" if k == "max_violation" else "margin"] for k in differs)
    ours = f"margin={base.margin:g}, max_violation={base.max_violation}"
    target = {"margin": base.margin, "max_violation": base.max_violation, **upstream}
    theirs = ", ".join(f"{k}={target[k]:g}" if k == "margin" else f"{k}={target[k]}" for k in upstream)
    flags = []
    if "margin" in upstream:
        flags.append(f"--margin {target['margin']:g}")
    if "max_violation" in upstream:
        flags.append("--max_violation" if target["max_violation"] else "no --max_violation")
    call = (
        f'SoftAlignLoss(base="{"vsepp" if target["max_violation"] else "vsepp_sum"}", '
        f"margin={target['margin']:g}, ...)"
    )
    if not adopt:
        warnings.warn(
            f"{trainer}'s criterion uses {theirs} ({', '.join(flags)}) but the SoftAlignLoss base hinge "
            f"that replaces it uses {ours}; keeping the loss's settings (match_criterion=False). To train "
            f"with {trainer}'s settings build {call}",
            UserWarning,
            stacklevel=stacklevel,
        )
        return None
    previous: dict[str, Any] = {k: getattr(base, k) for k in differs}
    for k, v in differs.items():
        setattr(base, k, v)
    # weights left to their defaults follow the adopted base (DEFAULT_WEIGHTS: a sum of hinges is larger)
    weights_before = (loss.alpha, loss.beta)
    if "max_violation" in differs:
        from softalign.losses.combined import DEFAULT_WEIGHTS

        new_alpha, new_beta = DEFAULT_WEIGHTS["vsepp" if base.max_violation else "vsepp_sum"]
        if not stated["alpha"] and loss.alpha > 0:
            loss.alpha = new_alpha
        if not stated["beta"] and loss.beta > 0:
            loss.beta = new_beta
    if silent:
        logging.getLogger("softalign").info(
            "%s: the SoftAlignLoss hinge follows %s's criterion (%s; %s), since the loss did not state its own",
            trainer,
            trainer,
            theirs,
            ", ".join(flags),
        )
    else:
        warnings.warn(
            f"{trainer}'s criterion uses {theirs} ({', '.join(flags)}) but the SoftAlignLoss base hinge "
            f"had {ours}; the patched model now uses {trainer}'s settings (loss.base."
            f"{' and loss.base.'.join(differs)} changed). To state them in your code, build {call}; to "
            "keep the loss's own settings, pass match_criterion=False",
            UserWarning,
            stacklevel=stacklevel,
        )

    def undo() -> None:
        for k, v in previous.items():
            setattr(base, k, v)
        loss.alpha, loss.beta = weights_before

    return undo
