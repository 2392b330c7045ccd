"""Deep-metric-learning benchmark loaders on tiny synthetic copies of each data set's own layout."""

from __future__ import annotations

import numpy as np
import pytest

from softalign.data.dml import BENCHMARKS, load_dml_benchmark


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpg")


def test_cub_keeps_classes_101_to_200(tmp_path):
    base = tmp_path / "CUB_200_2011"
    base.mkdir()
    rows = [
        (1, "001.Black_footed_Albatross/a.jpg", 1),
        (2, "101.White_Pelican/b.jpg", 101),
        (3, "101.White_Pelican/c.jpg", 101),
        (4, "200.Common_Yellowthroat/d.jpg", 200),
    ]
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c in rows))
    for _, p, _ in rows:
        _touch(base / "images" / p)
    b = load_dml_benchmark("cub", tmp_path, check_files=True)
    assert [p.rsplit("/", 1)[1] for p in b.paths] == ["b.jpg", "c.jpg", "d.jpg"]
    assert b.labels.tolist() == [0, 0, 1] and b.query is None
    (base / "image_class_labels.txt").write_text("9 150\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt, line 1: image 9 is not in images.txt"):
        load_dml_benchmark("cub", tmp_path)


def test_cars_keeps_classes_99_to_196_from_the_mat_file(tmp_path):
    from scipy.io import savemat

    annos = np.zeros(4, dtype=[("relative_im_path", object), ("class", np.int32), ("test", np.int32)])
    for k, (p, c) in enumerate(
        [
            ("car_ims/000001.jpg", 1),
            ("car_ims/000002.jpg", 98),
            ("car_ims/000003.jpg", 99),
            ("car_ims/000004.jpg", 196),
        ]
    ):
        annos[k] = (p, c, 0)
    savemat(str(tmp_path / "cars_annos.mat"), {"annotations": annos})
    b = load_dml_benchmark("cars", tmp_path)
    assert [p.rsplit("/", 1)[1] for p in b.paths] == ["000003.jpg", "000004.jpg"] and b.labels.tolist() == [0, 1]


def test_sop_reads_ebay_test(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    base.mkdir()
    (base / "Ebay_test.txt").write_text(
        "image_id class_id super_class_id path\n"
        "1 11319 1 bicycle_final/111085122871_0.JPG\n"
        "2 11319 1 bicycle_final/111085122871_1.JPG\n"
        "3 11320 1 bicycle_final/111265328556_0.JPG\n"
    )
    b = load_dml_benchmark("sop", tmp_path)
    assert b.labels.tolist() == [0, 0, 1] and b.paths[2].endswith("bicycle_final/111265328556_0.JPG")
    (base / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 2\n")
    with pytest.raises(ValueError, match=r"Ebay_test.txt, line 2: expected 4 fields"):
        load_dml_benchmark("sop", tmp_path)


def test_inshop_splits_query_and_gallery(tmp_path):
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Img").mkdir()
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "query"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "gallery"),
        ("img/MEN/Shirts/id_00000007/07_1_front.jpg", "id_00000007", "train"),
        ("img/MEN/Shirts/id_00000008/08_1_front.jpg", "id_00000008", "gallery"),
    ]
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a} {b} {c}\n" for a, b, c in rows)
    )
    b = load_dml_benchmark("inshop", tmp_path)
    assert b.query.tolist() == [0] and b.gallery.tolist() == [1, 2] and b.labels.tolist() == [0, 0, 1]
    assert b.paths[0].endswith("Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg")
    # ready for query-vs-gallery retrieval: the query's item is the first gallery image
    from softalign.eval import unimodal_retrieval

    emb = np.eye(3, dtype=np.float32)[[0, 0, 2]]
    m = unimodal_retrieval(emb[b.query], b.labels[b.query], gallery=emb[b.gallery], gallery_labels=b.labels[b.gallery])
    assert m["precision_at_1"] == pytest.approx(100.0)  # percent, as every softalign metric


def test_inaturalist_labels_are_species_folders(tmp_path):
    (tmp_path / "Inat_dataset_splits").mkdir()
    (tmp_path / "Inat_dataset_splits" / "Inaturalist_test_set1.txt").write_text(
        "train_val2018/Plantae/7325/a.jpg\ntrain_val2018/Plantae/7325/b.jpg\ntrain_val2018/Aves/3001/c.jpg\n"
    )
    b = load_dml_benchmark("inaturalist", tmp_path)
    assert b.labels.tolist() == [0, 0, 1] and b.paths[2].endswith("Aves/3001/c.jpg")


def test_bad_names_roots_and_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown benchmark 'mnist'; expected one of \['cub'"):
        load_dml_benchmark("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_dml_benchmark("cub", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"benchmark file not found: .*Ebay_test.txt"):
        load_dml_benchmark("sop", tmp_path)
    assert set(BENCHMARKS) == {"cub", "cars", "sop", "inshop", "inaturalist"}
