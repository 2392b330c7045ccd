"""On-disk primitives of the teacher cache: atomic writes, streamed safetensors, memory-mapped reads.

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX and Windows), so a reader sees either the old file, the new file,
or no file, never a half-written one.

The final embedding tables are written with :func:`write_safetensors_streamed`, which emits the
safetensors layout (8-byte little-endian header length, JSON header, raw row-major bytes) chunk by
chunk, so merging a cache never holds more than one chunk in memory. :func:`mmap_safetensors`
maps such a file read-only: pages are shared by every process on the machine (one copy in the page
cache instead of one per data-parallel worker).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

PathLike = str | os.PathLike

#: torch dtype <-> safetensors dtype tag
_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ST_TO_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


# the generic writers live on the ground floor; re-exported here for the cache code and older imports
from softalign.io import (  # noqa: E402,F401
    TMP_SUFFIX,
    atomic_save_tensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    load_tensors,
    remove_stale_temporaries,
)


def write_safetensors_streamed(
    path: PathLike,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    chunks: Mapping[str, Callable[[], Iterable[torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors arrive as row chunks (bounded memory), atomically.

    ``specs[name] = (dtype, shape)``; ``chunks[name]()`` yields tensors whose concatenation along
    dim 0 is the full tensor. The total number of bytes written per tensor is checked against the
    declared shape, so a short or long stream raises instead of producing a corrupt file.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, (dtype, shape) in specs.items():
                expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                written = 0
                for part in chunks[name]():
                    part = part.detach().cpu().to(dtype).contiguous()
                    if tuple(part.shape[1:]) != tuple(shape[1:]):
                        raise ValueError(
                            f"{Path(path).name}: chunk of '{name}' has shape {tuple(part.shape)}, "
                            f"expected rows of shape {tuple(shape[1:])}"
                        )
                    data = part.view(torch.uint8).numpy().tobytes() if part.numel() else b""
                    fh.write(data)
                    written += len(data)
                if written != expected:
                    raise ValueError(
                        f"{Path(path).name}: tensor '{name}' received {written} bytes, expected {expected} "
                        f"(shape {list(shape)})"
                    )

    atomic_write(path, write)


def read_safetensors_header(path: PathLike) -> tuple[int, dict[str, dict]]:
    """Return (data_start, header) of a safetensors file; raises ValueError if it is malformed."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
    return 8 + n, header


def mmap_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Map every tensor of a safetensors file read-only (zero copy; pages shared across processes).

    The returned tensors must not be written to. bfloat16 tensors (no numpy dtype) are copied.
    """
    path = Path(path)
    start, header = read_safetensors_header(path)
    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > start else None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if start + e > size:
            raise ValueError(f"{path}: tensor '{name}' extends past the end of the file (truncated?)")
        shape = tuple(info["shape"])
        tag = info["dtype"]
        if e == b:
            out[name] = torch.empty(shape, dtype=_ST_TO_TORCH[tag])
            continue
        assert mm is not None  # a non-empty tensor lies in the data section, so the file is longer than the header
        if tag == "BF16":
            raw = np.frombuffer(mm, dtype=np.uint8, count=e - b, offset=start + b).copy()
            out[name] = torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
            continue
        arr = np.frombuffer(mm, dtype=_ST_TO_NUMPY[tag], count=(e - b) // np.dtype(_ST_TO_NUMPY[tag]).itemsize,
                            offset=start + b).reshape(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
            out[name] = torch.from_numpy(arr)
    return out


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float16" | "bfloat16" | "float32"`` (or a torch dtype) -> torch dtype; anything else raises."""
    if isinstance(name, torch.dtype):
        if name in (torch.float16, torch.bfloat16, torch.float32):
            return name
        raise ValueError(f"dtype {name} is not supported for cache storage; use float16, bfloat16 or float32")
    table = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    try:
        return table[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported for cache storage; use float16, bfloat16 or float32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
