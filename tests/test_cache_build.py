"""TeacherCache: build, load, lookup, resume, fingerprints and bad input (fake teachers, tiny data)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from softalign.teachers import CacheMismatchError, IncompleteCacheError, TeacherCache, TeacherSimilarities
from tests.test_cache_support import (
    CAPTION_TO_IMAGE,
    CAPTIONS,
    FakeImageTeacher,
    FakeTextTeacher,
    WrongDimTeacher,
    image_features,
    make_images,
    save_images,
    text_features,
)


def build(out, paths, **kw):
    kw.setdefault("text_teacher", FakeTextTeacher())
    kw.setdefault("image_teacher", FakeImageTeacher())
    kw.setdefault("chunk_size", 5)
    kw.setdefault("progress", False)
    return TeacherCache.build(out, CAPTIONS, paths, CAPTION_TO_IMAGE, **kw)


@pytest.fixture
def paths(tmp_path):
    return save_images(tmp_path)


def test_build_stores_normalised_teacher_embeddings(tmp_path, paths):
    cache = build(tmp_path / "c", paths, dtype="float32")
    assert (cache.num_captions, cache.num_images, cache.text_dim, cache.image_dim) == (12, 4, 8, 6)
    ids = torch.tensor([0, 4, 7, 11, 1])
    img, txt = cache.embeddings(ids)
    ref_txt = F.normalize(text_features([CAPTIONS[i] for i in ids]), dim=1)
    ref_img = F.normalize(image_features([make_images()[CAPTION_TO_IMAGE[i]] for i in ids]), dim=1)
    torch.testing.assert_close(txt, ref_txt)
    torch.testing.assert_close(img, ref_img)
    assert img.dtype == txt.dtype == torch.float32
    assert cache.image_ids(ids).tolist() == [CAPTION_TO_IMAGE[i] for i in ids]
    from safetensors.torch import load_file  # the rows on disk are already unit-norm (manifest: l2)

    for name in ("text", "image"):
        rows = load_file(str(tmp_path / "c" / f"{name}.safetensors"))["embeddings"]
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))


def test_fp16_storage_is_default_and_close(tmp_path, paths):
    cache = build(tmp_path / "c", paths)
    assert cache.manifest["dtype"] == "float16"
    img, txt = cache.embeddings(torch.arange(12))
    torch.testing.assert_close(txt, F.normalize(text_features(CAPTIONS), dim=1), atol=2e-3, rtol=0)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(12))
    torch.testing.assert_close(img.norm(dim=1), torch.ones(12))


def test_similarities_match_independent_cosines(tmp_path, paths):
    cache = build(tmp_path / "c", paths, dtype="float32")
    ids = torch.tensor([3, 0, 1, 9, 5, 6])
    sims = cache.similarities(ids)
    assert isinstance(sims, TeacherSimilarities)
    imgs = make_images()
    ref_i = F.normalize(image_features([imgs[CAPTION_TO_IMAGE[i]] for i in ids]), dim=1)
    ref_t = F.normalize(text_features([CAPTIONS[i] for i in ids]), dim=1)
    torch.testing.assert_close(sims.image, ref_i @ ref_i.T)
    torch.testing.assert_close(sims.text, ref_t @ ref_t.T)
    # captions 0 and 1 describe the same image: teacher image similarity 1
    assert sims.image[1, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert sims.image.shape == sims.text.shape == (6, 6)


def test_manifest_records_teachers_dtype_fingerprint_and_map(tmp_path, paths):
    cache = build(tmp_path / "c", paths)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m == cache.manifest
    assert m["text_teacher"]["name"] == "fake-text" and m["text_teacher"]["dim"] == 8
    assert m["image_teacher"]["name"] == "fake-image" and m["image_teacher"]["dim"] == 6
    assert m["dtype"] == "float16" and m["normalization"] == "l2"
    assert "caption_to_image" not in m and m["files"]["caption_to_image"]["path"] == "caption_to_image.safetensors"
    assert TeacherCache.load(tmp_path / "c").caption_to_image.tolist() == CAPTION_TO_IMAGE  # a tensor file
    assert m["fingerprint"] == {**TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE), "source": "computed"}
    assert not (tmp_path / "c" / ".partial").exists()


def test_lookup_device_ids_validation_and_gather_identity(tmp_path, paths):
    cache = build(tmp_path / "c", paths)
    with pytest.raises(ValueError, match="caption id 12 is out of range"):
        cache.similarities(torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="caption id -1 is out of range"):
        cache.embeddings([-1, 2])
    with pytest.raises(TypeError, match="integers"):
        cache.embeddings(torch.tensor([0.0, 1.0]))
    a = cache.similarities([1, 2, 3])
    b = cache.similarities(torch.tensor([1, 2, 3]), gather=True)  # not distributed: identity
    torch.testing.assert_close(a.image, b.image)
    assert cache.embeddings(torch.tensor([1]), device="meta")[0].device.type == "meta"


def test_rebuild_same_inputs_reuses_cache(tmp_path, paths):
    build(tmp_path / "c", paths)
    t, i = FakeTextTeacher(), FakeImageTeacher()
    build(tmp_path / "c", paths, text_teacher=t, image_teacher=i)
    assert t.encoded == 0 and i.encoded == 0


def test_interrupted_build_resumes_and_equals_clean_build(tmp_path, paths):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="teacher killed"):
        build(out, paths, chunk_size=2, text_teacher=FakeTextTeacher(fail_after=3))
    assert not (out / "manifest.json").exists()
    with pytest.raises(IncompleteCacheError, match="unfinished"):
        TeacherCache.load(out)
    t, i = FakeTextTeacher(), FakeImageTeacher()
    resumed = build(out, paths, chunk_size=2, text_teacher=t, image_teacher=i)
    # 3 of 6 text chunks were done before the 'kill'; the image chunks were not reached
    assert t.encoded == len(CAPTIONS) - 3 * 2
    assert [len(c) for c in t.calls] == [2, 2, 2]
    clean = build(tmp_path / "clean", paths, chunk_size=2)
    ids = torch.arange(12)
    for a, b in zip(resumed.embeddings(ids), clean.embeddings(ids)):
        assert torch.equal(a, b)
    assert (out / "text.safetensors").read_bytes() == (tmp_path / "clean" / "text.safetensors").read_bytes()


def test_partial_build_with_other_settings_is_discarded(tmp_path, paths):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        build(out, paths, chunk_size=2, text_teacher=FakeTextTeacher(fail_after=2))
    t = FakeTextTeacher()
    build(out, paths, chunk_size=3, text_teacher=t)  # different chunking: start over
    assert t.encoded == len(CAPTIONS)


def test_load_refuses_other_data_or_teacher(tmp_path, paths):
    build(tmp_path / "c", paths)
    other_caps = list(CAPTIONS)
    other_caps[4] = "a purple field"
    with pytest.raises(CacheMismatchError, match="other data.*captions"):
        TeacherCache.load(
            tmp_path / "c", expect_fingerprint=TeacherCache.fingerprint_of(other_caps, paths, CAPTION_TO_IMAGE)
        )
    with pytest.raises(CacheMismatchError, match="images"):
        TeacherCache.load(
            tmp_path / "c",
            expect_fingerprint=TeacherCache.fingerprint_of(CAPTIONS, list(reversed(paths)), CAPTION_TO_IMAGE),
        )
    with pytest.raises(CacheMismatchError, match="caption_to_image"):
        TeacherCache.load(tmp_path / "c", expect_fingerprint=TeacherCache.fingerprint_of(CAPTIONS, paths, [0] * 12))
    with pytest.raises(CacheMismatchError, match="text teacher 'fake-text'.*not 'offline-minilm'"):
        TeacherCache.load(tmp_path / "c", expect_text_teacher="offline-minilm")
    with pytest.raises(CacheMismatchError, match="dataset fingerprint"):
        TeacherCache.load(tmp_path / "c", expect_fingerprint="0123abcd")
    ok = TeacherCache.load(
        tmp_path / "c",
        expect_fingerprint=TeacherCache.fingerprint_of(CAPTIONS, paths, CAPTION_TO_IMAGE),
        expect_text_teacher="fake-text",
        expect_image_teacher=FakeImageTeacher(),
    )
    assert ok.num_captions == 12


def test_build_into_dir_of_other_cache_refuses_unless_overwrite(tmp_path, paths):
    build(tmp_path / "c", paths)
    other = list(CAPTIONS)
    other[0] = "a scarlet square"
    with pytest.raises(FileExistsError, match="data differs.*captions"):
        TeacherCache.build(
            tmp_path / "c",
            other,
            paths,
            CAPTION_TO_IMAGE,
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )
    cache = TeacherCache.build(
        tmp_path / "c",
        other,
        paths,
        CAPTION_TO_IMAGE,
        text_teacher=FakeTextTeacher(),
        image_teacher=FakeImageTeacher(),
        progress=False,
        overwrite=True,
        dtype="float32",
    )
    torch.testing.assert_close(cache.embeddings([0])[1], F.normalize(text_features(["a scarlet square"]), dim=1))


def test_user_fingerprint_is_recorded_and_checked(tmp_path, paths):
    build(tmp_path / "c", paths, fingerprint="coco-karpathy-train-v1")
    assert TeacherCache.load(tmp_path / "c", expect_fingerprint="coco-karpathy-train-v1").num_images == 4
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.load(tmp_path / "c", expect_fingerprint="coco-karpathy-val-v1")


def test_truncated_or_missing_files_are_refused(tmp_path, paths):
    build(tmp_path / "c", paths)
    p = tmp_path / "c" / "image.safetensors"
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(ValueError, match="image.safetensors has .* bytes"):
        TeacherCache.load(tmp_path / "c")
    p.unlink()
    with pytest.raises(FileNotFoundError, match="image.safetensors is missing"):
        TeacherCache.load(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- bad input
def _no_cache(out):
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError):
        TeacherCache.load(out)


def test_missing_image_file_named(tmp_path, paths):
    paths[2] = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"image 2: file not found: .*gone.png"):
        build(tmp_path / "c", paths)
    _no_cache(tmp_path / "c")


def test_unreadable_image_named(tmp_path, paths):
    (tmp_path / "broken.png").write_text("not a png")
    paths[1] = str(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=r"image 1: cannot read .*broken.png"):
        build(tmp_path / "c", paths)
    _no_cache(tmp_path / "c")


def test_empty_caption_named(tmp_path, paths):
    caps = list(CAPTIONS)
    caps[5] = "   "
    with pytest.raises(ValueError, match="caption 5 is empty"):
        TeacherCache.build(
            tmp_path / "c",
            caps,
            paths,
            CAPTION_TO_IMAGE,
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )
    _no_cache(tmp_path / "c")


def test_duplicate_image_named(tmp_path, paths):
    paths[3] = paths[1]
    with pytest.raises(ValueError, match="image 3 .* duplicates image 1"):
        build(tmp_path / "c", paths)


def test_bad_caption_to_image_named(tmp_path, paths):
    bad = list(CAPTION_TO_IMAGE)
    bad[7] = 9
    with pytest.raises(ValueError, match="caption 7 maps to image 9, outside 0..3"):
        TeacherCache.build(
            tmp_path / "c",
            CAPTIONS,
            paths,
            bad,
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )
    with pytest.raises(ValueError, match="11 entries but there are 12 captions"):
        TeacherCache.build(
            tmp_path / "c",
            CAPTIONS,
            paths,
            bad[:11],
            text_teacher=FakeTextTeacher(),
            image_teacher=FakeImageTeacher(),
            progress=False,
        )


def test_wrong_teacher_dims_named(tmp_path, paths):
    with pytest.raises(
        ValueError, match=r"text teacher 'wrong-dim' returned shape \[5, 9\] .* items 0..4; expected \[5, 8\]"
    ):
        build(tmp_path / "c", paths, text_teacher=WrongDimTeacher())
    _no_cache(tmp_path / "c")


# ---------------------------------------------------------------------------------------------- inputs
def test_pil_images_and_hf_dataset_give_same_embeddings(tmp_path, paths):
    datasets = pytest.importorskip("datasets")
    a = build(tmp_path / "paths", paths, dtype="float32")
    b = build(tmp_path / "pil", make_images(), dtype="float32")
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    c = build(tmp_path / "ds", ds, dtype="float32")
    ids = torch.arange(12)
    torch.testing.assert_close(a.embeddings(ids)[0], b.embeddings(ids)[0])
    torch.testing.assert_close(a.embeddings(ids)[0], c.embeddings(ids)[0])
    assert c.manifest["fingerprint"]["images"] != a.manifest["fingerprint"]["images"]


def test_cache_to_device_and_mmap_false(tmp_path, paths):
    build(tmp_path / "c", paths)
    a = TeacherCache.load(tmp_path / "c", mmap=False)
    b = TeacherCache.load(tmp_path / "c").to("cpu")
    ids = torch.tensor([2, 8])
    torch.testing.assert_close(a.similarities(ids).text, b.similarities(ids).text)


def test_bfloat16_and_float32_storage(tmp_path, paths):
    ref = F.normalize(text_features(CAPTIONS), dim=1)
    bf = build(tmp_path / "bf", paths, dtype="bfloat16")
    assert bf.manifest["dtype"] == "bfloat16"
    torch.testing.assert_close(bf.embeddings(torch.arange(12))[1], ref, atol=1e-2, rtol=0)
    f32 = build(tmp_path / "f32", paths, dtype="float32")
    assert (tmp_path / "f32" / "text.safetensors").stat().st_size > (
        tmp_path / "bf" / "text.safetensors"
    ).stat().st_size
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        build(tmp_path / "i8", paths, dtype="int8")
    assert f32.num_captions == 12
