"""Faults and bad input around the teacher cache: each reproduces a finding of the reliability review (issue 10)
and checks that it now ends in a clear error naming the item, or in a correct recovery."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from softalign.cli import main
from softalign.locking import DirectoryLockedError, directory_lock
from softalign.teachers import TeacherCache
from softalign.teachers.importers import import_npy
from tests.test_cache_support import CAPTION_TO_IMAGE, CAPTIONS, FakeImageTeacher, FakeTextTeacher, save_images


def build(out, paths, **kw):
    return TeacherCache.build(
        out,
        CAPTIONS,
        paths,
        CAPTION_TO_IMAGE,
        text_teacher=FakeTextTeacher(),
        image_teacher=FakeImageTeacher(),
        progress=False,
        **kw,
    )


@pytest.fixture
def paths(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return save_images(d)


def _fails(capsys, argv, pattern):
    import re

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- CLI input errors
def test_captions_per_image_that_does_not_divide_or_pair_is_refused_naming_both_numbers(tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("\n".join(f"caption {i}" for i in range(16)) + "\n")
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "more").mkdir()
    imgs = save_images(d) + save_images(d / "more")  # 8 images
    (tmp_path / "imgs.txt").write_text("\n".join(imgs) + "\n")
    base = [
        "cache",
        "build",
        "--captions",
        str(tmp_path / "caps.txt"),
        "--images",
        str(tmp_path / "imgs.txt"),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    _fails(capsys, base + ["--captions-per-image", "3"], r"--captions-per-image 3 does not divide the 16 captions")
    _fails(capsys, base + ["--captions-per-image", "4"], r"pairs the 16 captions with 4 images, but 8 images")
    _fails(capsys, base + ["--captions-per-image", "-1"], r"--captions-per-image must be a positive integer, got -1")
    _fails(capsys, base + ["--captions-per-image", "0"], r"--captions-per-image must be a positive integer, got 0")
    # an image directory: the count is known only after listing it
    base_dir = [
        "cache",
        "build",
        "--captions",
        str(tmp_path / "caps.txt"),
        "--images",
        str(d),
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
        "--captions-per-image",
        "4",
    ]
    _fails(capsys, base_dir, r"pairs the 16 captions with 4 images, but 8 images")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_bad_files_and_flags_are_named(tmp_path, capsys, paths):
    img_dir = os.path.dirname(paths[0])
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9 noir\n".encode("latin-1") * 4)
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "latin1.txt"),
            "--images",
            img_dir,
            "--out",
            str(tmp_path / "c"),
        ],
        r"--captions \S*latin1.txt: not UTF-8 text",
    )
    (tmp_path / "bad.json").write_text('[{"caption": "a", "image": "x.png"},]')
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "bad.json"),
            "--images",
            img_dir,
            "--out",
            str(tmp_path / "c"),
        ],
        r"--captions \S*bad.json: not valid JSON \(.* line 1, column",
    )
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    (tmp_path / "c2i.txt").write_text("0\n0\nzero\n")
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "caps.txt"),
            "--images",
            img_dir,
            "--caption-to-image",
            str(tmp_path / "c2i.txt"),
            "--out",
            str(tmp_path / "c"),
        ],
        r"--caption-to-image \S*c2i.txt: caption 2 \(line 3\) is 'zero', not an integer image index",
    )
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "caps.txt"),
            "--images",
            str(tmp_path / "no_such_dir"),
            "--captions-per-image",
            "3",
            "--out",
            str(tmp_path / "c"),
        ],
        r"--images \S*no_such_dir: no such file or directory",
    )
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "missing.txt"),
            "--images",
            img_dir,
            "--out",
            str(tmp_path / "c"),
        ],
        r"--captions \S*missing.txt: file not found",
    )


def test_exit_codes_follow_one_convention(tmp_path, capsys):
    # bad input: 1 in every command
    _fails(capsys, ["cache", "info", str(tmp_path / "nothing")], "no teacher cache")
    _fails(
        capsys,
        ["eval", "--embeddings", str(tmp_path / "nothing.safetensors"), "--out", str(tmp_path / "o")],
        "file not found",
    )
    (tmp_path / "r.yaml").write_text("- a\n- b\n")
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "r.yaml")])
    assert e.value.code not in (0, 2)  # SystemExit(message) exits 1
    # usage errors: 2 (argparse)
    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--no-such-flag"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "exit status:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- images and fingerprints
def test_a_symlink_to_a_listed_image_is_refused_as_a_duplicate(tmp_path, paths):
    link = tmp_path / "images" / "alias.png"
    link.symlink_to(paths[1])
    hard = tmp_path / "images" / "hard.png"
    os.link(paths[2], hard)
    with pytest.raises(ValueError, match=r"image 3 .*alias.png\) duplicates image 1: it is the same file as"):
        TeacherCache.build(
            tmp_path / "c",
            CAPTIONS,
            paths[:3] + [str(link)],
            CAPTION_TO_IMAGE,
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"image 3 .*hard.png\) duplicates image 2"):
        TeacherCache.build(
            tmp_path / "c",
            CAPTIONS,
            paths[:3] + [str(hard)],
            CAPTION_TO_IMAGE,
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )


def test_an_image_edited_in_place_at_the_same_size_changes_the_fingerprint(tmp_path, paths):
    build(tmp_path / "c", paths)
    assert TeacherCache.load(tmp_path / "c").manifest["fingerprint"]["image_hash"] == "content"
    before = TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE)
    stat_before = TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE, image_hash="stat")["images"]
    data = bytearray(open(paths[2], "rb").read())
    data[-20] ^= 0xFF  # same size, other bytes
    open(paths[2], "wb").write(bytes(data))
    after = TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE)
    assert after["images"] != before["images"] and after["captions"] == before["captions"]
    with pytest.raises(ValueError, match="different images"):
        TeacherCache.load(tmp_path / "c", expect_fingerprint=after)
    with pytest.raises(FileExistsError, match="data differs"):
        build(tmp_path / "c", paths)
    # the size-only mode (the format of older caches) cannot see it: that is why content is the default
    assert TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE, image_hash="stat")["images"] == stat_before


# --------------------------------------------------------------------------------------------- interrupted builds
def test_leftovers_of_a_killed_build_are_removed_on_the_next_run(tmp_path, paths):
    out = tmp_path / "c"
    build(out, paths)
    # kill -9 after the manifest rename but before .partial/ was removed, and with temporaries of the merge
    (out / ".partial").mkdir()
    (out / ".partial" / ".text-000000-of-000001.safetensors.abcd.tmp").write_bytes(b"x" * 10)
    (out / ".text.safetensors.wxyz.tmp").write_bytes(b"x" * 10)
    (out / ".manifest.json.qrst.tmp").write_text("{")
    build(out, paths)  # identical inputs: reused
    assert not (out / ".partial").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # kill -9 before the manifest: temporaries in the directory and in .partial/ go, the build completes
    (out / "manifest.json").unlink()
    (out / ".partial").mkdir()
    (out / ".partial" / ".image-000000-of-000001.safetensors.1234.tmp").write_bytes(b"y")
    (out / ".image.safetensors.5678.tmp").write_bytes(b"y")
    cache = build(out, paths)
    assert cache.num_captions == len(CAPTIONS)
    assert not list(out.rglob(".*.tmp")) and not (out / ".partial").exists()


def test_cache_info_on_an_unfinished_build_says_how_to_resume(tmp_path, capsys, paths):
    with pytest.raises(RuntimeError, match="teacher killed"):
        TeacherCache.build(
            tmp_path / "c",
            CAPTIONS,
            paths,
            CAPTION_TO_IMAGE,
            text_teacher=FakeTextTeacher(fail_after=1),
            image_teacher=FakeImageTeacher(),
            chunk_size=4,
            progress=False,
            command="softalign cache build --captions caps.txt --images imgs/ --out c",
        )
    err = _fails(capsys, ["cache", "info", str(tmp_path / "c")], r"unfinished teacher-cache build \(\d+ chunks done")
    assert "resume it by running the same command again: softalign cache build --captions caps.txt" in err


def test_the_cli_records_its_command_line_for_the_resume_hint(tmp_path, paths, monkeypatch):
    from softalign.teachers import build as tbuild

    seen = {}
    real = tbuild._build_locked

    def interrupted(out_dir, *a):
        seen["command"] = a[-1]
        raise KeyboardInterrupt

    monkeypatch.setattr(tbuild, "_build_locked", interrupted)
    monkeypatch.setattr("softalign.teachers.text.resolve_text_teacher", lambda *a, **k: FakeTextTeacher())
    monkeypatch.setattr("softalign.teachers.image.resolve_image_teacher", lambda *a, **k: FakeImageTeacher())
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    argv = [
        "cache",
        "build",
        "--captions",
        str(tmp_path / "caps.txt"),
        "--images",
        os.path.dirname(paths[0]),
        "--captions-per-image",
        "3",
        "--out",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert (
        seen["command"].startswith("softalign cache build --captions ") and "--captions-per-image 3" in seen["command"]
    )
    monkeypatch.setattr(tbuild, "_build_locked", real)


def test_a_second_build_into_a_locked_directory_fails_naming_the_first(tmp_path, paths):
    with directory_lock(tmp_path / "c", "softalign cache build"):
        with pytest.raises(DirectoryLockedError, match=rf"in use by softalign cache build \(pid {os.getpid()} on "):
            build(tmp_path / "c", paths)
    build(tmp_path / "c", paths)  # the lock is released with its holder
    # a holder that dies (kill -9) releases it too: the kernel drops the flock with the process
    import subprocess
    import sys

    code = (
        "import sys, time; from softalign.locking import directory_lock\n"
        "with directory_lock(sys.argv[1], 'holder'):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(DirectoryLockedError, match=rf"holder \(pid {proc.pid} "):
        build(tmp_path / "d", paths)
    proc.kill()
    proc.wait()
    assert build(tmp_path / "d", paths).num_captions == len(CAPTIONS)


def test_outputs_honour_the_umask(tmp_path, paths):
    old = os.umask(0o022)
    try:
        build(tmp_path / "c", paths)
    finally:
        os.umask(old)
    for name in ("manifest.json", "text.safetensors", "image.safetensors"):
        assert stat.S_IMODE((tmp_path / "c" / name).stat().st_mode) == 0o644, name
    old = os.umask(0o077)
    try:
        build(tmp_path / "private", paths)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private" / "manifest.json").stat().st_mode) == 0o600


# -------------------------------------------------------------------------------------------- edited caches
def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def built(tmp_path, paths):
    build(tmp_path / "c", paths, dtype="float32")
    return tmp_path / "c"


def test_manifest_paths_may_not_leave_the_cache_directory(tmp_path, built):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.safetensors").write_bytes((built / "text.safetensors").read_bytes())
    _edit_manifest(built, lambda m: m["files"]["text"].update(path="../elsewhere/x.safetensors"))
    with pytest.raises(ValueError, match=r"files.text.path = '../elsewhere/x.safetensors' points outside"):
        TeacherCache.load(built)
    _edit_manifest(built, lambda m: m["files"]["text"].update(path=str(elsewhere / "x.safetensors")))
    with pytest.raises(ValueError, match="points outside the cache directory"):
        TeacherCache.load(built)


def test_same_size_garbage_in_a_table_is_caught_by_its_checksum(built):
    raw = bytearray((built / "image.safetensors").read_bytes())
    raw[-64:] = os.urandom(64)
    (built / "image.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="image.safetensors does not match the checksum"):
        TeacherCache.load(built)
    TeacherCache.load(built, verify=False)  # an explicit opt-out still opens it


def test_an_edited_caption_to_image_map_is_refused(built):
    from softalign.teachers.storage import file_sha256

    path = built / "caption_to_image.safetensors"
    edited = torch.tensor([0, 1, 0] + CAPTION_TO_IMAGE[3:])
    save_file({"caption_to_image": edited}, str(path), metadata={"format": "softalign-teacher-cache"})  # same size
    with pytest.raises(ValueError, match="caption_to_image.safetensors does not match the checksum"):
        TeacherCache.load(built)
    # even with the checksum updated (or verify=False), the map no longer matches its fingerprint
    _edit_manifest(
        built, lambda m: m["files"]["caption_to_image"].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    )
    with pytest.raises(ValueError, match="does not match the map its fingerprint was computed from"):
        TeacherCache.load(built)
    out_of_range = torch.tensor(CAPTION_TO_IMAGE)
    out_of_range[4] = 99
    save_file({"caption_to_image": out_of_range}, str(path))
    _edit_manifest(
        built, lambda m: m["files"]["caption_to_image"].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    )
    with pytest.raises(ValueError, match=r"caption_to_image\[4\] = 99 is outside the 4 images"):
        TeacherCache.load(built)


def test_a_cache_of_another_format_version_is_refused_with_what_to_do(built):
    m = json.loads((built / "manifest.json").read_text())
    m["version"] = 3
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ValueError,
        match=r"cache format version 3 is not the one this softalign reads \(2\); rebuild "
        r"the cache with this softalign \(or upgrade softalign\)",
    ):
        TeacherCache.load(built)
    m["version"] = 1  # format 1 (the map in the manifest) is not read: no release wrote it
    m["caption_to_image"] = CAPTION_TO_IMAGE
    del m["files"]["caption_to_image"]
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"files.caption_to_image \(the caption->image map\) is missing; rebuild"):
        TeacherCache.load(built)


def test_nan_rows_and_edited_dims_are_caught_at_load_naming_cache_and_row(built):
    t = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    t[7, 3] = float("nan")
    save_file({"embeddings": t}, str(built / "text.safetensors"), metadata={"format": "softalign-teacher-cache"})
    size, digest = (built / "text.safetensors").stat().st_size, None
    from softalign.teachers.storage import file_sha256

    digest = file_sha256(built / "text.safetensors")
    _edit_manifest(built, lambda m: m["files"]["text"].update(bytes=size, sha256=digest))
    with pytest.raises(
        ValueError, match=rf"teacher cache {built}: row 7 of text.safetensors .* non-finite values \(NaN or inf\)"
    ):
        TeacherCache.load(built)
    _edit_manifest(built, lambda m: m["text_teacher"].update(dim=999))
    with pytest.raises(ValueError, match=r"text_teacher.dim is 999 in the manifest but text.safetensors holds 8-d"):
        TeacherCache.load(built)


def test_a_manifest_missing_a_key_is_named_in_one_line(built, capsys):
    _edit_manifest(built, lambda m: m.pop("files"))
    _fails(capsys, ["cache", "info", str(built)], r"manifest.json: required key 'files' is missing")
    (built / "manifest.json").write_text("{not json")
    _fails(capsys, ["cache", "info", str(built)], "is not valid JSON")


# ------------------------------------------------------------------------------------------------- importers
class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/softalign_pwned_by_npy",))


def test_a_pickled_npy_is_refused_by_default_and_its_code_does_not_run(tmp_path, capsys):
    marker = "/tmp/softalign_pwned_by_npy"
    if os.path.exists(marker):
        os.remove(marker)
    np.save(tmp_path / "evil.npy", np.array([_Payload()], dtype=object), allow_pickle=True)
    assert not os.path.exists(marker)
    np.save(tmp_path / "txt.npy", np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32))
    _fails(
        capsys,
        [
            "cache",
            "import-npy",
            "--image-features",
            str(tmp_path / "evil.npy"),
            "--text-features",
            str(tmp_path / "txt.npy"),
            "--captions-per-image",
            "3",
            "--out",
            str(tmp_path / "c"),
        ],
        r"evil.npy holds pickled Python objects .* --allow-pickle",
    )
    with pytest.raises(ValueError, match="pickled"):
        import_npy(tmp_path / "c", tmp_path / "evil.npy", [0] * 12, text_features=tmp_path / "txt.npy", progress=False)
    assert not os.path.exists(marker)


def test_region_features_are_pooled_on_request(tmp_path, capsys):
    rng = np.random.default_rng(1)
    regions = rng.normal(size=(4, 36, 16)).astype(np.float32)
    np.save(tmp_path / "train_ims.npy", regions)
    np.save(tmp_path / "txt.npy", rng.normal(size=(12, 8)).astype(np.float32))
    args = [
        "cache",
        "import-npy",
        "--image-features",
        str(tmp_path / "train_ims.npy"),
        "--text-features",
        str(tmp_path / "txt.npy"),
        "--captions-per-image",
        "3",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    _fails(capsys, args + ["--out", str(tmp_path / "c")], r"region features of shape \(4, 36, 16\).*--pool mean")
    for pool, ref in (("mean", regions.mean(axis=1)), ("max", regions.max(axis=1))):
        assert main(args + ["--out", str(tmp_path / pool), "--pool", pool]) == 0, capsys.readouterr().err
        cache = TeacherCache.load(tmp_path / pool)
        want = torch.nn.functional.normalize(torch.from_numpy(ref), dim=1)
        torch.testing.assert_close(cache.image_embeddings(torch.arange(4)), want, atol=1e-5, rtol=0)
        assert cache.manifest["image_teacher"]["pool"] == pool
    # another pooling is another teacher: the mean cache is not reused for max
    assert (
        TeacherCache.load(tmp_path / "mean").manifest["fingerprint"]["images"]
        != TeacherCache.load(tmp_path / "max").manifest["fingerprint"]["images"]
    )


def test_a_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_safetensors(name, *a, **k):
        if name.split(".")[0] == "safetensors":
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    (tmp_path / "e.safetensors").write_bytes(b"x")
    assert main(["eval", "--embeddings", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "softalign eval needs the 'eval' extra (missing module: safetensors): pip install 'softalign[eval]'" in err


def test_a_blank_line_in_the_image_list_is_refused_not_skipped(tmp_path, capsys, paths):
    """Images are numbered by their position in --images list.txt; skipping a blank line would pair every later
    image with the wrong captions (the build once exited 0 with img004's captions on img005)."""
    n = len(paths)
    (tmp_path / "caps.txt").write_text("".join(f"caption {i}\n" for i in range(2 * n)))
    (tmp_path / "c2i.txt").write_text("".join(f"{i // 2}\n" for i in range(2 * n)))
    listed = [str(p) for p in paths]
    (tmp_path / "images.txt").write_text("\n".join(listed[:3] + [""] + listed[3:]) + "\n\n")
    _fails(
        capsys,
        [
            "cache",
            "build",
            "--captions",
            str(tmp_path / "caps.txt"),
            "--images",
            str(tmp_path / "images.txt"),
            "--caption-to-image",
            str(tmp_path / "c2i.txt"),
            "--out",
            str(tmp_path / "c"),
        ],
        r"--images \S*images.txt: line 4 is blank. Images are numbered by their position in the list",
    )
    assert not (tmp_path / "c" / "manifest.json").exists()
