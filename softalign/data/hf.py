"""Adapters for Hugging Face ``datasets``: a ``datasets.Dataset`` or a local ``imagefolder``.

One dataset row is one image with one caption (a string column) or several (a list-of-strings column), e.g.
``nlphuji/flickr30k`` (``image``, ``caption`` list) or an ``imagefolder`` whose ``metadata.jsonl`` has
``{"file_name": "a.png", "caption": [...]}`` lines.
"""

from __future__ import annotations

import os

from softalign.data.base import RetrievalData

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "raw")


class DatasetColumn:
    """Lazy, indexable view of one column of a ``datasets.Dataset`` (images are decoded on access)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[int(i)][self.column]

    def select(self, indices) -> DatasetColumn:
        return DatasetColumn(self.dataset.select([int(i) for i in indices]), self.column)


def _guess(columns, candidates, what, dataset_columns):
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"could not find the {what} column; pass it explicitly (columns: {dataset_columns})")


def from_hf_dataset(
    dataset,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    *,
    name: str = "hf",
    split: str = "train",
    captions_per_image: int | None = None,
) -> RetrievalData:
    """Turn a ``datasets.Dataset`` (one row per image) into :class:`RetrievalData`.

    ``image_column`` defaults to the column with an ``Image`` feature; ``caption_column`` to the first of
    ``caption, captions, text, sentences, raw``. A list-valued caption column gives several captions per image
    (the first ``captions_per_image`` when given). ``label_column`` (int or ClassLabel) gives image labels.
    """
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a core dependency
        raise ImportError("from_hf_dataset needs the 'datasets' package: pip install datasets") from err
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"expected a datasets.Dataset (one split), got {type(dataset).__name__}; "
            "index a DatasetDict by split first, e.g. ds['test']"
        )
    cols = dataset.column_names
    if image_column is None:
        image_column = next((c for c, f in dataset.features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            image_column = _guess(cols, ("image", "img"), "image", cols)
    if caption_column is None:
        caption_column = _guess(cols, CAPTION_COLUMNS, "caption", cols)
    for what, col in (("image", image_column), ("caption", caption_column), ("label", label_column)):
        if col is not None and col not in cols:
            raise ValueError(f"{what} column {col!r} not in the dataset (columns: {cols})")

    captions: list[str] = []
    c2i: list[int] = []
    for i, value in enumerate(dataset[caption_column]):
        sents = [value] if isinstance(value, str) else list(value or [])
        sents = [s["raw"] if isinstance(s, dict) else s for s in sents]
        if captions_per_image is not None:
            if len(sents) < captions_per_image:
                raise ValueError(
                    f"row {i} has {len(sents)} captions, fewer than captions_per_image={captions_per_image}"
                )
            sents = sents[:captions_per_image]
        if not sents:
            raise ValueError(f"row {i} has no caption in column {caption_column!r}")
        captions.extend(str(s).strip() for s in sents)
        c2i.extend([i] * len(sents))
    labels, label_names = None, None
    if label_column is not None:  # integers, a ClassLabel, or names (coded in sorted order)
        from softalign.labels import label_codes

        labels, label_names = label_codes(dataset[label_column], f"{name}/{split}: label column {label_column!r}")
        feat = dataset.features[label_column]
        label_names = list(feat.names) if hasattr(feat, "names") else label_names
    return RetrievalData(
        captions=captions,
        images=DatasetColumn(dataset, image_column),
        caption_to_image=c2i,
        image_labels=labels,
        label_names=label_names,
        name=name,
        split=split,
        metadata={"source": "datasets", "image_column": image_column, "caption_column": caption_column},
    )


def load_imagefolder(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    caption_column: str | None = None,
    label_column: str | None = None,
    captions_per_image: int | None = None,
) -> RetrievalData:
    """Load a local ``imagefolder`` (images + ``metadata.jsonl``/``metadata.csv`` with captions).

    Uses ``datasets.load_dataset("imagefolder", data_dir=...)``; see the ``datasets`` image-dataset docs for
    the layout (``train/`` and ``test/`` sub-folders give the splits).
    """
    from pathlib import Path

    import datasets

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"imagefolder not found: {data_dir}")
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split=split)
    except ValueError as err:
        raise ValueError(f"could not load split {split!r} of imagefolder {data_dir}: {err}") from err
    return from_hf_dataset(
        ds,
        caption_column=caption_column,
        label_column=label_column,
        name=data_dir.name,
        split=split,
        captions_per_image=captions_per_image,
    )
