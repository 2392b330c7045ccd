"""Reference trainer: a recipe -> a trained dual encoder, on Accelerate (CPU, one GPU or many; mixed precision).

Per epoch: shuffle the training pairs, ``loss = SoftAlignLoss(img, txt, ids=caption_ids)`` (the loss is never
passed through ``accelerator.prepare``; its heads and temperatures are added to the optimizer), evaluate the test
split (cross-modal R@K / rsum, uni-modal precision@1 / MAP@R when labels exist), append a line to
``metrics.jsonl`` and write ``checkpoints/last.pt`` atomically (model, loss, optimizer, epoch, step, vocab).
``resume=True`` continues from that checkpoint at the next epoch. At the end the test embeddings are saved as
``embeddings_test.safetensors`` (keys ``image``, ``text``, ``caption_to_image``, ``image_labels``,
``text_labels``) for ``softalign eval --embeddings``, and ``results.json`` holds the final metrics.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from softalign.data.base import RetrievalData
from softalign.train.recipe import Recipe

CHECKPOINT = "last.pt"


# ------------------------------------------------------------------------------------------------ data
def load_splits(recipe: Recipe) -> Tuple[RetrievalData, RetrievalData]:
    """(train, test) :class:`RetrievalData` for ``recipe.data``."""
    d = recipe.data
    if d.kind == "demo":
        from softalign.data.demo import build_demo_data

        return build_demo_data(captions_per_image=d.captions_per_image or 5, test_fraction=d.test_fraction,
                               max_images=d.max_images)
    if d.kind == "karpathy":
        from softalign.data.karpathy import load_karpathy

        return tuple(load_karpathy(d.path, d.image_root, s, captions_per_image=d.captions_per_image,
                                   max_images=d.max_images) for s in (d.train_split, d.test_split))
    if d.kind == "precomp":
        from softalign.data.precomp import load_precomp

        return tuple(load_precomp(d.path, s, captions_per_image=d.captions_per_image or 5, max_images=d.max_images)
                     for s in (d.train_split, d.test_split))
    if d.kind == "imagefolder":
        from softalign.data.hf import load_imagefolder

        return tuple(load_imagefolder(d.path, s, caption_column=d.caption_column, label_column=d.label_column,
                                      captions_per_image=d.captions_per_image) for s in (d.train_split, d.test_split))
    if d.kind == "hf":
        import datasets

        from softalign.data.hf import from_hf_dataset

        out = []
        for s in (d.train_split, d.test_split):
            ds = datasets.load_from_disk(d.path)[s] if Path(d.path).is_dir() else datasets.load_dataset(d.path, split=s)
            if d.max_images is not None:
                ds = ds.select(range(min(d.max_images, len(ds))))
            out.append(from_hf_dataset(ds, d.image_column, d.caption_column, d.label_column, name=str(d.path),
                                       split=s, captions_per_image=d.captions_per_image))
        return tuple(out)
    raise ValueError(f"unknown data.kind {d.kind!r}")  # pragma: no cover - the recipe schema checks it


def image_transform(recipe: Recipe, train: bool):
    from softalign.data.pairs import ImageTransform

    return ImageTransform(recipe.data.image_size, augment=train and recipe.data.augment, seed=recipe.seed)


def _feature_shape(data: RetrievalData):
    return tuple(data.images.shape[1:]) if isinstance(data.images, np.ndarray) else None


# --------------------------------------------------------------------------------------------- teacher
def needs_teacher(recipe: Recipe) -> bool:
    return recipe.loss.alpha > 0 or recipe.loss.beta > 0


def teacher_cache_dir(recipe: Recipe) -> Path:
    return Path(recipe.teacher.cache_dir or os.path.join(recipe.output_dir, "teacher_cache"))


def get_teacher_cache(recipe: Recipe, train_data: RetrievalData, accelerator=None, log: Callable = print):
    """Load the recipe's teacher cache, building it from the training split the first time."""
    from softalign.teachers import TeacherCache

    path = teacher_cache_dir(recipe)
    if (path / "manifest.json").is_file():
        cache = TeacherCache.load(path)
        if cache.num_captions != train_data.num_captions or cache.num_images != train_data.num_images:
            raise ValueError(f"teacher cache {path} holds {cache.num_captions} captions / {cache.num_images} images "
                             f"but the training split has {train_data.num_captions} / {train_data.num_images}: "
                             "point teacher.cache_dir at the cache of this split, or delete it to rebuild")
        if not torch.equal(torch.as_tensor(cache.caption_to_image).long().cpu(),
                           torch.as_tensor(train_data.caption_to_image).long()):
            raise ValueError(f"teacher cache {path} has a different caption->image map than the training split")
        return cache
    images = train_data.images
    if isinstance(images, np.ndarray):
        raise FileNotFoundError(
            f"no teacher cache at {path}: with precomputed features the image teacher needs the original images; "
            "build the cache once with `softalign cache` over the training captions and images and set "
            "teacher.cache_dir to it")
    from softalign.data.hf import DatasetColumn

    kw = {}
    if isinstance(images, DatasetColumn):
        images, kw = images.dataset, {"image_column": images.column}
    log(f"building the teacher cache in {path} ({train_data.num_captions} captions, {train_data.num_images} images)")
    return TeacherCache.build(path, train_data.captions, images, train_data.caption_to_image,
                              text_teacher=recipe.teacher.text, image_teacher=recipe.teacher.image,
                              chunk_size=recipe.teacher.chunk_size, dtype=recipe.teacher.dtype,
                              accelerator=accelerator, progress=recipe.train.progress, **kw)


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
    progress = min(1.0, step / max(1, total_steps))
    floor = o.min_lr / o.lr
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# -------------------------------------------------------------------------------------------- I/O
def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(path, model, loss_fn, optimizer, epoch: int, step: int, recipe: Recipe, vocab=None) -> None:
    """Atomic checkpoint: ``{"model", "loss", "optimizer", "epoch" (epochs done), "step", "recipe", "vocab"}``."""
    _atomic_torch_save({"model": model.state_dict(), "loss": loss_fn.state_dict(),
                        "optimizer": optimizer.state_dict(), "epoch": int(epoch), "step": int(step),
                        "recipe": recipe.to_dict(), "vocab": vocab}, Path(path))


def load_checkpoint(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def save_embeddings(path, image, text, data: RetrievalData) -> None:
    """Test-split embeddings in the format ``softalign eval --embeddings`` reads."""
    from safetensors.torch import save_file

    tensors = {"image": image.float().contiguous().cpu(), "text": text.float().contiguous().cpu(),
               "caption_to_image": torch.as_tensor(data.caption_to_image, dtype=torch.long)}
    if data.image_labels is not None:
        tensors["image_labels"] = torch.as_tensor(data.image_labels, dtype=torch.long)
        tensors["text_labels"] = torch.as_tensor(data.text_labels, dtype=torch.long)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"split": data.split, "name": data.name})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def encode_split(model, data: RetrievalData, transform, batch_size: int, device,
                 image_cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image_emb [N_images, D], text_emb [N_captions, D]) of a split, on CPU."""
    from torch.utils.data import DataLoader

    from softalign.data.pairs import ImageDataset, collate_pairs

    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(ImageDataset(data, transform, image_cache), batch_size=batch_size, shuffle=False,
                            collate_fn=collate_pairs)
        img = torch.cat([model.encode_image(b["image"].to(device)).float().cpu() for b in loader])
        txt = torch.cat([model.encode_text(data.captions[i:i + batch_size]).float().cpu()
                         for i in range(0, data.num_captions, batch_size)])
    finally:
        model.train(was_training)
    return img, txt


def evaluate_embeddings(image, text, data: RetrievalData) -> Dict[str, float]:
    """Cross-modal R@1/5/10, medr, rsum; with labels also i2i / t2t precision@1, R-precision, MAP@R (x100)."""
    from softalign.eval import cross_modal_recall, unimodal_retrieval

    out = {k: float(v) for k, v in cross_modal_recall(image_emb=image, text_emb=text,
                                                      caption_to_image=torch.as_tensor(data.caption_to_image),
                                                      ks=(1, 5, 10)).items()}
    if data.image_labels is not None:
        for prefix, emb, lab in (("i2i_", image, data.image_labels), ("t2t_", text, data.text_labels)):
            if np.bincount(np.unique(np.asarray(lab), return_inverse=True)[1].ravel()).max() < 2:
                continue  # no label shared by two items: leave-one-out retrieval is undefined
            res = unimodal_retrieval(emb, torch.as_tensor(lab), prefix=prefix)
            for k in ("precision_at_1", "r_precision", "map_at_r"):
                out[prefix + k] = 100.0 * float(res[prefix + k])
    return out


# ------------------------------------------------------------------------------------------------ train
def _resolved_recipe_yaml(recipe: Recipe) -> str:
    import yaml

    d = recipe.to_dict()
    d.pop("variants", None)
    return yaml.safe_dump(d, sort_keys=False)


def train(recipe: Recipe, *, resume: bool = True, accelerator=None, train_data: Optional[RetrievalData] = None,
          test_data: Optional[RetrievalData] = None, cache=None, log: Optional[Callable] = None,
          image_caches: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Train ``recipe`` end to end; returns ``{"metrics": final test metrics, "history": per-epoch records,
    "output_dir", "seconds"}``. Pre-loaded ``train_data`` / ``test_data`` / ``cache`` / decoded
    ``image_caches`` (``{"train": tensor, "test": tensor}``) may be passed to share them between runs."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from softalign.data.pairs import ImagePairDataset, PairDataset, collate_pairs, preload_images
    from softalign.losses import SoftAlignLoss
    from softalign.train.models import build_model, vocab_of

    t0 = time.time()
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=recipe.train.cpu)
    main = accelerator.is_main_process
    log = log or (lambda msg: accelerator.print(msg))
    out = Path(recipe.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(out / "recipe.yaml", _resolved_recipe_yaml(recipe))
    set_seed(recipe.seed)

    if train_data is None or test_data is None:
        train_data, test_data = load_splits(recipe)
    if cache is None and needs_teacher(recipe):
        with accelerator.main_process_first():
            cache = get_teacher_cache(recipe, train_data, accelerator=None, log=log)

    ckpt_path = out / "checkpoints" / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if (resume and ckpt_path.is_file()) else None
    if ckpt is not None:
        saved_model = ckpt["recipe"]["model"]
        if saved_model != dataclasses.asdict(recipe.model):
            raise ValueError(f"cannot resume from {ckpt_path}: it was trained with model {saved_model}, the recipe "
                             f"asks for {dataclasses.asdict(recipe.model)}; use another output_dir or --no-resume")
    model = build_model(recipe.model, train_data.captions, _feature_shape(train_data),
                        vocab_words=ckpt["vocab"] if ckpt is not None else None)
    embed_dim = recipe.model.embed_dim
    loss_fn = SoftAlignLoss(embed_dim=embed_dim if recipe.loss.use_heads else None, cache=cache,
                            return_parts=True, **recipe.loss.loss_kwargs())
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
    loss_fn.to(accelerator.device)

    o = recipe.optim
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": o.lr, "base_lr": o.lr}]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        lr = o.loss_lr if o.loss_lr is not None else o.lr
        groups.append({"params": loss_params, "lr": lr, "base_lr": lr})
    opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(groups, lr=o.lr, weight_decay=o.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])

    image_caches = dict(image_caches or {})
    train_tf, test_tf = image_transform(recipe, True), image_transform(recipe, False)
    if recipe.data.preload and not recipe.data.augment:
        if "train" not in image_caches and not isinstance(train_data.images, np.ndarray):
            image_caches["train"] = preload_images(train_data, test_tf)
    if recipe.data.preload and "test" not in image_caches and not isinstance(test_data.images, np.ndarray):
        image_caches["test"] = preload_images(test_data, test_tf)
    train_set = (ImagePairDataset if recipe.data.sample == "images" else PairDataset)(train_data, train_tf)
    train_set.cache = image_caches.get("train")
    bs = recipe.train.batch_size
    loader = DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=len(train_set) > bs,
                        collate_fn=collate_pairs, num_workers=recipe.data.num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * recipe.train.epochs
    start_epoch = int(ckpt["epoch"]) if ckpt is not None else 0
    step = int(ckpt["step"]) if ckpt is not None else 0
    if ckpt is not None:
        log(f"resuming {recipe.name} from {ckpt_path} after epoch {start_epoch}")

    metrics_path = out / "metrics.jsonl"
    history = []
    if main and metrics_path.is_file():  # keep the lines of the epochs the checkpoint covers
        kept = [ln for ln in metrics_path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("epoch", 0) <= start_epoch]
        history = [json.loads(ln) for ln in kept]
        _atomic_text(metrics_path, "".join(ln + "\n" for ln in kept))

    unwrapped = accelerator.unwrap_model(model)
    final: Dict[str, float] = {}
    for epoch in range(start_epoch, recipe.train.epochs):
        set_seed(recipe.seed * 100003 + epoch)  # the epoch's shuffle does not depend on where we resumed
        model.train()
        sums: Dict[str, float] = {}
        n = 0
        t_epoch = time.time()
        bar = tqdm(loader, desc=f"{recipe.name} epoch {epoch + 1}/{recipe.train.epochs}",
                   disable=not (recipe.train.progress and main), leave=False)
        for batch in bar:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(recipe, step, total_steps, steps_per_epoch)
            with accelerator.autocast():
                img, txt = model(batch["image"], batch["caption"])
                parts = loss_fn(img, txt, ids=batch["id"], image_ids=batch["image_id"])
            loss = parts["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{recipe.name}: non-finite loss {loss.item()} at epoch {epoch + 1}, "
                                         f"step {step}; lower optim.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if o.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            step += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        record: Dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                  "epoch_seconds": round(time.time() - t_epoch, 3)}
        record.update({("train_loss" if k == "loss" else f"train_{k}"): v / max(1, n) for k, v in sums.items()})
        last = epoch + 1 == recipe.train.epochs
        ev = recipe.train.eval_every
        if main and (last or (ev > 0 and (epoch + 1) % ev == 0)):
            img_e, txt_e = encode_split(unwrapped, test_data, test_tf, recipe.train.eval_batch_size,
                                        accelerator.device, image_caches.get("test"))
            final = evaluate_embeddings(img_e, txt_e, test_data)
            record.update({f"test_{k}": v for k, v in final.items()})
            if last:
                save_embeddings(out / "embeddings_test.safetensors", img_e, txt_e, test_data)
        accelerator.wait_for_everyone()
        if main:
            if recipe.train.checkpoint_every > 0 and ((epoch + 1) % recipe.train.checkpoint_every == 0 or last):
                save_checkpoint(ckpt_path, unwrapped, loss_fn, optimizer, epoch + 1, step, recipe, vocab_of(unwrapped))
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            history.append(record)
            msg = f"{recipe.name} epoch {epoch + 1}/{recipe.train.epochs} loss {record.get('train_loss', 0):.4f}"
            if "test_rsum" in record:
                msg += f" rsum {record['test_rsum']:.1f}"
            log(msg)
    if main and not final and history:  # resumed a finished run: report the stored final metrics
        final = {k[5:]: v for k, v in history[-1].items() if k.startswith("test_")}
    result = {"name": recipe.name, "variant": recipe.variant, "seed": recipe.seed, "metrics": final,
              "history": history, "output_dir": str(out), "seconds": round(time.time() - t0, 2)}
    if main:
        _atomic_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    return result
