"""Data loaders: Karpathy-split JSON, SCAN/VSE++ precomputed features, ``datasets`` / imagefolder, demo set, and the
deep-metric-learning benchmarks (CUB, Cars196, SOP, In-Shop, iNaturalist) for uni-modal retrieval.

Every loader returns :class:`RetrievalData` (captions, images, ``caption_to_image``; caption ids are indices
into the caption list). :class:`PairDataset` turns one into training items keyed by caption id.
"""

from __future__ import annotations

from softalign.data.base import RetrievalData
from softalign.data.dml import BENCHMARKS, DMLBenchmark, load_dml_benchmark
from softalign.data.hf import DatasetColumn, from_hf_dataset, load_imagefolder
from softalign.data.karpathy import load_karpathy
from softalign.data.pairs import (
    ImageDataset,
    ImagePairDataset,
    ImageTransform,
    PairDataset,
    collate_pairs,
    preload_images,
)
from softalign.data.precomp import load_precomp

__all__ = [
    "RetrievalData",
    "load_karpathy",
    "load_precomp",
    "from_hf_dataset",
    "load_imagefolder",
    "DatasetColumn",
    "PairDataset",
    "ImagePairDataset",
    "ImageDataset",
    "ImageTransform",
    "collate_pairs",
    "preload_images",
    "build_demo_data",
    "BENCHMARKS",
    "DMLBenchmark",
    "load_dml_benchmark",
]


def build_demo_data(*args, **kwargs):
    """See :func:`softalign.data.demo.build_demo_data` (imported lazily: needs the packaged emoji data)."""
    from softalign.data.demo import build_demo_data as _build

    return _build(*args, **kwargs)
