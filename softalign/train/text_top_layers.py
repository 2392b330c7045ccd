"""A sentence-transformers text encoder whose top layers train: the demo's trained-encoder regime.

all-MiniLM-L6-v2 embeds a sentence as ``normalize(mean_pool(layers_1..6(embed(tokens))))``. With the bottom
``6 - k`` layers frozen (eval mode, no gradient), their output is the same at every step, so it is computed once
per split (:func:`bottom_states`, a :class:`TokenStates` table) and only the top ``k`` layers run in training
(:class:`TopLayersTextEncoder`, initialised from the pre-trained weights, dropout on as in fine-tuning). With
``k = 0`` the encoder returns the frozen sentence embedding, so the frozen-feature student is the ``k = 0`` case.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenStates:
    """Hidden states ``[N, L, H]`` of ``N`` sentences after the frozen layers, and their attention mask ``[N, L]``
    (1 = token, 0 = padding). Indexing selects sentences (and trims padding no selected sentence needs)."""

    hidden: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hidden.shape)

    def __getitem__(self, index) -> TokenStates:
        hidden, mask = self.hidden[index], self.mask[index]
        width = max(1, int(mask.sum(1).max())) if len(mask) else 1
        return TokenStates(hidden[:, :width], mask[:, :width])


def _layers_of(model: nn.Module) -> nn.ModuleList:
    try:
        layers = getattr(model, "encoder").layer  # BERT-style (MiniLM, mpnet)
    except AttributeError:
        raise TypeError(f"{type(model).__name__}: expected a BERT-style encoder with .encoder.layer") from None
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: .encoder.layer is a {type(layers).__name__}, expected a ModuleList")
    return layers


def _run_layers(layers: Iterable[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Transformer layers over ``hidden`` with an additive attention mask (0 on tokens, dtype-min on padding)."""
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``Pooling(mean)`` then ``Normalize``: ``normalize(sum_t m_t h_t / sum_t m_t)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def bottom_states(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    trainable_layers: int,
    batch_size: int = 256,
    max_length: int = 64,
) -> TokenStates:
    """The output of ``model``'s embeddings and its bottom ``num_layers - trainable_layers`` layers for every
    sentence (eval mode), padded to the longest sentence."""
    layers = _layers_of(model)
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
    was_training = model.training
    model.eval()
    hidden_parts, mask_parts = [], []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        h = getattr(model, "embeddings")(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        hidden_parts.append(_run_layers(layers[: len(layers) - trainable_layers], h, enc["attention_mask"]))
        mask_parts.append(enc["attention_mask"])
    model.train(was_training)
    states = TokenStates(torch.cat(hidden_parts), torch.cat(mask_parts))
    return states[torch.arange(len(states))]  # trims the padding


class TopLayersTextEncoder(nn.Module):
    """The top ``k`` layers of a BERT-style sentence encoder (copies, trainable) over :class:`TokenStates`, then
    mean pooling and L2 normalisation: ``[N, H]`` sentence embeddings."""

    def __init__(self, model: nn.Module, trainable_layers: int):
        super().__init__()
        layers = _layers_of(model)
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(layers[len(layers) - trainable_layers :]))
        self.layers.requires_grad_(True)

    def forward(self, states: TokenStates) -> torch.Tensor:
        return mean_pool_normalize(_run_layers(self.layers, states.hidden, states.mask), states.mask)


def load_sentence_encoder(name_or_path: str):
    """``(transformers model, tokenizer)`` of a sentence-transformers model directory or Hub name
    (``"offline-minilm"``: the packaged all-MiniLM-L6-v2)."""
    from transformers import AutoModel, AutoTokenizer

    if name_or_path == "offline-minilm":
        from softalign.teachers.packaged import offline_minilm_path

        name_or_path = offline_minilm_path()
    return AutoModel.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)
