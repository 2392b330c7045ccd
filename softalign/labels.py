"""Class labels from users' files and columns: integers or names, as integer codes.

Uni-modal retrieval (i2i / t2t) compares labels for equality, so any label kind works: integers pass as they are,
names (strings) become the codes of their sorted distinct values. The same reader serves ``softalign eval
--labels`` and ``softalign cache inspect --labels``: a text file (one label per line), a JSON list, a ``.npy``
array, or a ``.npz`` / ``.safetensors`` file with ``image_labels`` and/or ``text_labels``. Errors name the file or
column and the first bad entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LABEL_KEYS = ("image_labels", "text_labels")


def label_codes(values: Any, what: str) -> tuple[np.ndarray, list[str] | None]:
    """``(codes int64 [N], names or None)``: integer labels as they are; names as codes of their sorted distinct
    values (``names[code]``). Fractional, missing or other values are an error naming ``what`` and the entry."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected one label per item, got an array of shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64), None
    items = arr.tolist()
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        return np.asarray(items, dtype=np.int64), None
    if all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in items):
        bad = next((i for i, x in enumerate(items) if not float(x).is_integer()), None)
        if bad is not None:
            raise ValueError(f"{what}: label {bad} is {items[bad]!r}, neither an integer nor a name")
        return np.asarray(items, dtype=np.float64).astype(np.int64), None
    bad = next((i for i, x in enumerate(items) if not isinstance(x, (str, int, np.integer)) or x == ""), None)
    if bad is not None:
        raise ValueError(f"{what}: label {bad} is {items[bad]!r}; labels are integers or names")
    names = sorted({str(x) for x in items})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(x)] for x in items], dtype=np.int64), names


def read_label_file(path: str | Path, flag: str = "--labels") -> dict[str, np.ndarray]:
    """``{"image_labels": codes}`` from a list file (.txt, .json, .npy), or the ``image_labels`` / ``text_labels``
    of a ``.npz`` / ``.safetensors`` file, each as integer codes (:func:`label_codes`)."""
    from softalign.io import read_json, read_text

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors"):
        arrays = _read_arrays(path, flag)
        found = {k: label_codes(v, f"{flag} {path}: {k!r}")[0] for k, v in arrays.items() if k in LABEL_KEYS}
        if not found:
            raise ValueError(
                f"{flag} {path}: holds neither 'image_labels' nor 'text_labels' (it has {sorted(arrays)})"
            )
        return found
    if suffix == ".json":
        values = read_json(path, flag)
        if not isinstance(values, list):
            raise ValueError(f"{flag} {path}: expected a JSON list of labels, got a {type(values).__name__}")
    elif suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{flag} {path}: not a plain .npy array ({str(err).splitlines()[0]})") from None
    else:  # one label per line
        values = [ln.strip() for ln in read_text(path, flag).splitlines() if ln.strip()]
    return {"image_labels": label_codes(values, f"{flag} {path}")[0]}


def _read_arrays(path: Path, flag: str) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{flag} {path}: not a readable .npz archive ({str(err).splitlines()[0]})") from None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: not a safetensors file ({str(err).splitlines()[0]})") from None
