"""Reference trainer: a recipe -> a trained dual encoder, on Accelerate (CPU, one GPU or many; mixed precision).

Per epoch: shuffle the training pairs, ``loss = SoftAlignLoss(img, txt, ids=caption_ids)`` (the loss is never
passed through ``accelerator.prepare``; its heads and temperatures are added to the optimizer), evaluate the
validation split when ``data.validation`` gives one (cross-modal R@K / rsum, uni-modal precision@1 / MAP@R when
labels exist, see :func:`evaluate_embeddings`; ``train.keep_best`` keeps the best epoch's weights,
:mod:`softalign.train.selection`), append a line to ``metrics.jsonl`` (an accelerate tracker; ``softalign train
--report-to`` adds TensorBoard / W&B) and then checkpoint with accelerate's ``save_state``
(:mod:`softalign.train.checkpoint`: model, optimizer, RNG, the loss as safetensors, epoch / step / recipe / vocab as
JSON). The checkpoint is the commit point: ``resume=True`` continues from it at the next epoch, drops
the ``metrics.jsonl`` lines of later (uncommitted) epochs and an unparsable (torn) line, and refuses a recipe that
differs from the checkpoint's in anything but :data:`RESUME_MUTABLE`. At the end the test split is scored once, on
the selected weights (the best validation epoch, or the last), and its embeddings are saved as
``embeddings_test.safetensors`` (keys ``image``, ``text``, ``caption_to_image``, ``image_labels``, ``text_labels``,
and ``image_uni`` / ``text_uni`` when the loss has USA heads) for ``softalign eval --embeddings``, and
``results.json`` holds the final metrics and the resolved recipe.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softalign.data.base import RetrievalData
from softalign.io import atomic_write_text
from softalign.teacher_inputs import TeacherEmbeddings
from softalign.train.checkpoint import (  # noqa: F401 - load_checkpoint: a public name
    TrainProgress,
    latest_checkpoint,
    load_checkpoint,
    read_progress,
    register_checkpoint_hooks,
    restore_training_state,
    save_training_state,
)
from softalign.train.evaluation import (  # noqa: F401 - public names of softalign.train.trainer
    encode_split,
    encode_uni_modal,
    evaluate_embeddings,
    evaluate_student,
    save_embeddings,
    uni_modal_heads,
)
from softalign.train.recipe import Recipe
from softalign.train.resume import (  # noqa: F401 - public names of softalign.train.trainer
    RESUME_MUTABLE,
    ResumeMismatchError,
    _describe_differences,
    _flatten,
    recipe_differences,
)


# ------------------------------------------------------------------------------------------------ data
def load_splits(recipe: Recipe) -> tuple[RetrievalData, RetrievalData | None, RetrievalData]:
    """(train, validation or None, test) :class:`RetrievalData` for ``recipe.data``: ``data.validation`` names a
    split, or cuts a fraction of the training images off (:func:`cut_validation`)."""
    d: Any = recipe.data  # the schema guarantees the fields each kind needs
    v = d.validation
    if d.kind == "demo":
        from softalign.data.demo import build_demo_data

        splits = build_demo_data(
            captions_per_image=d.captions_per_image or 5,
            test_fraction=d.test_fraction,
            max_images=d.max_images,
            val_fraction=v or 0.0,
        )
        return (splits[0], splits[1], splits[2]) if v else (splits[0], None, splits[1])
    named = [d.train_split, d.test_split] + ([v] if isinstance(v, str) else [])
    train, test, *val = (_load_split(recipe, s) for s in named)
    if isinstance(v, float):
        train, cut = cut_validation(train, v, recipe.seed)
        val = [cut]
    return train, (val[0] if val else None), test


def cut_validation(data: RetrievalData, fraction: float, seed: int) -> tuple[RetrievalData, RetrievalData]:
    """(rest, validation): ``fraction`` of ``data``'s images (at least one, with all their captions) drawn with
    ``seed``, both in the original order; captions are renumbered in each (:meth:`RetrievalData.select_images`)."""
    n = data.num_images
    k = min(n - 1, max(1, int(round(fraction * n))))
    if n < 2:
        raise ValueError(f"data.validation: {data.name}/{data.split} has {n} image(s); a validation split needs >= 2")
    picked = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    rest = np.setdiff1d(np.arange(n), picked)
    return data.select_images(rest.tolist(), split=data.split), data.select_images(picked.tolist(), split="validation")


def _load_split(recipe: Recipe, split: str) -> RetrievalData:
    d: Any = recipe.data
    if d.kind == "karpathy":
        from softalign.data.karpathy import load_karpathy

        return load_karpathy(
            d.path, d.image_root, split, captions_per_image=d.captions_per_image, max_images=d.max_images
        )
    if d.kind == "precomp":
        from softalign.data.precomp import load_precomp

        return load_precomp(d.path, split, captions_per_image=d.captions_per_image or 5, max_images=d.max_images)
    if d.kind == "imagefolder":
        from softalign.data.hf import load_imagefolder

        return load_imagefolder(
            d.path,
            split,
            caption_column=d.caption_column,
            label_column=d.label_column,
            captions_per_image=d.captions_per_image,
        )
    if d.kind == "hf":
        import datasets

        from softalign.data.hf import from_hf_dataset

        ds = (
            datasets.load_from_disk(d.path)[split]
            if Path(d.path).is_dir()
            else datasets.load_dataset(d.path, split=split)
        )
        if d.max_images is not None:
            ds = ds.select(range(min(d.max_images, len(ds))))
        return from_hf_dataset(
            ds,
            d.image_column,
            d.caption_column,
            d.label_column,
            name=str(d.path),
            split=split,
            captions_per_image=d.captions_per_image,
        )
    raise ValueError(f"unknown data.kind {d.kind!r}")  # pragma: no cover - the recipe schema checks it


def image_transform(recipe: Recipe, train: bool):
    from softalign.data.pairs import ImageTransform

    return ImageTransform(recipe.data.image_size, augment=train and recipe.data.augment)


def _feature_shape(data: RetrievalData):
    return tuple(data.images.shape[1:]) if isinstance(data.images, np.ndarray) else None


# --------------------------------------------------------------------------------------------- teacher
def needs_teacher(recipe: Recipe) -> bool:
    """Whether the recipe's loss has a soft-label term (its weights are resolved when the recipe loads)."""
    return bool(recipe.loss.alpha) or bool(recipe.loss.beta)


def teacher_cache_dir(recipe: Recipe) -> Path:
    return Path(recipe.teacher.cache_dir or os.path.join(recipe.output_dir, "teacher_cache"))


def get_teacher_cache(recipe: Recipe, train_data: RetrievalData, accelerator=None, log: Callable = print):
    """The recipe's teacher cache for its training split: :func:`softalign.teachers.for_split.cache_for_split`
    with the recipe's cache directory, teachers and ``teacher.rebuild_on_mismatch``."""
    from softalign.teachers.for_split import cache_for_split

    t = recipe.teacher
    return cache_for_split(
        teacher_cache_dir(recipe),
        train_data,
        text_teacher=t.text,
        image_teacher=t.image,
        chunk_size=t.chunk_size,
        dtype=t.dtype,
        rebuild_on_mismatch=t.rebuild_on_mismatch,
        accelerator=accelerator,
        progress=recipe.train.progress,
        log=log,
        fix_hint="point teacher.cache_dir at the matching cache, or set "
        "teacher.rebuild_on_mismatch=true to rebuild it in place",
    )


def get_view_cache(recipe: Recipe, train_data: RetrievalData, log: Callable = print):
    """The recipe's augmentation-aware teacher views (``teacher.views`` K > 0) for its training images, next to the
    teacher cache (``<cache_dir>-views<K>``): loaded when one for the same images, K and teacher is there, else
    built (seeded by the recipe's seed)."""
    from softalign.teachers.cache import canonical_teacher_name
    from softalign.teachers.views import ViewCache

    t = recipe.teacher
    if t.views < 0:
        raise ValueError(f"{recipe.name}: teacher.views must be >= 0 (0: clean images only), got {t.views}")
    if not recipe.data.augment:
        raise ValueError(
            f"{recipe.name}: teacher.views={t.views} stores augmented views for the loader to replay; "
            "set data.augment: true (or teacher.views: 0)"
        )
    path = Path(f"{teacher_cache_dir(recipe)}-views{t.views}")
    if (path / "views.json").is_file():
        try:
            return ViewCache.load(
                path,
                expect_images=train_data.num_images,
                expect_views=t.views,
                expect_teacher=canonical_teacher_name("image", t.image),
            )
        except ValueError as err:
            log(f"{recipe.name}: {err}: rebuilding")
    log(f"{recipe.name}: teacher embeddings of {t.views} augmented views per training image -> {path}")
    return ViewCache.build(
        path,
        train_data.images,
        t.views,
        image_teacher=t.image,
        seed=recipe.seed,
        dtype=t.dtype,
        progress=recipe.train.progress,
    )


# ------------------------------------------------------------------------------------------ schedules
def lr_factor(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    o = recipe.optim
    warm = 1.0 if o.warmup_steps <= 0 else min(1.0, (step + 1) / o.warmup_steps)
    if o.schedule == "constant":
        return warm
    if o.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        decay = o.lr_decay_factor if (o.lr_decay_epoch is not None and epoch >= o.lr_decay_epoch) else 1.0
        return warm * decay
    if o.schedule_interval == "epoch":  # CUSA: timm's CosineLRScheduler(t_initial=epochs), stepped per epoch
        progress = min(1.0, (step // max(1, steps_per_epoch)) / max(1, total_steps // max(1, steps_per_epoch)))
    else:
        progress = min(1.0, step / max(1, total_steps))
    floor = o.min_lr / o.lr
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(module: torch.nn.Module, lr: float, weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """Optimizer groups of ``module``'s trainable parameters: with ``decay_1d=False``, biases and parameters of
    fewer than 2 dimensions (norm weights, CLIP's class embedding, scalar temperatures) get no weight decay, as in
    open_clip's ``main.py`` and CUSA's ``optim_factory.add_weight_decay`` (which tests ``len(shape) == 1`` and so
    does decay its 0-D temperatures); the rest get ``weight_decay``. An empty group is left out."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if decay_1d or not weight_decay:
        split = [[p for _, p in named], []]
    else:
        split = [
            [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")],
            [p for n, p in named if p.ndim < 2 or n.endswith(".bias")],
        ]
    return [
        {"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd}
        for ps, wd in zip(split, (weight_decay, 0.0))
        if ps
    ]


# -------------------------------------------------------------------------------------------- I/O
def read_metrics(path, max_epoch: int | None = None, log: Callable | None = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (epochs <= ``max_epoch`` when given). A line that is not valid JSON (a torn
    last line after a crash) is skipped with a message instead of failing the resume."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if log is not None:
                log(f"{path}: dropping unparsable line {i + 1}{' (the last)' if i == len(lines) - 1 else ''}: {err}")
            continue
        if max_epoch is None or int(rec.get("epoch", 0)) <= max_epoch:
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ train
def _resolved_recipe_yaml(recipe: Recipe) -> str:
    import yaml

    d = recipe.to_dict()
    d.pop("variants", None)
    return yaml.safe_dump(d, sort_keys=False)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else repr(obj)


def train(
    recipe: Recipe,
    *,
    resume: bool = True,
    accelerator=None,
    train_data: RetrievalData | None = None,
    test_data: RetrievalData | None = None,
    cache=None,
    log: Callable | None = None,
    image_caches: dict[str, torch.Tensor] | None = None,
    val_data: RetrievalData | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` end to end; returns ``{"metrics": test metrics of the selected checkpoint, "selection":
    which checkpoint and why, "history": per-epoch records (``val_*`` on the validation split), "output_dir",
    "seconds"}``. Settings and checkpoints are chosen on ``data.validation``; the test split is scored once, at the
    end. Pre-loaded ``train_data`` / ``val_data`` / ``test_data`` / ``cache`` / decoded ``image_caches``
    (``{"train": tensor, "val": tensor, "test": tensor}``) may be passed to share them between runs; with a
    fraction ``data.validation`` and no ``val_data``, the validation images are cut from ``train_data``.

    The main process holds the output directory's lock (:func:`softalign.locking.directory_lock`) for the whole
    run: a second run into the same directory fails at once, naming the first, instead of interleaving its
    metrics and checkpoints with it. A passed ``accelerator`` can serve several runs one after the other: what a
    run prepares, registers and tracks on it is taken off when the run ends."""
    import contextlib

    from accelerate import Accelerator

    from softalign.locking import directory_lock

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=recipe.train.cpu)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(directory_lock(recipe.output_dir, f"softalign train ({recipe.name})"))
        return _train(
            recipe,
            resume=resume,
            accelerator=accelerator,
            train_data=train_data,
            val_data=val_data,
            test_data=test_data,
            cache=cache,
            log=log,
            image_caches=image_caches,
            cleanup=stack,
        )


def _release(accelerator, prepared: tuple, hooks: list) -> None:
    """Take a finished run's objects off a (possibly shared) accelerator: what ``save_state`` would save next
    (its trackers are ended by :func:`_open_trackers`). ``Accelerator.free_memory`` would drop the caller's objects
    too."""
    for attr in ("_models", "_optimizers", "_dataloaders"):
        getattr(accelerator, attr)[:] = [o for o in getattr(accelerator, attr) if all(o is not p for p in prepared)]
    for h in hooks:
        h.remove()


def _checkpoint_to_resume(recipe: Recipe, root: Path, resume: bool) -> tuple[Path | None, TrainProgress]:
    """The committed checkpoint under ``root`` and its progress, after checking that its recipe matches
    (:func:`recipe_differences`); ``(None, fresh progress)`` without one or with ``resume=False``."""
    path = latest_checkpoint(root) if resume else None
    if path is None:
        return None, TrainProgress(recipe=recipe.to_dict())
    progress = read_progress(path)
    diff = recipe_differences(progress.recipe, recipe)
    if diff:
        raise ResumeMismatchError(
            f"cannot resume from {path}: it was trained with a different recipe ("
            f"{_describe_differences(progress.recipe, recipe, diff)}); only "
            f"{', '.join(sorted(RESUME_MUTABLE))} may change on resume. Use another output_dir or --no-resume"
        )
    progress.recipe = recipe.to_dict()  # the resumed run's (it may differ in RESUME_MUTABLE)
    return path, progress


def _build_optimizer(recipe: Recipe, model: torch.nn.Module, loss_fn: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam(W) over the model's parameter groups and, at ``optim.loss_lr``, the loss's heads and temperatures."""
    o = recipe.optim
    groups = parameter_groups(model, o.lr, o.weight_decay, o.decay_1d)
    if any(p.requires_grad for p in loss_fn.parameters()):
        groups += parameter_groups(loss_fn, o.loss_lr if o.loss_lr is not None else o.lr, o.weight_decay, o.decay_1d)
    opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def _transforms_and_images(
    recipe: Recipe,
    model,
    train_data: RetrievalData,
    eval_splits: dict[str, RetrievalData],
    image_caches: dict[str, torch.Tensor] | None,
):
    """(train transform, test transform, decoded image caches): the model's own preprocessing when it has one
    (open_clip students), else the recipe's; images decoded once when ``data.preload`` allows it."""
    from softalign.data.pairs import preload_images

    caches = dict(image_caches or {})
    own = getattr(model, "image_transform", None)
    train_tf, test_tf = (
        (own(True), own(False)) if callable(own) else (image_transform(recipe, True), image_transform(recipe, False))
    )
    if recipe.data.preload:
        todo = list(eval_splits.items()) + ([("train", train_data)] if not recipe.data.augment else [])
        for split, data in todo:
            if split not in caches and not isinstance(data.images, np.ndarray):
                caches[split] = preload_images(data, test_tf)
    return train_tf, test_tf, caches


def _train_loader(recipe: Recipe, data: RetrievalData, transform, image_cache, view_params=None):
    from torch.utils.data import DataLoader

    from softalign.data.pairs import ImagePairDataset, PairDataset, collate_pairs

    kind = ImagePairDataset if recipe.data.sample == "images" else PairDataset
    if view_params is not None:  # the stored views, replayed (decoded once each with data.preload)
        dataset = kind(data, transform, preload=recipe.data.preload, view_params=view_params)
    else:
        dataset = kind(data, transform)
        dataset.cache = image_cache
    bs = recipe.train.batch_size
    return DataLoader(
        dataset,
        batch_size=bs,
        shuffle=True,
        drop_last=len(dataset) > bs,
        collate_fn=collate_pairs,
        num_workers=recipe.data.num_workers,
    )


def _calibrate(recipe: Recipe, loss_fn, cache, num_processes: int, log: Callable) -> None:
    """tau_s once from the cache, at the global batch the loss sees (per process when ``loss.gather`` is false);
    a resumed loss already holds its calibration."""
    if not (loss_fn._needs_calibration and cache is not None):
        return
    global_batch = recipe.train.batch_size * (num_processes if recipe.loss.gather else 1)
    cal = loss_fn.calibrate(cache, batch_size=global_batch, seed=recipe.seed)
    assert cal is not None  # the loss has CSA or USA, so it calibrated
    log(
        f"{recipe.name}: calibrated soft-label temperature tau_s image {cal['image']:.4g}, text "
        f"{cal['text']:.4g} (normalised entropy {cal['target_entropy']} at batch {cal['batch_size']})"
    )


def _open_trackers(
    recipe: Recipe, accelerator, jsonl, epochs_done: int, log: Callable, cleanup
) -> list[dict[str, Any]]:
    """Start the user's trackers (``Accelerator(log_with=...)``, ``softalign train --report-to``; they write under
    the accelerator's ``project_dir``, one run each) and add ``metrics.jsonl``, keeping only the lines of the epochs
    the checkpoint covers (the commit point); returns those records. The run's trackers end with it."""
    before = list(accelerator.trackers)
    if accelerator.log_with:
        config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in _flatten(recipe.to_dict()).items()
            if k != "variants"
        }
        accelerator.init_trackers(recipe.name.replace("/", "_"), config=config)
    accelerator.trackers.append(jsonl)
    mine = [t for t in accelerator.trackers if all(t is not b for b in before)]
    cleanup.callback(
        lambda: accelerator.trackers.__setitem__(
            slice(None), [t for t in accelerator.trackers if all(t is not m for m in mine)]
        )
    )
    cleanup.callback(lambda: [t.finish() for t in mine if accelerator.is_main_process])
    if not (accelerator.is_main_process and jsonl.path.is_file()):
        return []
    # the test line of a finished run is written again when the run ends: only the epochs' lines are kept
    history = [
        r
        for r in read_metrics(jsonl.path, max_epoch=epochs_done, log=log)
        if not any(k.startswith("test_") for k in r)
    ]
    atomic_write_text(jsonl.path, "".join(json.dumps(r) + "\n" for r in history))
    return history


def _train(
    recipe: Recipe,
    *,
    resume: bool,
    accelerator,
    train_data: RetrievalData | None,
    val_data: RetrievalData | None,
    test_data: RetrievalData | None,
    cache,
    log: Callable | None,
    image_caches: dict[str, torch.Tensor] | None,
    cleanup,
) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from softalign.losses import SoftAlignLoss
    from softalign.train.model_factory import build_model
    from softalign.train.models import vocab_of
    from softalign.train.selection import BestCheckpoint
    from softalign.train.tracking import JsonlTracker

    t0 = time.time()
    main = accelerator.is_main_process
    log = log or accelerator.print
    out = Path(recipe.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # 1. data (train, validation, test)
    set_seed(recipe.seed)
    if train_data is None or test_data is None:
        train_data, val_data, test_data = load_splits(recipe)
    elif val_data is None and isinstance(recipe.data.validation, float):
        train_data, val_data = cut_validation(train_data, recipe.data.validation, recipe.seed)

    # 2. the student (a missing model package fails here, before any teacher runs), the cache, the loss and the
    #    optimizer; a resume checks the recipe before building anything
    ckpt_path, progress = _checkpoint_to_resume(recipe, out / "checkpoints", resume)
    if main:
        atomic_write_text(out / "recipe.yaml", _resolved_recipe_yaml(recipe))
    model = build_model(recipe.model, train_data.captions, _feature_shape(train_data), vocab_words=progress.vocab)
    progress.vocab = vocab_of(model)
    if cache is None and needs_teacher(recipe):
        with accelerator.main_process_first():
            cache = get_teacher_cache(recipe, train_data, accelerator=None, log=log)
    views = None
    if cache is not None and recipe.teacher.views:
        with accelerator.main_process_first():
            views = get_view_cache(recipe, train_data, log=log)
    if cache is not None and getattr(cache, "num_captions", train_data.num_captions) != train_data.num_captions:
        raise ValueError(
            f"{recipe.name}: the teacher cache holds {cache.num_captions} captions but the training "
            f"split has {train_data.num_captions} (data.validation cut its images off): build the cache "
            "for the training split the run trains on"
        )
    # seeded again: building a cache consumes torch's RNG, and the loss must not depend on whether it was built
    set_seed(recipe.seed)
    # CUSA's layout: USA's uni-modal heads take the backbone features, in parallel to the cross-modal heads
    feature_dims = (int(model.feature_dims[0]), int(model.feature_dims[1])) if recipe.loss.use_heads else None
    loss_fn = SoftAlignLoss(embed_dim=feature_dims, cache=cache, return_parts=True, **recipe.loss.loss_kwargs())
    log(
        f"{recipe.name}: loss {loss_fn._config_summary()}, gamma={loss_fn.gamma}"
        + ("" if needs_teacher(recipe) else " (the base loss alone: loss.alpha = loss.beta = 0)")
    )
    usa_on_features = recipe.loss.use_heads and loss_fn.usa is not None
    loss_fn.to(accelerator.device)  # never through accelerator.prepare; its parameters are in the optimizer
    optimizer = _build_optimizer(recipe, model, loss_fn)
    eval_splits = {"test": test_data, **({"val": val_data} if val_data is not None else {})}
    train_tf, test_tf, image_caches = _transforms_and_images(recipe, model, train_data, eval_splits, image_caches)
    loader = _train_loader(
        recipe, train_data, train_tf, image_caches.get("train"), None if views is None else views.params
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    jsonl = JsonlTracker(out / "metrics.jsonl")  # metrics.jsonl: one of accelerate's trackers
    hooks = register_checkpoint_hooks(accelerator, loss_fn, progress)
    cleanup.callback(_release, accelerator, (model, optimizer, loader), hooks)

    # 3. resume (accelerate's load_state), calibration, the schedule (torch's LambdaLR, one step per batch)
    initial_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    if ckpt_path is not None:
        restore_training_state(accelerator, ckpt_path, model, optimizer=optimizer, loss_fn=loss_fn)
        log(f"resuming {recipe.name} from {ckpt_path} after epoch {progress.epoch}")
    _calibrate(recipe, loss_fn, cache, accelerator.num_processes, log)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * recipe.train.epochs
    for g, lr0 in zip(optimizer.param_groups, initial_lrs):  # checkpoints before LambdaLR kept "base_lr"
        g["initial_lr"] = g.get("initial_lr", g.get("base_lr", lr0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(recipe, s, total_steps, steps_per_epoch), last_epoch=progress.step - 1
    )

    # 4. metrics: the user's trackers (Accelerator(log_with=...)) and metrics.jsonl, cut back to the checkpoint
    history = _open_trackers(recipe, accelerator, jsonl, progress.epoch, log, cleanup)

    # 5. the epochs: train, evaluate the validation split when due (and keep the best checkpoint by it), log the
    #    epoch's line, then commit it with a checkpoint
    loop = _EpochLoop(
        recipe,
        accelerator,
        model,
        loss_fn,
        optimizer,
        scheduler,
        loader,
        progress,
        usa_on_features,
        out / "checkpoints",
        views=None if views is None else (views, cache),
    )
    unwrapped = accelerator.unwrap_model(model)
    best = BestCheckpoint(out / "best", recipe.train.keep_best, progress)
    if val_data is None and main and progress.epoch < recipe.train.epochs:
        log(
            f"{recipe.name}: no data.validation: nothing is evaluated while training; the last epoch is scored on "
            "test once, at the end"
        )

    def evaluate(data: RetrievalData, split: str, save_to=None) -> dict[str, float]:
        return evaluate_student(
            unwrapped,
            loss_fn,
            data,
            test_tf,
            recipe.train.eval_batch_size,
            accelerator.device,
            image_caches.get(split),
            usa_on_features,
            save_to=save_to,
        )

    for epoch in range(progress.epoch, recipe.train.epochs):
        record = loop.run_epoch(epoch)
        last = epoch + 1 == recipe.train.epochs
        ev = recipe.train.eval_every
        if main and val_data is not None and (last or (ev > 0 and (epoch + 1) % ev == 0)):
            val = evaluate(val_data, "val")
            record.update({f"val_{k}": v for k, v in val.items()})
            if best.offer(epoch + 1, val, unwrapped, loss_fn):
                log(
                    f"{recipe.name}: best validation {best.metric} so far ({val[str(best.metric)]:.2f}) -> "
                    f"{best.folder}"
                )
        accelerator.wait_for_everyone()
        if main:  # the metrics line first, then the checkpoint: the checkpoint commits the epoch
            accelerator.log(record, step=record["step"])
            history.append(record)
            msg = f"{recipe.name} epoch {epoch + 1}/{recipe.train.epochs} loss {record.get('train_loss', 0):.4f}"
            log(msg + (f" val rsum {record['val_rsum']:.1f}" if "val_rsum" in record else ""))
        if recipe.train.checkpoint_every > 0 and ((epoch + 1) % recipe.train.checkpoint_every == 0 or last):
            loop.checkpoint(epoch + 1)

    # 6. the test split, once, on the selected checkpoint; results.json says which one and why
    final: dict[str, float] = {}
    selection: dict[str, Any] = {}
    if main:
        selection = best.select(unwrapped, loss_fn, last_epoch=progress.epoch)
        final = evaluate(test_data, "test", save_to=out / "embeddings_test.safetensors")
        accelerator.log({"epoch": progress.epoch, **{f"test_{k}": v for k, v in final.items()}}, step=progress.step)
        log(
            f"{recipe.name}: test (checkpoint of epoch {selection['epoch']}, {selection['why']}): "
            + ", ".join(f"{k} {final[k]:.2f}" for k in ("i2t_r1", "t2i_r1", "rsum") if k in final)
        )
    result = {
        "name": recipe.name,
        "variant": recipe.variant,
        "seed": recipe.seed,
        "metrics": final,
        "selection": selection,
        "loss_config": _jsonable(loss_fn.get_config_dict()),
        "history": history,
        "output_dir": str(out),
        "seconds": round(time.time() - t0, 2),
        "recipe": recipe.to_dict(),
    }
    if main:
        atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    return result


class _EpochLoop:
    """One epoch of optimizer steps, with the mid-epoch checkpoints of ``train.checkpoint_steps`` and the resume
    of a run that stopped inside an epoch (accelerate's ``skip_first_batches``)."""

    def __init__(
        self,
        recipe: Recipe,
        accelerator,
        model,
        loss_fn,
        optimizer,
        scheduler,
        loader,
        progress: TrainProgress,
        usa_on_features: bool,
        checkpoint_root: Path,
        views=None,
    ):
        self.recipe, self.accelerator, self.model, self.loss_fn = recipe, accelerator, model, loss_fn
        self.views = views  # (ViewCache, TeacherCache): the teacher embedding of the view each item shows
        self.optimizer, self.scheduler, self.loader, self.progress = optimizer, scheduler, loader, progress
        self.usa_on_features, self.checkpoint_root = usa_on_features, checkpoint_root
        self.clip_params = list(model.parameters()) + [p for p in loss_fn.parameters() if p.requires_grad]

    def checkpoint(self, epochs_done: int, batch: int = 0, partial: dict[str, Any] | None = None) -> None:
        p = self.progress
        p.epoch, p.batch, p.partial = epochs_done, batch, partial
        save_training_state(self.accelerator, self.checkpoint_root, p)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based); returns its metrics record (``epoch``, ``step``, ``lr``,
        ``epoch_seconds``, ``train_*`` loss means, ``grad_share_*``)."""
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        r, acc, p = self.recipe, self.accelerator, self.progress
        set_seed(r.seed * 100003 + epoch)  # the epoch's shuffle does not depend on where we resumed
        self.model.train()
        resumed = epoch == p.epoch and p.batch > 0  # a mid-epoch checkpoint: skip the batches it had done
        done = p.batch if resumed else 0
        sums: dict[str, float] = dict((p.partial or {}).get("sums") or {}) if resumed else {}
        n = int((p.partial or {}).get("n") or 0) if resumed else 0
        batches = acc.skip_first_batches(self.loader, done) if resumed else self.loader
        t_epoch = time.time()
        bar = tqdm(
            batches,
            desc=f"{r.name} epoch {epoch + 1}/{r.train.epochs}",
            leave=False,
            initial=done,
            total=len(self.loader),
            disable=not (r.train.progress and acc.is_main_process),
        )
        for batch in bar:
            parts = self.step(batch, epoch)
            n, done = n + 1, done + 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(parts['loss'].detach()):.4f}")
            every = r.train.checkpoint_steps
            if every > 0 and p.step % every == 0 and done < len(self.loader):  # a mid-epoch commit point
                self.checkpoint(epoch, batch=done, partial={"sums": sums, "n": n})
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": p.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": round(time.time() - t_epoch, 3),
        }
        record.update({("train_loss" if k == "loss" else f"train_{k}"): v / max(1, n) for k, v in sums.items()})
        if self.loss_fn.gradient_shares is not None:  # the term-balance diagnostic (share of the gradient norm)
            record.update(
                {
                    f"grad_share_{k}": round(v, 6)
                    for k, v in self.loss_fn.gradient_shares.items()
                    if not k.startswith("norm_")
                }
            )
        return record

    def step(self, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; returns the loss parts."""
        acc, o = self.accelerator, self.recipe.optim
        with acc.autocast():
            img, txt, img_f, txt_f = self.model(batch["image"], batch["caption"], return_features=True)
            feats = dict(image_features=img_f, text_features=txt_f) if self.usa_on_features else {}
            if self.views is not None:  # augmentation-aware soft labels: the teacher saw the view the student sees
                views, cache = self.views
                feats["teacher"] = TeacherEmbeddings(
                    views.image_embeddings(batch["image_id"], batch["view"], img.device),
                    cache.embeddings(batch["id"], device=img.device)[1],
                )
            parts = self.loss_fn(img, txt, ids=batch["id"], image_ids=batch["image_id"], **feats)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.recipe.name}: non-finite loss {loss.item()} at epoch {epoch + 1}, "
                f"step {self.progress.step}; lower optim.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if o.grad_clip:
            acc.clip_grad_norm_(self.clip_params, o.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        return parts
