"""Semantic textual similarity (STS): the text side of CUSA's universal retrieval.

CUSA evaluates a model's text embeddings on SentEval's STS12-16, STS-B and SICK-R: the Spearman correlation between
the cosine similarity of each sentence pair and its human score. :func:`sts_metrics` computes it through
sentence-transformers' ``EmbeddingSimilarityEvaluator`` (cosine; Spearman and Pearson, reported x 100 like every
softalign metric) for any text tower: a softalign run's (USA's text head or the joint space), open_clip's
``encode_text``, or a sentence-transformers model.

A set (:func:`load_sts`) is a local file with the columns ``sentence1``, ``sentence2``, ``score`` (.csv, .tsv,
.jsonl, .json, .parquet), or a dataset on the Hugging Face Hub in those columns (needs internet), by name
(``stsb``, ``sts12`` .. ``sts16``, ``sickr``: :data:`HUB_SETS`) or by its Hub id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("sentence1", "sentence2", "score")

#: CUSA's STS sets as users load them with ``datasets`` (test splits; the same three columns)
HUB_SETS = {
    "stsb": "sentence-transformers/stsb",
    "sts12": "mteb/sts12-sts",
    "sts13": "mteb/sts13-sts",
    "sts14": "mteb/sts14-sts",
    "sts15": "mteb/sts15-sts",
    "sts16": "mteb/sts16-sts",
    "sickr": "mteb/sickr-sts",
}

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class StsSet:
    """Sentence pairs with gold similarity scores."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def load_sts(spec: str, split: str = "test") -> StsSet:
    """A local STS file or a Hub set (see the module docstring); every error names the file or set and the
    column or row at fault."""
    import datasets

    path = Path(spec)
    if path.suffix.lower() in _BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"--sts {spec}: file not found")
        if path.stat().st_size == 0:
            raise ValueError(f"--sts {spec}: the file is empty; expected the columns {', '.join(COLUMNS)}")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            ds = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train", **kwargs)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a malformed file
            raise ValueError(
                f"--sts {spec}: not a readable {path.suffix} table ({str(err).splitlines()[0]})"
            ) from None
        name = path.stem
    elif path.exists():
        raise ValueError(f"--sts {spec}: expected a {', '.join(_BUILDERS)} file with the columns {', '.join(COLUMNS)}")
    else:
        hub = HUB_SETS.get(spec, spec)
        try:
            ds = datasets.load_dataset(hub, split=split)
        except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split
            raise ValueError(
                f"--sts {spec}: cannot load the Hub set {hub!r}, split {split!r} "
                f"({str(err).splitlines()[0]}); give a local file with the columns "
                f"{', '.join(COLUMNS)}, or run with internet access"
            ) from None
        name = spec.split("/")[-1]
    return _check(ds, spec, name)


def _check(ds, spec: str, name: str) -> StsSet:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"--sts {spec}: missing column(s) {missing}; it has {ds.column_names} (expected {', '.join(COLUMNS)})"
        )
    if len(ds) == 0:
        raise ValueError(f"--sts {spec}: no sentence pairs")
    s1, s2 = [str(x) for x in ds["sentence1"]], [str(x) for x in ds["sentence2"]]
    scores: list[float] = []
    for i, value in enumerate(ds["score"]):
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--sts {spec}: row {i}: column 'score' is {value!r}, not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"--sts {spec}: row {i}: column 'score' is {value!r}, not a finite number")
        scores.append(score)
    if len(set(scores)) < 2:
        raise ValueError(f"--sts {spec}: every score is {scores[0]}; a correlation needs scores that differ")
    return StsSet(name, s1, s2, scores)


def sts_metrics(
    encode_text: Callable[[Sequence[str]], Any], sts: StsSet, batch_size: int = 256, prefix: str = ""
) -> dict[str, float]:
    """``{prefix+"spearman", prefix+"pearson"}`` (x 100) of the cosine similarity of ``encode_text``'s embeddings
    of each pair with the gold scores, through sentence-transformers' ``EmbeddingSimilarityEvaluator``."""
    evaluator = _evaluator(encode_text, batch_size)(
        sentences1=sts.sentences1,
        sentences2=sts.sentences2,
        scores=sts.scores,
        name=sts.name,
        similarity_fn_names=["cosine"],
        batch_size=batch_size,
    )
    out = evaluator(None)
    return {
        f"{prefix}spearman": 100.0 * float(out[f"{sts.name}_spearman_cosine"]),
        f"{prefix}pearson": 100.0 * float(out[f"{sts.name}_pearson_cosine"]),
    }


def _evaluator(encode_text: Callable[[Sequence[str]], Any], batch_size: int):
    """sentence-transformers' evaluator, embedding with ``encode_text`` (in batches) instead of a
    ``SentenceTransformer``."""
    try:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator  # type: ignore[no-redef]

    class TowerSimilarityEvaluator(EmbeddingSimilarityEvaluator):
        def embed_inputs(self, model, sentences, **kwargs) -> np.ndarray:
            import torch

            sentences = list(sentences)
            with torch.no_grad():
                parts = [
                    torch.as_tensor(encode_text(sentences[s : s + batch_size])).float().cpu()
                    for s in range(0, len(sentences), batch_size)
                ]
            return torch.cat(parts).numpy()

        def store_metrics_in_model_card_data(self, model, metrics, epoch=0, step=0) -> None:
            if model is not None:
                super().store_metrics_in_model_card_data(model, metrics, epoch, step)

    return TowerSimilarityEvaluator
