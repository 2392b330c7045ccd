"""Chunked, resumable, process-sharded construction of a teacher cache.

Layout of a cache directory::

    manifest.json          written last (atomically): its presence means the cache is complete
    text.safetensors       "embeddings" [num_captions, text_dim]   (fp16 by default, L2-normalised rows)
    image.safetensors      "embeddings" [num_images, image_dim]
    .partial/              only while building: build.json + one safetensors file per finished chunk

Each modality is cut into chunks of ``chunk_size`` rows, shared across processes by Accelerate's
``split_between_processes`` (``PartialState`` / ``Accelerator``; every ``world``-th chunk under a bare
torch.distributed group); every finished chunk is written atomically, so an
interrupted build (crash, pre-emption, Ctrl-C, a bad image) resumes with the chunks that are missing.
After a barrier the main process streams the chunks into the final files (one chunk in memory at a
time), writes the manifest, and removes ``.partial``. Peak memory is therefore bounded by the chunk
size and the teacher batch, not by the data set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softalign.locking import directory_lock

from . import storage
from .fingerprint import describe_mismatch

logger = logging.getLogger("softalign.teachers")

FORMAT = "softalign-teacher-cache"
#: 2: the caption->image map is a tensor file (caption_to_image.safetensors), no longer a JSON list in the manifest
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARTIAL = ".partial"
#: inside ``.partial/``: the command line of the build, shown by ``cache info`` / load on an unfinished build
COMMAND_FILE = "command.txt"
FILES = {"text": "text.safetensors", "image": "image.safetensors"}
#: the caption->image map: one int64 tensor "caption_to_image" [num_captions]
MAP_FILE = "caption_to_image.safetensors"


class Source:
    """Rows of one modality: ``count`` items, ``encode(start, stop) -> Tensor [stop-start, dim]``."""

    def __init__(self, modality: str, count: int, info: dict, encode: Callable[[int, int], torch.Tensor]):
        self.modality = modality
        self.count = int(count)
        self.info = info  # {"name", "dim", "kind", ...}: stored in the manifest
        self.encode = encode

    @property
    def dim(self) -> int:
        return int(self.info["dim"])


def teacher_info(teacher) -> dict:
    info = {"name": str(teacher.name), "dim": int(teacher.dim)}
    cfg = getattr(teacher, "config", None)
    if isinstance(cfg, dict):
        info.update({k: v for k, v in cfg.items() if k not in ("name", "dim")})
    info.setdefault("kind", type(teacher).__name__)
    return info


def text_source(teacher, captions: Sequence[str]) -> Source:
    def encode(start: int, stop: int) -> torch.Tensor:
        return teacher.encode(list(captions[start:stop]))

    return Source("text", len(captions), teacher_info(teacher), encode)


def image_source(teacher, images, batch_size: int | None = None) -> Source:
    """Images are decoded one teacher batch at a time, the next batch in a background thread."""
    bs = int(batch_size or getattr(teacher, "batch_size", 32) or 32)

    def load(s: int, e: int):
        return [images.load(i) for i in range(s, e)]

    def encode(start: int, stop: int) -> torch.Tensor:
        bounds = [(s, min(s + bs, stop)) for s in range(start, stop, bs)]
        outs = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, *bounds[0])
            for j, (s, e) in enumerate(bounds):
                batch = pending.result()
                if j + 1 < len(bounds):
                    pending = pool.submit(load, *bounds[j + 1])
                outs.append(_check_rows(teacher.encode(batch), e - s, teacher, "image", s))
        return torch.cat(outs)

    return Source("image", len(images), teacher_info(teacher), encode)


def array_source(modality: str, array, info: dict) -> Source:
    """Rows of a precomputed matrix (numpy array / memmap / tensor), e.g. imported teacher features."""

    def encode(start: int, stop: int) -> torch.Tensor:
        part = array[start:stop]
        if isinstance(part, torch.Tensor):
            return part.float()
        return torch.from_numpy(np.array(part, dtype=np.float32))  # copy: memmap slices stay read-only

    return Source(modality, len(array), info, encode)


def _check_rows(out, n: int, teacher, modality: str, start: int) -> torch.Tensor:
    dim = int(teacher.dim)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    if out.dim() != 2 or out.shape[0] != n or out.shape[1] != dim:
        raise ValueError(
            f"{modality} teacher {teacher.name!r} returned shape {list(out.shape)} for {modality} items "
            f"{start}..{start + n - 1}; expected [{n}, {dim}] (teacher.dim = {dim})"
        )
    return out


def _finalize_rows(out, source: Source, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    n = stop - start
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    if out.dim() != 2 or out.shape[0] != n or out.shape[1] != source.dim:
        raise ValueError(
            f"{source.modality} teacher {source.info['name']!r} returned shape {list(out.shape)} for "
            f"{source.modality} items {start}..{stop - 1}; expected [{n}, {source.dim}]"
        )
    out = out.detach().float().cpu()
    finite = torch.isfinite(out).all(dim=1)
    if not bool(finite.all()):
        bad = start + int((~finite).nonzero()[0])
        raise ValueError(
            f"{source.modality} teacher {source.info['name']!r} returned non-finite values (NaN or inf) "
            f"for {source.modality} item {bad}; nothing of it was written to the cache"
        )
    return F.normalize(out, dim=1).to(dtype)


class _State:
    """process_index / num_processes / barrier from an Accelerator or PartialState, else torch.distributed.

    Without an ``accelerator``, ``PartialState()`` is created when the environment says the job is
    distributed (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``), which also initialises the
    process group. An initialised ``torch.distributed`` group is the ground truth for rank and size
    (e.g. under ``accelerate.debug_launcher`` the PartialState may not see the group).
    """

    def __init__(self, accelerator=None):
        state = accelerator
        dist = torch.distributed
        if (
            state is None
            and not (dist.is_available() and dist.is_initialized())
            and int(os.environ.get("WORLD_SIZE", "1")) > 1
        ):
            from accelerate import PartialState

            state = PartialState()
        self.state = state
        self.index = int(getattr(state, "process_index", 0)) if state is not None else 0
        self.world = int(getattr(state, "num_processes", 1)) if state is not None else 1
        self.device = getattr(state, "device", None) if state is not None else None
        self._use_dist = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > self.world:
            self.index, self.world, self._use_dist = dist.get_rank(), dist.get_world_size(), True

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, tasks: list) -> list:
        """This process's share of ``tasks``: Accelerate's ``split_between_processes`` (contiguous blocks) under
        an Accelerator / PartialState, every ``world``-th task under a bare torch.distributed group."""
        if self.world <= 1:
            return list(tasks)
        if not self._use_dist and callable(getattr(self.state, "split_between_processes", None)):
            with self.state.split_between_processes(list(tasks)) as mine:
                return list(mine)
        return list(tasks[self.index :: self.world])

    def wait(self) -> None:
        if self.world <= 1:
            return
        if self._use_dist or self.state is None:
            torch.distributed.barrier()
        else:
            self.state.wait_for_everyone()


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _chunk_path(partial: Path, modality: str, k: int, n: int) -> Path:
    return partial / f"{modality}-{k:06d}-of-{n:06d}.safetensors"


def _chunk_ok(path: Path, rows: int, dim: int, key_hash: str) -> bool:
    """A finished chunk of this build: a complete safetensors file (``safe_open`` checks the header against the
    file) with the expected shape and this build's key in its metadata."""
    if not path.is_file():
        return False
    try:
        meta, shapes = storage.safetensors_metadata_and_shapes(path)
    except ValueError:
        return False
    return shapes.get("embeddings") == [rows, dim] and meta.get("build") == key_hash


def identity_mismatch(stored: dict, wanted: dict) -> str | None:
    """Compare two manifests' identities (fingerprint, teachers, dtype); None if they agree."""
    fp = describe_mismatch(stored["fingerprint"], wanted["fingerprint"])
    if fp:
        return f"data differs ({fp})"
    for mod in ("text", "image"):
        a, b = stored[f"{mod}_teacher"], wanted[f"{mod}_teacher"]
        if (a["name"], a["dim"]) != (b["name"], b["dim"]):
            return (
                f"{mod} teacher differs (cache: {a['name']!r}, {a['dim']}-d; requested: {b['name']!r}, {b['dim']}-d)"
            )
    if stored["dtype"] != wanted["dtype"]:
        return f"dtype differs (cache: {stored['dtype']}; requested: {wanted['dtype']})"
    return None


def build_cache(
    out_dir,
    text: Source,
    image: Source,
    caption_to_image: torch.Tensor,
    fingerprint: dict,
    chunk_size: int = 4096,
    dtype="float16",
    accelerator=None,
    overwrite: bool = False,
    progress: bool = True,
    extra: dict | None = None,
    command: str | None = None,
) -> Path:
    """Encode (or copy) both modalities into ``out_dir``; see the module docstring. Returns ``out_dir``.

    The main process holds ``out_dir``'s lock (:func:`softalign.locking.directory_lock`) throughout: a second build
    into the same directory fails at once, naming the first. Temporary files and a leftover ``.partial/`` of a
    killed build are removed under that lock. ``command`` (the CLI's command line) is kept in ``.partial/`` so
    that ``cache info`` on an unfinished build can say how to resume it.
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    st = _State(accelerator)
    with contextlib.ExitStack() as stack:
        if st.is_main:
            stack.enter_context(directory_lock(out_dir, "softalign cache build"))
        return _build_locked(
            out_dir,
            text,
            image,
            caption_to_image,
            fingerprint,
            chunk_size,
            dtype,
            st,
            overwrite,
            progress,
            extra,
            command,
        )


def _build_locked(
    out_dir,
    text: Source,
    image: Source,
    caption_to_image: torch.Tensor,
    fingerprint: dict,
    chunk_size,
    dtype,
    st: _State,
    overwrite: bool,
    progress: bool,
    extra: dict | None,
    command: str | None,
) -> Path:
    """The build under the directory lock, in four steps: reuse (or clear) a finished cache, resume (or discard)
    the chunks of an interrupted build, encode this process's chunks, then (main process) merge them and write
    the manifest last."""
    chunk_size = int(chunk_size)
    tdtype = storage.torch_dtype(dtype)
    out = Path(out_dir)
    identity = {
        "fingerprint": fingerprint,
        "text_teacher": text.info,
        "image_teacher": image.info,
        "dtype": storage.dtype_name(tdtype),
    }
    key = {
        "fingerprint": fingerprint.get("dataset"),
        "text": [text.info["name"], text.dim],
        "image": [image.info["name"], image.dim],
        "dtype": identity["dtype"],
        "chunk_size": chunk_size,
        "counts": [text.count, image.count],
    }
    if _reuse_or_clear(out, identity, st, overwrite):
        return out
    _prepare_partial(out, key, st, command)
    _encode_chunks(out, text, image, chunk_size, tdtype, _key_hash(key), st, progress)
    if st.is_main:
        _merge_and_commit(
            out, text, image, chunk_size, tdtype, _key_hash(key), caption_to_image, identity, st.world, extra
        )
    st.wait()
    return out


def _reuse_or_clear(out: Path, identity: dict, st: _State, overwrite: bool) -> bool:
    """True when ``out`` already holds this cache (only leftovers are cleaned); a cache of other inputs is refused,
    or removed (manifest first, so the directory never looks complete) with ``overwrite``."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        stored = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        stored = {}
    try:
        why = (
            identity_mismatch(stored, identity)
            if isinstance(stored, dict) and stored.get("format") == FORMAT
            else "its manifest.json is not a softalign cache manifest"
        )
    except (KeyError, TypeError):
        why = "its manifest.json is damaged"
    if why is None:
        if st.is_main:  # a build killed after its manifest: only leftovers remain to clean up
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
            storage.remove_stale_temporaries(out)
        st.wait()
        return True
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds a teacher cache built for other inputs: {why}. "
            "Choose another directory or pass overwrite=True (CLI: --overwrite)"
        )
    st.wait()
    if st.is_main:
        manifest_path.unlink()  # first: from now on the directory never looks complete
        for f in (*FILES.values(), MAP_FILE):
            if (out / f).exists():
                (out / f).unlink()
    st.wait()
    return False


def _prepare_partial(out: Path, key: dict, st: _State, command: str | None) -> None:
    """The chunk folder of this build: kept when an interrupted build had the same settings, else started over."""
    partial = out / PARTIAL
    if st.is_main:
        out.mkdir(parents=True, exist_ok=True)
        removed = storage.remove_stale_temporaries(out) + storage.remove_stale_temporaries(partial)
        if removed:
            logger.info("%s: removed %d temporary file(s) left by an interrupted build", out, removed)
        state_file = partial / "build.json"
        if state_file.is_file():
            try:
                old = json.loads(state_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                old = None
            if old != key:
                logger.warning("%s: discarding chunks of an interrupted build with other settings", partial)
                shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        if not state_file.is_file():
            storage.atomic_write_json(state_file, key)
        if command:
            storage.atomic_write_text(partial / COMMAND_FILE, command + "\n")
    st.wait()


def _chunk_tasks(src: Source, chunk_size: int) -> list[tuple[Source, int, int, int, int]]:
    """``(source, k, n, start, stop)`` of each of the source's ``n`` chunks."""
    n = max(1, math.ceil(src.count / chunk_size))
    return [(src, k, n, k * chunk_size, min(src.count, (k + 1) * chunk_size)) for k in range(n)]


def _encode_chunks(
    out: Path, text: Source, image: Source, chunk_size: int, tdtype, key_hash: str, st: _State, progress: bool
) -> None:
    """Encode this process's share of the chunks (``split_between_processes``) that are not already complete."""
    from tqdm.auto import tqdm

    partial = out / PARTIAL
    mine = st.shard(_chunk_tasks(text, chunk_size) + _chunk_tasks(image, chunk_size))
    todo = [
        t
        for t in mine
        if not _chunk_ok(_chunk_path(partial, t[0].modality, t[1], t[2]), t[4] - t[3], t[0].dim, key_hash)
    ]
    done_items = sum(t[4] - t[3] for t in mine) - sum(t[4] - t[3] for t in todo)
    if done_items and st.is_main:
        logger.info("resuming %s: %d of %d chunks already built", out, len(mine) - len(todo), len(mine))
    with tqdm(
        total=sum(t[4] - t[3] for t in mine),
        initial=done_items,
        unit="item",
        dynamic_ncols=True,
        disable=not (progress and st.is_main),
        desc=f"softalign cache [{st.index}/{st.world}]" if st.world > 1 else "softalign cache",
    ) as bar:
        for src, k, n, s, e in todo:
            rows = _finalize_rows(src.encode(s, e), src, s, e, tdtype)
            storage.atomic_save_tensors(
                _chunk_path(partial, src.modality, k, n),
                {"embeddings": rows},
                metadata={"build": key_hash, "start": str(s), "stop": str(e)},
            )
            bar.update(e - s)
    st.wait()


def _merge_and_commit(
    out: Path,
    text: Source,
    image: Source,
    chunk_size: int,
    tdtype,
    key_hash: str,
    caption_to_image: torch.Tensor,
    identity: dict,
    world: int,
    extra: dict | None,
) -> None:
    """Main process: check every chunk, merge each modality into one file (one chunk in memory at a time), write
    the caption->image map as a tensor, then the manifest (the commit point), then drop the chunks."""
    from softalign import __version__

    partial = out / PARTIAL
    files = {}
    for src in (text, image):
        tasks = _chunk_tasks(src, chunk_size)
        paths = [_chunk_path(partial, src.modality, k, n) for _, k, n, _, _ in tasks]
        for (_, k, n, s, e), p in zip(tasks, paths):
            if not _chunk_ok(p, e - s, src.dim, key_hash):
                raise RuntimeError(f"{src.modality} chunk {k} of {n} is missing or invalid after the build: {p}")

        def chunks(paths=paths):
            for p in paths:
                yield storage.load_tensors(p)["embeddings"]

        fname = FILES[src.modality]
        storage.write_safetensors_streamed(
            out / fname,
            {"embeddings": (tdtype, (src.count, src.dim))},
            {"embeddings": chunks},
            metadata={"format": FORMAT, "modality": src.modality},
        )
        files[src.modality] = {
            "path": fname,
            "key": "embeddings",
            "shape": [src.count, src.dim],
            "bytes": (out / fname).stat().st_size,
            "sha256": storage.file_sha256(out / fname),
        }
    # the map as a tensor (at 20M captions a JSON list was 214 MB that every process parsed)
    storage.atomic_save_tensors(
        out / MAP_FILE, {"caption_to_image": caption_to_image.long().cpu()}, metadata={"format": FORMAT}
    )
    files["caption_to_image"] = {
        "path": MAP_FILE,
        "key": "caption_to_image",
        "shape": [text.count],
        "bytes": (out / MAP_FILE).stat().st_size,
        "sha256": storage.file_sha256(out / MAP_FILE),
    }
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_captions": text.count,
        "num_images": image.count,
        "dtype": identity["dtype"],
        "normalization": "l2",
        "similarity": "cosine (dot product of the stored L2-normalised rows)",
        "fingerprint": identity["fingerprint"],
        "text_teacher": text.info,
        "image_teacher": image.info,
        "chunk_size": chunk_size,
        "num_processes": world,
        "files": files,
        "softalign_version": __version__,
        **(extra or {}),
    }
    storage.atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(partial, ignore_errors=True)
