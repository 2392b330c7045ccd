"""Image embeddings from a model, for ``softalign eval``: ``softalign encode`` and ``softalign eval --model``.

Model specs (``--model``):

* a ``softalign train`` output directory (``recipe.yaml`` + ``checkpoints/``), or one of its checkpoint
  folders: the trained student, read from safetensors. ``heads="cross"`` gives the joint
  (cross-modal) embeddings; ``heads="uni"`` USA's uni-modal heads on the backbone features, as CUSA evaluates
  uni-modal retrieval;
* ``open_clip:<arch>[/<pretrained>]``: an open_clip model's ``encode_image`` with its own preprocessing;
* ``timm:<name>`` (``weights=`` a local file; without it timm's pretrained weights, from the Hub): pooled
  pre-logits features with the model's own data config;
* ``st:<name or path>`` (``st:offline-minilm``: the packaged all-MiniLM-L6-v2): a sentence-transformers model's
  ``encode``, for captions (and images, when the model takes them, e.g. ``st:clip-ViT-B-32``).

Captions are encoded by the same model (a softalign run's text tower, or open_clip's tokenizer and ``encode_text``;
timm models have none). Embeddings are L2-normalised (cosine retrieval). Images are read in batches with a progress bar, on
accelerate's device (``PartialState().device``: a GPU when there is one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["encode_images", "encode_texts", "image_encoder", "load_encoders"]

ImageEncoder = Callable[[Sequence], torch.Tensor]
TextEncoder = Callable[[Sequence[str]], torch.Tensor]


def _device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    from accelerate import PartialState

    return PartialState().device


def _softalign_run(spec: str, heads: str, device: torch.device) -> tuple[ImageEncoder, TextEncoder]:
    from softalign.losses import SoftAlignLoss
    from softalign.train.checkpoint import resolve
    from softalign.train.model_factory import build_model
    from softalign.train.recipe import load_recipe
    from softalign.train.trainer import image_transform, load_checkpoint, uni_modal_heads

    path = Path(spec)
    ckpt_path = resolve(path)
    run_dir = next((d for d in (path, *ckpt_path.parents[:3]) if (d / "recipe.yaml").is_file()), None)
    if run_dir is None:
        raise FileNotFoundError(
            f"--model {spec}: no recipe.yaml in {path} or above {ckpt_path} (expected a "
            "softalign train output directory, or one of its checkpoints)"
        )
    recipe = load_recipe(run_dir / "recipe.yaml")
    ckpt = load_checkpoint(ckpt_path)
    if recipe.model.image_encoder == "precomp":
        raise ValueError(f"--model {spec}: a precomp student encodes feature arrays, not images")
    model = build_model(recipe.model, [], vocab_words=ckpt.get("vocab"))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    model_transform = getattr(model, "image_transform", None)
    transform = model_transform(False) if callable(model_transform) else image_transform(recipe, False)
    image_head = text_head = None
    if heads == "uni":
        dims = (int(model.feature_dims[0]), int(model.feature_dims[1])) if recipe.loss.use_heads else None
        loss_fn = SoftAlignLoss(embed_dim=dims, **recipe.loss.loss_kwargs())
        loss_fn.load_state_dict(ckpt["loss"])
        found = uni_modal_heads(loss_fn) if dims is not None else None
        if found is None:
            raise ValueError(
                f"--model {spec} --heads uni: this run has no USA heads (loss.beta = 0 or "
                "loss.use_heads = false); use --heads cross"
            )
        image_head, text_head = found[0].to(device).eval(), found[1].to(device).eval()

    def encode(images: Sequence) -> torch.Tensor:
        x = torch.stack([transform(im) for im in images]).to(device)
        emb, feats = model.encode_image(x, return_features=True)
        return image_head(feats) if image_head is not None else emb

    def encode_text(captions: Sequence[str]) -> torch.Tensor:
        emb, feats = model.encode_text(list(captions), return_features=True)
        return text_head(feats) if text_head is not None else emb

    return encode, encode_text


def _open_clip(spec: str, device: torch.device) -> tuple[ImageEncoder, TextEncoder]:
    from softalign.train.open_clip_student import OpenCLIPImageTransform, import_open_clip, parse_open_clip_name

    open_clip = import_open_clip()
    arch, tag = parse_open_clip_name(spec)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
    model.to(device).eval()
    transform = OpenCLIPImageTransform(preprocess)
    tokenizer = open_clip.get_tokenizer(arch)

    def encode(images: Sequence) -> torch.Tensor:
        return model.encode_image(torch.stack([transform(im) for im in images]).to(device))

    def encode_text(captions: Sequence[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(list(captions)).to(device))

    return encode, encode_text


def check_model_spec(spec: str) -> None:
    """Refuse a ``--model`` that is none of the accepted forms, before any image is read."""
    if not (spec.startswith(("open_clip:", "timm:", "st:")) or Path(spec).exists()):
        raise ValueError(
            f"--model {spec!r}: expected a softalign train output directory (or one of "
            "its checkpoints), 'open_clip:<arch>[/<pretrained>]', 'timm:<name>' or "
            "'st:<sentence-transformers name or path>'"
        )


def _sentence_transformer(spec: str, device: torch.device) -> tuple[ImageEncoder, TextEncoder]:
    from sentence_transformers import SentenceTransformer

    name = spec[len("st:") :]
    if name == "offline-minilm":
        from softalign.teachers.packaged import offline_minilm_path

        name = offline_minilm_path()
    model = SentenceTransformer(name, device=str(device))

    def encode_text(captions: Sequence[str]) -> torch.Tensor:
        return model.encode(list(captions), convert_to_tensor=True, show_progress_bar=False)

    def encode(images: Sequence) -> torch.Tensor:
        from softalign.images import load_image

        try:
            return model.encode(
                [load_image(im, i) for i, im in enumerate(images)], convert_to_tensor=True, show_progress_bar=False
            )
        except Exception as err:  # noqa: BLE001 - a text-only model fails in its tokenizer, in many ways
            raise ValueError(
                f"--model {spec}: this sentence-transformers model cannot encode images ("
                f"{type(err).__name__}); use it for captions only (--captions without images)"
            ) from None

    return encode, encode_text


def load_encoders(
    spec: str, *, heads: str = "cross", weights: str | os.PathLike | None = None, device=None
) -> tuple[ImageEncoder, TextEncoder | None]:
    """``(images -> [N, D], captions -> [N, D] or None)`` for a model spec (see the module docstring); a timm
    model has no text tower (None)."""
    if heads not in ("cross", "uni"):
        raise ValueError(f"heads must be 'cross' or 'uni', got {heads!r}")
    check_model_spec(spec)
    dev = _device(device)
    if spec.startswith("open_clip:"):
        return _open_clip(spec, dev)
    if spec.startswith("st:"):
        return _sentence_transformer(spec, dev)
    if spec.startswith("timm:"):
        from softalign.teachers.image import TimmImageTeacher

        teacher = TimmImageTeacher(spec[len("timm:") :], weights=weights, device=dev)
        return (lambda images: teacher.encode(list(images))), None
    return _softalign_run(spec, heads, dev)


def image_encoder(
    spec: str, *, heads: str = "cross", weights: str | os.PathLike | None = None, device=None
) -> ImageEncoder:
    """A function ``images (paths or PIL) -> [N, D]`` for a model spec (see the module docstring)."""
    return load_encoders(spec, heads=heads, weights=weights, device=device)[0]


@torch.no_grad()
def _encode_batched(
    encoder: Callable[[Sequence], torch.Tensor], items: Sequence, batch_size: int, progress: bool, desc: str, unit: str
) -> torch.Tensor:
    """L2-normalised ``[N, D]`` float32 rows of ``encoder`` over ``items``, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    if len(items) == 0:
        raise ValueError(f"no {unit}s to encode")
    out = []
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        for s in range(0, len(items), batch_size):
            batch = list(items[s : s + batch_size])
            out.append(torch.nn.functional.normalize(encoder(batch).float(), dim=-1).cpu())
            bar.update(len(batch))
    return torch.cat(out)


def encode_images(
    encoder: ImageEncoder,
    images: Sequence,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "softalign encode",
) -> torch.Tensor:
    """L2-normalised ``[N, D]`` float32 embeddings of ``images``, in batches."""
    return _encode_batched(encoder, images, batch_size, progress, desc, "image")


def encode_texts(
    encoder: TextEncoder,
    captions: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "softalign encode captions",
) -> torch.Tensor:
    """L2-normalised ``[N, D]`` float32 embeddings of ``captions``, in batches."""
    return _encode_batched(encoder, captions, batch_size, progress, desc, "caption")
