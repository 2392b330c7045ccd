"""Importing existing teacher features: a plain .npy matrix and CUSA's {image_id: array(1, D)} dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softalign.teachers import import_npy, read_features
from tests.test_cache_support import CAPTION_TO_IMAGE, CAPTIONS, FakeTextTeacher, text_features

KEYS = [
    "COCO_val2014_000000391895.jpg",
    "COCO_val2014_000000522418.jpg",
    "COCO_val2014_000000184613.jpg",
    "COCO_val2014_000000318219.jpg",
]


@pytest.fixture
def feats():
    rng = np.random.default_rng(1)
    return rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(12, 10)).astype(np.float32)


def test_plain_matrices(tmp_path, feats):
    img, txt = feats
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    cache = import_npy(
        tmp_path / "c",
        tmp_path / "img.npy",
        CAPTION_TO_IMAGE,
        text_features=tmp_path / "txt.npy",
        dtype="float32",
        chunk_size=5,
        progress=False,
    )
    ids = torch.tensor([0, 5, 11])
    i, t = cache.embeddings(ids)
    torch.testing.assert_close(i, F.normalize(torch.from_numpy(img[[0, 1, 3]]), dim=1))
    torch.testing.assert_close(t, F.normalize(torch.from_numpy(txt[[0, 5, 11]]), dim=1))
    m = cache.manifest
    assert m["image_teacher"]["name"] == "imported:img.npy" and m["text_teacher"]["name"] == "imported:txt.npy"
    assert m["fingerprint"]["source"] == "imported"


def test_cusa_dict_with_captions_and_key_map(tmp_path, feats):
    img, _ = feats
    # CUSA stores {image_id: array(1, D)}; insertion order here differs from KEYS' order on purpose
    order = [2, 0, 3, 1]
    np.save(tmp_path / "train_unicom.npy", {KEYS[j]: img[j][None, :] for j in order}, allow_pickle=True)
    caption_keys = [KEYS[i] for i in CAPTION_TO_IMAGE]
    t = FakeTextTeacher()
    cache = import_npy(
        tmp_path / "c",
        tmp_path / "train_unicom.npy",
        caption_keys,
        captions=CAPTIONS,
        text_teacher=t,
        dtype="float32",
        progress=False,
        allow_pickle=True,
    )
    assert cache.manifest["image_keys"] == [KEYS[j] for j in order]
    assert cache.caption_to_image.tolist() == [order.index(i) for i in CAPTION_TO_IMAGE]
    i, tx = cache.embeddings(torch.arange(12))
    torch.testing.assert_close(i, F.normalize(torch.from_numpy(img[CAPTION_TO_IMAGE]), dim=1))
    torch.testing.assert_close(tx, F.normalize(text_features(CAPTIONS), dim=1))
    # explicit image order
    c2 = import_npy(
        tmp_path / "c2",
        tmp_path / "train_unicom.npy",
        CAPTION_TO_IMAGE,
        captions=CAPTIONS,
        text_teacher=FakeTextTeacher(),
        image_keys=KEYS,
        dtype="float32",
        progress=False,
        allow_pickle=True,
    )
    torch.testing.assert_close(c2.embeddings(torch.arange(12))[0], i)


def test_dict_errors_name_the_item(tmp_path, feats):
    img, _ = feats
    bad = {KEYS[0]: img[0][None], KEYS[1]: img[1][None, :8], KEYS[2]: img[2][None], KEYS[3]: img[3][None]}
    np.save(tmp_path / "bad.npy", bad, allow_pickle=True)
    with pytest.raises(ValueError, match=r"COCO_val2014_000000522418.jpg.* are 8-d, but .* is 16-d"):
        read_features(tmp_path / "bad.npy", allow_pickle=True)
    with pytest.raises(ValueError, match=r"features of image 'x' have shape \(2, 16\)"):
        read_features({"x": np.zeros((2, 16), np.float32)})
    with pytest.raises(ValueError, match="image key 'b' is listed twice"):
        read_features({"a": np.zeros(3), "b": np.zeros(3)}, image_keys=["a", "b", "b"])
    with pytest.raises(KeyError, match="image key 'c' .* has no features"):
        read_features({"a": np.zeros(3)}, image_keys=["a", "c"])
    with pytest.raises(ValueError, match="pickled"):
        read_features(tmp_path / "bad.npy", allow_pickle=False)
    with pytest.raises(ValueError, match=r"region features of shape \(3, 2, 2\).*pool='mean'"):
        read_features(np.zeros((3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="2-D feature matrix"):
        read_features(np.zeros((3, 2, 2, 2), np.float32))
    with pytest.raises(KeyError, match="caption 2 refers to image 'nope'"):
        import_npy(
            tmp_path / "c",
            {"a": np.ones(3)},
            ["a", "a", "nope"],
            captions=["x", "y", "z"],
            text_teacher=FakeTextTeacher(),
            progress=False,
        )
    with pytest.raises(ValueError, match="caption 0 names image 'a' by key, but .* plain matrix"):
        import_npy(
            tmp_path / "c",
            np.ones((2, 3), np.float32),
            ["a", "b", "a"],
            captions=["x", "y", "z"],
            text_teacher=FakeTextTeacher(),
            progress=False,
        )
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_text_feature_rows_must_match_captions(tmp_path, feats):
    img, txt = feats
    with pytest.raises(ValueError, match="12 entries but there are 11 captions"):
        import_npy(tmp_path / "c", img, CAPTION_TO_IMAGE, text_features=txt[:11], progress=False)
    with pytest.raises(ValueError, match="text features have 12 rows but 3 captions"):
        import_npy(tmp_path / "c", img, CAPTION_TO_IMAGE, text_features=txt, captions=["a", "b", "c"], progress=False)


def test_int_keyed_dict_maps_references_through_its_keys_never_as_rows(tmp_path, feats):
    img, txt = feats
    # int keys, some inside the row range 0..3 (where a row-index reading would silently pick other images)
    keys = [2, 391895, 0, 3]
    d = {k: img[j][None, :] for j, k in enumerate(keys)}
    refs = [keys[i] for i in CAPTION_TO_IMAGE]
    cache = import_npy(tmp_path / "c", d, image_refs=refs, text_features=txt, dtype="float32", progress=False)
    assert cache.manifest["image_keys"] == keys
    torch.testing.assert_close(
        cache.embeddings(torch.arange(12))[0], F.normalize(torch.from_numpy(img[CAPTION_TO_IMAGE]), dim=1)
    )
    # a records file (or a .txt key list) may spell the int keys as strings, and the other way round
    c2 = import_npy(
        tmp_path / "c2",
        d,
        image_refs=[str(r) for r in refs],
        text_features=txt,
        image_keys=["0", "2", "3", "391895"],
        dtype="float32",
        progress=False,
    )
    assert c2.manifest["image_keys"] == [0, 2, 3, 391895]
    torch.testing.assert_close(c2.embeddings(torch.arange(12))[0], cache.embeddings(torch.arange(12))[0])
    s = {str(k): v for k, v in d.items()}
    c3 = import_npy(tmp_path / "c3", s, image_refs=refs, text_features=txt, dtype="float32", progress=False)
    torch.testing.assert_close(c3.embeddings(torch.arange(12))[0], cache.embeddings(torch.arange(12))[0])
    # 1 is a valid row number but no key: refused, naming the caption
    with pytest.raises(KeyError, match="caption 4 refers to image 1, which has no features"):
        import_npy(tmp_path / "bad", d, image_refs=refs[:4] + [1] + refs[5:], text_features=txt, progress=False)
    # caption_to_image stays an index (a position in the key order)
    c4 = import_npy(tmp_path / "c4", d, CAPTION_TO_IMAGE, text_features=txt, dtype="float32", progress=False)
    torch.testing.assert_close(c4.embeddings(torch.arange(12))[0], cache.embeddings(torch.arange(12))[0])
    with pytest.raises(ValueError, match="exactly one of caption_to_image .* and image_refs"):
        import_npy(tmp_path / "bad", d, CAPTION_TO_IMAGE, image_refs=refs, text_features=txt, progress=False)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_image_refs_with_a_plain_matrix_are_rows(tmp_path, feats):
    img, txt = feats
    cache = import_npy(
        tmp_path / "c", img, image_refs=CAPTION_TO_IMAGE, text_features=txt, dtype="float32", progress=False
    )
    torch.testing.assert_close(
        cache.embeddings(torch.arange(12))[0], F.normalize(torch.from_numpy(img[CAPTION_TO_IMAGE]), dim=1)
    )
    with pytest.raises(ValueError, match="caption 3 names image 'x' by key, but .* plain matrix indexed by row"):
        import_npy(
            tmp_path / "d", img, image_refs=[0, 0, 0, "x"] + CAPTION_TO_IMAGE[4:], text_features=txt, progress=False
        )
