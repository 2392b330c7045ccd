"""On-disk primitives of the teacher cache: atomic writes, streamed safetensors, memory-mapped reads.

Every file is written to a temporary name in the same directory and moved into place with
``os.replace`` (atomic on POSIX and Windows), so a reader sees either the old file, the new file,
or no file, never a half-written one.

Chunks are written with ``safetensors.torch.save_file`` and every file is read with ``safe_open`` (memory-mapped:
pages shared by every process on the machine, one copy in the page cache instead of one per data-parallel worker).
The one thing safetensors does not offer is writing a file whose tensor arrives in pieces: the final tables are
merged with :func:`write_safetensors_streamed`, which emits the safetensors layout (8-byte little-endian header
length, JSON header, raw row-major bytes) chunk by chunk, so merging a cache never holds more than one chunk in
memory; ``safe_open`` validates what it wrote.
"""

from __future__ import annotations

import json
import os
import struct
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


def safetensors_metadata_and_shapes(path: PathLike) -> tuple[dict[str, str], dict[str, list[int]]]:
    """``(metadata, {name: shape})`` of a safetensors file through ``safe_open`` (nothing is read but the header);
    raises ValueError naming the file if it is not a complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a safetensors file ({str(err).splitlines()[0]})") from None


def mmap_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file through ``safe_open``: memory-mapped, so nothing is read until used and
    the pages are shared in the page cache by every process on the machine. The tensors must not be written to."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is not a safetensors file ({str(err).splitlines()[0]})") from None


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float16" | "bfloat16" | "float32"`` (or a torch dtype) -> torch dtype; anything else raises."""
    if isinstance(name, torch.dtype):
        if name in (torch.float16, torch.bfloat16, torch.float32):
            return name
        raise ValueError(f"dtype {name} is not supported for cache storage; use float16, bfloat16 or float32")
    table = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    try:
        return table[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"dtype {name!r} is not supported for cache storage; use float16, bfloat16 or float32"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
