"""``RetrievalEvaluator``: image-text retrieval evaluation in the sentence-transformers evaluator
convention -- ``evaluator(model, output_path=None, epoch=-1, steps=-1) -> dict`` of metrics,
with ``evaluator.primary_metric`` ("rsum", prefixed by ``name``) and ``greater_is_better``;
usable as the ``evaluator=`` of a SentenceTransformerTrainer or called from any training loop. With
sentence-transformers installed it subclasses its ``BaseEvaluator`` (so the trainer takes it as one evaluator and
writes its metrics into the model card); without it, a stand-in base with the same methods.

Model protocol (first that applies):

1. ``encode_fn(model, images, captions) -> (image_emb [Ni, D], text_emb [Nt, D])`` given to the
   evaluator;
2. the model has ``encode_image(images, batch_size=...)`` and ``encode_text(captions, batch_size=...)``;
3. the model has ``encode(items, batch_size=..., convert_to_tensor=True)`` for both modalities
   (e.g. a sentence-transformers CLIP model);
4. ``images`` / ``captions`` are already embeddings and ``model`` is ``None``.

Embeddings are L2-normalised (``normalize=True``) so scores are cosine similarities.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from softalign.eval.crossmodal import DEFAULT_KS, _as_tensor, check_caption_to_image
from softalign.eval.recall import cross_modal_recall

__all__ = ["RetrievalEvaluator", "encode_with_model"]


class _StandaloneEvaluatorBase:
    """sentence-transformers' ``BaseEvaluator`` protocol, for installs without sentence-transformers."""

    def __init__(self) -> None:
        self.greater_is_better = True
        self.primary_metric: str | None = None

    def prefix_name_to_metrics(self, metrics: dict[str, float], name: str) -> dict[str, float]:
        if not name:
            return {k: float(v) for k, v in metrics.items()}
        if self.primary_metric is not None and not self.primary_metric.startswith(name + "_"):
            self.primary_metric = f"{name}_{self.primary_metric}"
        return {f"{name}_{k}": float(v) for k, v in metrics.items()}

    def store_metrics_in_model_card_data(
        self, model: Any, metrics: dict[str, Any], epoch: int = 0, step: int = 0
    ) -> None:
        model.model_card_data.set_evaluation_metrics(self, metrics, epoch, step)


def _evaluator_base() -> type:
    """sentence-transformers' evaluator base class (``BaseEvaluator`` from 6.0, ``SentenceEvaluator`` before), or
    the stand-in when sentence-transformers is not installed."""
    try:
        from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

        return BaseEvaluator
    except ImportError:
        pass
    try:
        from sentence_transformers.evaluation import SentenceEvaluator

        return SentenceEvaluator
    except ImportError:
        return _StandaloneEvaluatorBase


def encode_with_model(model: Any, images: Any, captions: Any, batch_size: int = 64, encode_fn: Callable | None = None):
    """Embed images and captions following the model protocol in the module docstring."""
    if encode_fn is not None:
        return encode_fn(model, images, captions)
    if model is None:
        return images, captions
    with torch.no_grad():
        if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
            return model.encode_image(images, batch_size=batch_size), model.encode_text(
                captions, batch_size=batch_size
            )
        if hasattr(model, "encode"):
            return (
                model.encode(images, batch_size=batch_size, convert_to_tensor=True),
                model.encode(captions, batch_size=batch_size, convert_to_tensor=True),
            )
    raise TypeError(
        f"cannot embed with {type(model).__name__}: give the model encode_image/encode_text (or encode) "
        "methods, or pass encode_fn=callable(model, images, captions) -> (image_emb, text_emb)"
    )


class RetrievalEvaluator(_evaluator_base()):  # type: ignore[misc]
    """Cross-modal (and optionally uni-modal) retrieval evaluator.

    Args:
        images, captions: the test items (anything the model encodes) or precomputed embeddings.
        caption_to_image: LongTensor [N_captions], image index of each caption.
        protocol: ``plain`` | ``coco1k`` | ``coco5k`` | ``coco`` | ``f30k`` (see protocols.py).
        image_labels / text_labels: optional class/group labels; when given, i2i / t2t
            precision@1, R-precision and MAP@R are added (``i2i_*`` / ``t2t_*``).
        name: prefix of every metric key (``{name}_rsum``) and of the CSV file.
    """

    def __init__(
        self,
        images: Any,
        captions: Any,
        caption_to_image: Any,
        *,
        protocol: str = "plain",
        ks: Sequence[int] = DEFAULT_KS,
        name: str = "",
        batch_size: int = 64,
        normalize: bool = True,
        chunk_size: int | None = 512,
        image_labels: Any | None = None,
        text_labels: Any | None = None,
        encode_fn: Callable | None = None,
        write_csv: bool = True,
    ):
        super().__init__()
        if len(images) == 0 or len(captions) == 0:
            raise ValueError(f"empty test set: {len(images)} images, {len(captions)} captions")
        self.caption_to_image = check_caption_to_image(caption_to_image, len(captions), len(images))
        self.images, self.captions = images, captions
        self.protocol, self.ks, self.name = protocol, tuple(ks), name
        self.batch_size, self.normalize, self.chunk_size = batch_size, normalize, chunk_size
        self.image_labels, self.text_labels = image_labels, text_labels
        self.encode_fn, self.write_csv = encode_fn, write_csv
        self.greater_is_better = True
        self.primary_metric = "rsum" if protocol != "coco" else "coco5k/rsum"
        self.csv_file = f"retrieval_evaluation{'_' + name if name else ''}_results.csv"

    def compute_metrics(self, model: Any) -> dict[str, float]:
        img, txt = encode_with_model(model, self.images, self.captions, self.batch_size, self.encode_fn)
        img = _as_tensor(img, "image embeddings").detach().float().cpu()
        txt = _as_tensor(txt, "text embeddings").detach().float().cpu()
        if img.shape[0] != len(self.images) or txt.shape[0] != len(self.captions):
            raise ValueError(
                f"the model returned {img.shape[0]} image / {txt.shape[0]} text embeddings for "
                f"{len(self.images)} images / {len(self.captions)} captions"
            )
        if self.normalize:
            img = torch.nn.functional.normalize(img, dim=-1)
            txt = torch.nn.functional.normalize(txt, dim=-1)
        m = cross_modal_recall(
            image_emb=img,
            text_emb=txt,
            caption_to_image=self.caption_to_image,
            protocol=self.protocol,
            ks=self.ks,
            chunk_size=self.chunk_size,
        )
        metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        if self.image_labels is not None or self.text_labels is not None:
            from softalign.eval.unimodal import unimodal_retrieval

            if self.image_labels is not None:
                metrics.update(unimodal_retrieval(img, self.image_labels, prefix="i2i_"))
            if self.text_labels is not None:
                metrics.update(unimodal_retrieval(txt, self.text_labels, prefix="t2t_"))
        return metrics

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        metrics = self.compute_metrics(model)
        if output_path is not None and self.write_csv:
            os.makedirs(output_path, exist_ok=True)
            path = os.path.join(output_path, self.csv_file)
            keys = sorted(metrics)
            new = not os.path.isfile(path)
            with open(path, "a", newline="", encoding="utf-8") as f:  # append-only log, like ST
                w = csv.writer(f)
                if new:
                    w.writerow(["epoch", "steps"] + keys)
                w.writerow([epoch, steps] + [metrics[k] for k in keys])
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        if model is not None and hasattr(model, "model_card_data"):
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    @property
    def description(self) -> str:
        return "Retrieval"

    def get_config_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "ks": list(self.ks)}
