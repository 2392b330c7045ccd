"""The reference trainer's student from a recipe's ``model`` section: :func:`build_model` picks the encoders of
:mod:`softalign.train.models` or the open_clip student of :mod:`softalign.train.open_clip_student` (both stand
below this factory; neither imports it)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from softalign.train.models import (
    BowTextEncoder,
    DualEncoder,
    GRUTextEncoder,
    HFTextEncoder,
    PrecompImageEncoder,
    SmallCNN,
    TimmImageEncoder,
    Vocabulary,
)

__all__ = ["build_model"]


def build_model(
    cfg,
    train_captions: Sequence[str],
    feature_shape: Sequence[int] | None = None,
    vocab_words: Sequence[str] | None = None,
) -> DualEncoder:
    """Build the student from a :class:`~softalign.train.recipe.ModelConfig`.

    ``train_captions`` build the vocabulary of ``gru`` / ``bow`` (or pass the saved ``vocab_words``);
    ``feature_shape`` (per-image feature shape) is needed by ``precomp``.
    """
    ie, te, d = cfg.image_encoder, cfg.text_encoder, int(cfg.embed_dim)
    if ie.startswith("open_clip:"):
        from softalign.train.open_clip_student import OpenCLIPDualEncoder  # open_clip only when asked for

        if te != "open_clip":
            raise ValueError(
                f"image_encoder {ie!r} needs text_encoder 'open_clip' (both towers of one model), got {te!r}"
            )
        return OpenCLIPDualEncoder(ie, d, cfg.pretrained, cfg.finetune_image, cfg.finetune_text)
    image: nn.Module
    text: nn.Module
    if ie == "small_cnn":
        image = SmallCNN(d, cfg.cnn_width)
    elif ie == "precomp":
        if not feature_shape:
            raise ValueError("image_encoder 'precomp' needs precomputed features (data.kind: precomp)")
        image = PrecompImageEncoder(int(feature_shape[-1]), d, cfg.precomp_pool)
    elif ie.startswith("timm:"):
        image = TimmImageEncoder(ie[5:], d, cfg.pretrained, cfg.finetune_image)
    else:
        raise ValueError(
            f"unknown image_encoder {ie!r}; expected small_cnn, precomp, timm:<name> or "
            "open_clip:<arch>[/<pretrained>]"
        )
    if te in ("gru", "bow"):
        vocab = (
            Vocabulary(vocab_words)
            if vocab_words is not None
            else Vocabulary.build(train_captions, cfg.min_word_count)
        )
        text = (GRUTextEncoder if te == "gru" else BowTextEncoder)(vocab, cfg.word_dim, d)
    elif te == "offline-minilm" or te.startswith("hf:"):
        text = HFTextEncoder(te if te == "offline-minilm" else te[3:], d, cfg.finetune_text)
    else:
        raise ValueError(f"unknown text_encoder {te!r}; expected gru, bow, offline-minilm or hf:<name>")
    return DualEncoder(image, text, d)
