"""Test-split evaluation of a trained student: encode a split (joint embeddings and the backbone features), apply
USA's uni-modal heads as CUSA evaluates uni-modal retrieval, score cross-modal R@K / rsum and uni-modal
precision@1 / R-precision / MAP@R, and save the embeddings for ``softalign eval --embeddings``."""

from __future__ import annotations

import torch

from softalign.data.base import RetrievalData


@torch.no_grad()
def encode_split(
    model,
    data: RetrievalData,
    transform,
    batch_size: int,
    device,
    image_cache: torch.Tensor | None = None,
    return_features: bool = False,
):
    """(image_emb [N_images, D], text_emb [N_captions, D]) of a split, on CPU; with ``return_features`` also the
    backbone features ``(image_features, text_features)`` (the inputs of USA's uni-modal heads)."""
    from torch.utils.data import DataLoader

    from softalign.data.pairs import ImageDataset, collate_pairs

    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(
            ImageDataset(data, transform, image_cache), batch_size=batch_size, shuffle=False, collate_fn=collate_pairs
        )
        imgs = [model.encode_image(b["image"].to(device), return_features=True) for b in loader]
        txts = [
            model.encode_text(data.captions[i : i + batch_size], return_features=True)
            for i in range(0, data.num_captions, batch_size)
        ]
    finally:
        model.train(was_training)
    img, img_f = (torch.cat([x[k].float().cpu() for x in imgs]) for k in (0, 1))
    txt, txt_f = (torch.cat([x[k].float().cpu() for x in txts]) for k in (0, 1))
    return (img, txt, img_f, txt_f) if return_features else (img, txt)


def uni_modal_heads(loss_fn) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(image_head, text_head)`` of the loss's USA term when it has real heads (CUSA's uni-modal projections),
    else None (no USA term, or USA on the raw embeddings: ``nn.Identity`` heads)."""
    usa = getattr(loss_fn, "usa", None)
    if usa is None:
        return None
    image_head, text_head = getattr(usa, "image_head", None), getattr(usa, "text_head", None)
    if (
        image_head is None
        or text_head is None
        or isinstance(image_head, torch.nn.Identity)
        or isinstance(text_head, torch.nn.Identity)
    ):
        return None
    return image_head, text_head


@torch.no_grad()
def encode_uni_modal(
    loss_fn, image: torch.Tensor, text: torch.Tensor, batch_size: int = 1024, device=None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Uni-modal embeddings ``(image_head(image), text_head(text))`` (fp32, on CPU) of the loss's USA heads, as
    CUSA evaluates uni-modal retrieval (``encode_image(cross_modal=False)``); None when there are no heads."""
    heads = uni_modal_heads(loss_fn)
    if heads is None:
        return None
    outs = []
    for head, emb in zip(heads, (image, text)):
        was_training = head.training
        head.eval()
        try:
            p = next(head.parameters(), None)
            dev = device if device is not None else (p.device if p is not None else torch.device("cpu"))
            dtype = p.dtype if p is not None else torch.float32
            outs.append(
                torch.cat(
                    [
                        head(emb[i : i + batch_size].to(dev, dtype)).float().cpu()
                        for i in range(0, emb.shape[0], batch_size)
                    ]
                )
                if emb.shape[0]
                else emb.new_zeros(emb.shape).float()
            )
        finally:
            head.train(was_training)
    return outs[0], outs[1]


def evaluate_embeddings(image, text, data: RetrievalData, image_uni=None, text_uni=None) -> dict[str, float]:
    """Cross-modal R@1/5/10, medr, rsum and, with labels, the uni-modal keys of
    :func:`softalign.eval.unimodal.uni_modal_metrics` (``i2i_*`` / ``t2t_*`` on USA's heads when given, ``*_xm_*``
    on the joint embeddings), all in percent: the keys and numbers ``softalign eval`` gives for the saved file."""
    from softalign.eval import cross_modal_recall
    from softalign.eval.unimodal import uni_modal_metrics

    out = {
        k: float(v)
        for k, v in cross_modal_recall(
            image_emb=image, text_emb=text, caption_to_image=torch.as_tensor(data.caption_to_image), ks=(1, 5, 10)
        ).items()
    }
    if data.image_labels is not None:
        out.update(
            uni_modal_metrics(
                image, text, torch.as_tensor(data.image_labels), torch.as_tensor(data.text_labels), image_uni, text_uni
            )
        )
    return out


def save_embeddings(path, image, text, data: RetrievalData, image_uni=None, text_uni=None) -> None:
    """Test-split embeddings in the format ``softalign eval --embeddings`` reads (``image``, ``text``,
    ``caption_to_image``, ``image_labels``, ``text_labels``); ``image_uni`` / ``text_uni``: the uni-modal
    (USA head) embeddings, stored as extra keys of the same names when given."""
    from softalign.io import atomic_save_tensors

    tensors = {
        "image": image.float(),
        "text": text.float(),
        "caption_to_image": torch.as_tensor(data.caption_to_image, dtype=torch.long),
    }
    if data.image_labels is not None:
        tensors["image_labels"] = torch.as_tensor(data.image_labels, dtype=torch.long)
        tensors["text_labels"] = torch.as_tensor(data.text_labels, dtype=torch.long)
    if image_uni is not None:
        tensors["image_uni"] = image_uni.float()
    if text_uni is not None:
        tensors["text_uni"] = text_uni.float()
    atomic_save_tensors(path, tensors, metadata={"split": str(data.split), "name": str(data.name)})


def evaluate_student(
    model,
    loss_fn,
    data: RetrievalData,
    transform,
    batch_size: int,
    device,
    image_cache: torch.Tensor | None = None,
    usa_on_features: bool = False,
    save_to=None,
) -> dict[str, float]:
    """:func:`evaluate_embeddings` of a student on ``data``: its joint embeddings and, when the loss has USA heads,
    their outputs on the backbone features (``usa_on_features``, CUSA's layout) or on the joint embeddings.
    ``save_to``: also write the embeddings there (:func:`save_embeddings`)."""
    img_e, txt_e, img_f, txt_f = encode_split(model, data, transform, batch_size, device, image_cache, True)
    uni = encode_uni_modal(loss_fn, *((img_f, txt_f) if usa_on_features else (img_e, txt_e)), batch_size)
    img_u, txt_u = uni if uni is not None else (None, None)
    if save_to is not None:
        save_embeddings(save_to, img_e, txt_e, data, img_u, txt_u)
    return evaluate_embeddings(img_e, txt_e, data, img_u, txt_u)
