"""Deep-metric-learning benchmarks for uni-modal ("universal") retrieval, read from each data set's own layout.

CUSA reports image->image retrieval on these benchmarks with the standard evaluation splits of the metric-learning
literature (Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016; Liu et al.,
"DeepFashion", CVPR 2016; Brown et al., "Smooth-AP", ECCV 2020 for iNaturalist):

* ``cub``: CUB-200-2011 (``CUB_200_2011/images.txt``, ``image_class_labels.txt``); test = classes 101-200.
* ``cars``: Cars196 (``cars_annos.mat``, its ``annotations`` struct: ``relative_im_path``, ``class``); test =
  classes 99-196.
* ``sop``: Stanford Online Products (``Stanford_Online_Products/Ebay_test.txt``: ``image_id class_id
  super_class_id path``); label = ``class_id``.
* ``inshop``: In-Shop Clothes (``Eval/list_eval_partition.txt``: ``image_name item_id evaluation_status``,
  images under ``Img/``); query vs gallery, label = item id.
* ``inaturalist``: iNaturalist 2018 in the split of Brown et al. (``Inat_dataset_splits/Inaturalist_test_set1.txt``,
  one image path per line); label = the species folder (the path's parent directory).

:func:`load_dml_benchmark` returns a :class:`DMLBenchmark`: image paths, integer labels, and for In-Shop the query and
gallery index sets, ready for :func:`softalign.eval.unimodal_retrieval`. Errors name the file and the line at fault.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike

BENCHMARKS = ("cub", "cars", "sop", "inshop", "inaturalist")


@dataclass
class DMLBenchmark:
    """One benchmark split: ``paths[i]`` has label ``labels[i]``; In-Shop also has ``query`` / ``gallery`` indices
    (else every image is a query against all the others, leave-one-out)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    query: np.ndarray | None = None
    gallery: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _lines(path: Path) -> list[str]:
    from softalign.io import read_lines

    return read_lines(path, "benchmark file")


def _fields(path: Path, line: str, n: int, number: int) -> list[str]:
    parts = line.split()
    if len(parts) < n:
        raise ValueError(f"{path}, line {number}: expected {n} fields, got {line!r}")
    return parts


def _dense(labels: Sequence) -> np.ndarray:
    """Labels of any kind -> 0..C-1 in order of first appearance (stable for comparisons)."""
    index: dict = {}
    return np.array([index.setdefault(x, len(index)) for x in labels], dtype=np.int64)


def _cub(root: Path) -> DMLBenchmark:
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images = {}
    for k, ln in enumerate(_lines(base / "images.txt"), 1):
        i, rel = _fields(base / "images.txt", ln, 2, k)[:2]
        images[i] = rel
    paths, labels = [], []
    for k, ln in enumerate(_lines(base / "image_class_labels.txt"), 1):
        i, c = _fields(base / "image_class_labels.txt", ln, 2, k)[:2]
        if i not in images:
            raise ValueError(f"{base / 'image_class_labels.txt'}, line {k}: image {i} is not in images.txt")
        if int(c) > 100:  # test: classes 101-200
            paths.append(str(base / "images" / images[i]))
            labels.append(int(c))
    return DMLBenchmark("cub", paths, _dense(labels))


def _cars(root: Path) -> DMLBenchmark:
    from scipy.io import loadmat

    mat = root / "cars_annos.mat"
    if not mat.is_file():
        raise FileNotFoundError(f"benchmark file not found: {mat}")
    try:
        annos = loadmat(str(mat), squeeze_me=True)["annotations"]
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"{mat}: not a Cars196 annotation file with an 'annotations' struct ({err})") from None
    paths, labels = [], []
    for a in np.atleast_1d(annos):
        c = int(a["class"])
        if c >= 99:  # test: classes 99-196
            paths.append(str(root / str(a["relative_im_path"])))
            labels.append(c)
    return DMLBenchmark("cars", paths, _dense(labels))


def _sop(root: Path) -> DMLBenchmark:
    base = root / "Stanford_Online_Products" if (root / "Stanford_Online_Products").is_dir() else root
    lines = _lines(base / "Ebay_test.txt")
    paths, labels = [], []
    for k, ln in enumerate(lines[1:], 2):  # header: image_id class_id super_class_id path
        _, class_id, _, rel = _fields(base / "Ebay_test.txt", ln, 4, k)[:4]
        paths.append(str(base / rel))
        labels.append(int(class_id))
    return DMLBenchmark("sop", paths, _dense(labels))


def _inshop(root: Path) -> DMLBenchmark:
    part = root / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    paths: list[str] = []
    labels: list[str] = []
    query: list[int] = []
    gallery: list[int] = []
    for k, ln in enumerate(lines[2:], 3):  # a count, a header, then image_name item_id evaluation_status
        name, item, status = _fields(part, ln, 3, k)[:3]
        if status not in ("train", "query", "gallery"):
            raise ValueError(f"{part}, line {k}: evaluation_status {status!r} is not train / query / gallery")
        if status == "train":
            continue
        (query if status == "query" else gallery).append(len(paths))
        paths.append(str((root / "Img" if (root / "Img").is_dir() else root) / name))  # name: img/WOMEN/...jpg
        labels.append(item)
    return DMLBenchmark(
        "inshop", paths, _dense(labels), np.array(query, dtype=np.int64), np.array(gallery, dtype=np.int64)
    )


def _inaturalist(root: Path) -> DMLBenchmark:
    split = root / "Inat_dataset_splits" / "Inaturalist_test_set1.txt"
    paths, species = [], []
    for k, ln in enumerate(_lines(split), 1):
        rel = Path(ln)
        if len(rel.parts) < 2:
            raise ValueError(f"{split}, line {k}: {ln!r} has no species folder")
        paths.append(str(root / rel))
        species.append(rel.parent.as_posix())
    return DMLBenchmark("inaturalist", paths, _dense(species))


_LOADERS = {"cub": _cub, "cars": _cars, "sop": _sop, "inshop": _inshop, "inaturalist": _inaturalist}


def load_dml_benchmark(name: str, root: PathLike, check_files: bool = False) -> DMLBenchmark:
    """The evaluation split of benchmark ``name`` (one of :data:`BENCHMARKS`) under ``root``, the data set's own
    folder as downloaded. ``check_files``: also refuse a listed image that is missing, naming it."""
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark root {root} is not a directory")
    bench = _LOADERS[name](root)
    if not bench.paths:
        raise ValueError(f"{name} under {root}: the evaluation split is empty")
    if check_files:
        missing = next((p for p in bench.paths if not Path(p).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{name}: image {missing} (listed in the split) is missing")
    return bench
