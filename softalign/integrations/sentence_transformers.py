"""sentence-transformers: :class:`~softalign.losses.SoftAlignLoss` as a sentence-transformers loss.

The training dataset has two input columns and a ``label`` column:

* the first column is the *image side* (images for a CLIP-style model, or queries / anchor texts for text-text
  retrieval), the second the *captions*;
* ``label`` holds each row's **caption id**: the row of its caption in the teacher cache (soft labels,
  positives). Rows whose captions belong to the same cache image are positives of each other.

::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from softalign.eval import RetrievalEvaluator
    from softalign.integrations.sentence_transformers import SoftAlignSTLoss
    from softalign.losses import SoftAlignLoss
    from softalign.teachers import TeacherCache

    model = SentenceTransformer("all-MiniLM-L6-v2")
    loss = SoftAlignSTLoss(model, SoftAlignLoss(base="infonce", cache=TeacherCache.load("cache/train")))
    trainer = SentenceTransformerTrainer(model=model, train_dataset=train_ds, loss=loss,
                                         evaluator=RetrievalEvaluator(queries, captions, caption_to_image),
                                         callbacks=[loss.checkpoint_callback])   # the loss in checkpoints
    trainer.train()                        # trainer.train(resume_from_checkpoint=True) restores the loss too

The adapter is an ``nn.Module`` holding the model and the soft-label loss, so the trainer's optimizer (built from
the loss module's parameters) also trains the loss's heads and temperatures. It returns the *weighted* terms
(``{"base", "csa", "usa", "cmc"}``, :meth:`SoftAlignLoss.weighted_parts`): the trainer sums the dict and logs each
entry, and nothing is counted twice. sentence-transformers' checkpoints hold the model alone:
``loss.checkpoint_callback`` (a ``transformers.TrainerCallback``) writes the loss's state (heads, temperatures,
calibration, step counter) as ``softalign_loss.safetensors`` into each ``checkpoint-N`` folder and restores it
when ``train(resume_from_checkpoint=...)`` starts; a training run without the callback warns once. For text-text
retrieval, the cache's image table holds the teacher
embeddings of the first column (e.g. ``softalign cache import-npy`` with the anchors' teacher embeddings as the
"image" features).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from softalign.losses import SoftAlignLoss

__all__ = ["SoftAlignSTLoss", "LOSS_FILE"]

#: the loss's state in a sentence-transformers ``checkpoint-N`` folder
LOSS_FILE = "softalign_loss.safetensors"


def _checkpoint_callback(loss: nn.Module):
    """A ``TrainerCallback`` that saves ``loss``'s state into each ``checkpoint-N`` folder (``on_save``) and loads it
    back when a resumed training starts (``on_train_begin``, after the trainer restored the model and its step)."""
    from transformers import TrainerCallback

    class SoftAlignLossCheckpoint(TrainerCallback):
        registered = False

        def on_init_end(self, args, state, control, **kwargs):
            self.registered = True

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            from softalign.io import atomic_save_tensors

            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                atomic_save_tensors(
                    os.path.join(folder, LOSS_FILE),
                    {k: v.detach().cpu().contiguous() for k, v in loss.state_dict().items()},
                )

        def on_train_begin(self, args, state, control, **kwargs):
            self.registered = True
            if state.global_step == 0:
                return  # a fresh start
            from safetensors.torch import load_file

            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", LOSS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} is missing: the "
                    "SoftAlignLoss state (heads, temperatures, calibration) was not saved with "
                    "that checkpoint; resume from a checkpoint of a run with "
                    "callbacks=[loss.checkpoint_callback], or start over"
                )
            device = next((t.device for t in loss.state_dict().values()), None)
            loss.load_state_dict({k: v.to(device) for k, v in load_file(path).items()})

    return SoftAlignLossCheckpoint()


class SoftAlignSTLoss(nn.Module):
    """``SoftAlignLoss`` with the sentence-transformers loss convention ``loss(sentence_features, labels)``.

    Args:
        model: the ``SentenceTransformer`` being trained (both columns are embedded by it).
        loss: a :class:`~softalign.losses.SoftAlignLoss`, usually with a ``cache``; default
            ``SoftAlignLoss(base="infonce")``.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None = None):
        super().__init__()
        from softalign.losses import SoftAlignLoss

        loss = loss if loss is not None else SoftAlignLoss(base="infonce")
        if not isinstance(loss, SoftAlignLoss):
            raise TypeError(f"loss must be a softalign SoftAlignLoss, got {type(loss).__name__}")
        self.model = model
        self.loss: SoftAlignLoss = loss
        #: pass it to the trainer (``callbacks=[loss.checkpoint_callback]``): the loss's state in every checkpoint
        self.checkpoint_callback = _checkpoint_callback(loss)

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(
                f"SoftAlignSTLoss takes two input columns (the image or query side, then the "
                f"captions) and a 'label' column of caption ids; got {len(features)} input columns"
            )
        if labels is None:
            raise ValueError("SoftAlignSTLoss needs the caption ids as the dataset's 'label' column")
        if self.training and not self.checkpoint_callback.registered:
            self.checkpoint_callback.registered = True  # warn once
            warnings.warn(
                "SoftAlignSTLoss: the trainer was built without callbacks=[loss.checkpoint_callback]: "
                "its checkpoints will not hold the loss's heads, temperatures and calibration, and a "
                "resume would restart them",
                UserWarning,
                stacklevel=2,
            )
        image_side, captions = (self.model(f)["sentence_embedding"] for f in features)
        parts = self.loss(image_side, captions, ids=labels, return_parts=True)
        return self.loss.weighted_parts(parts)

    @property
    def citation(self) -> str:
        return str(self.loss.citation)

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self.loss.get_config_dict())
