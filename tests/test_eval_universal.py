"""Universal retrieval as CUSA evaluates it: STS (Spearman of cosine similarity, through sentence-transformers'
EmbeddingSimilarityEvaluator) for text towers, DML R@1 for images, one report for a model's USA heads and its joint
space side by side."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from softalign.cli import main
from softalign.eval.sts import load_sts, sts_metrics
from tests.test_encode import _sop, train_tiny_run

PAIRS = [
    ("a red car", "a crimson automobile", 4.6),
    ("a red car", "a bowl of soup", 0.2),
    ("two dogs play", "puppies playing together", 4.1),
    ("a man rides a bike", "a person cycling", 4.4),
    ("a man rides a bike", "the stock market fell", 0.0),
    ("sunset over the sea", "the sun sets on the ocean", 4.8),
    ("a cat sleeps", "a kitten is napping", 4.0),
    ("a cat sleeps", "a truck on a highway", 0.4),
    ("children in a park", "kids playing outside", 3.9),
    ("a plate of pasta", "spaghetti on a dish", 4.2),
]


def _sts_file(path, rows=PAIRS, columns=("sentence1", "sentence2", "score")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return str(path)


def test_sts_spearman_of_the_packaged_minilm_equals_scipys(tmp_path):
    from sentence_transformers import SentenceTransformer

    from softalign.teachers.packaged import offline_minilm_path

    model = SentenceTransformer(offline_minilm_path(), device="cpu")
    sts = load_sts(_sts_file(tmp_path / "sts.csv"))
    got = sts_metrics(lambda s: model.encode(list(s), convert_to_tensor=True), sts, batch_size=4)
    a = model.encode(sts.sentences1, convert_to_numpy=True)
    b = model.encode(sts.sentences2, convert_to_numpy=True)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert got["spearman"] == pytest.approx(100 * spearmanr(cos, sts.scores).statistic, abs=1e-6)
    assert got["pearson"] == pytest.approx(100 * pearsonr(cos, sts.scores).statistic, abs=1e-4)
    assert got["spearman"] > 30  # positive: a sentence model ranks paraphrases above unrelated pairs
    # the same columns from a .tsv and a .jsonl
    (tmp_path / "sts.tsv").write_text(
        "sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS)
    )
    (tmp_path / "sts.jsonl").write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in PAIRS)
    )
    for f in ("sts.tsv", "sts.jsonl"):
        assert load_sts(str(tmp_path / f)).scores == sts.scores


def test_bad_sts_inputs_name_the_file_and_the_column(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--sts \S*missing.csv: file not found"):
        load_sts(str(tmp_path / "missing.csv"))
    with pytest.raises(
        ValueError,
        match=r"missing column\(s\) \['sentence1'\]; it has \['sentence_a', 'sentence2', "
        r"'score'\]",
    ):
        load_sts(_sts_file(tmp_path / "cols.csv", columns=("sentence_a", "sentence2", "score")))
    bad = list(PAIRS)
    bad[2] = ("x", "y", "high")
    with pytest.raises(ValueError, match=r"--sts \S*bad.csv: row 2: column 'score' is 'high', not a number"):
        load_sts(_sts_file(tmp_path / "bad.csv", rows=bad))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"--sts \S*empty.csv: the file is empty"):
        load_sts(str(tmp_path / "empty.csv"))
    with pytest.raises(ValueError, match=r"every score is 1.0; a correlation needs scores that differ"):
        load_sts(_sts_file(tmp_path / "flat.csv", rows=[(a, b, 1.0) for a, b, _ in PAIRS]))


def test_universal_report_of_a_softalign_run_puts_usa_heads_and_the_joint_space_side_by_side(tmp_path):
    from softalign.commands.encoders import encode_images, load_encoders
    from softalign.data.dml import load_dml_benchmark
    from softalign.eval.unimodal import unimodal_retrieval

    train_tiny_run(tmp_path / "run")  # with USA heads
    _sop(tmp_path / "sop")
    root = tmp_path / "sop" / "Stanford_Online_Products"
    sts = _sts_file(tmp_path / "mini_sts.csv")
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "run"),
                "--universal",
                "--dml",
                f"sop={root}",
                "--sts",
                sts,
                "--no-progress",
                "--out",
                str(tmp_path / "u"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "u" / "universal.json").read_text())
    assert set(report["columns"]) == {"uni", "cross"}
    bench = load_dml_benchmark("sop", root)
    for heads, m in report["columns"].items():
        image_enc, text_enc = load_encoders(str(tmp_path / "run"), heads=heads, device="cpu")
        emb = encode_images(image_enc, bench.paths, progress=False)
        assert m["dml_sop_r1"] == pytest.approx(unimodal_retrieval(emb, bench.labels)["recall_at_1"])
        assert m["sts_mini_sts_spearman"] == pytest.approx(sts_metrics(text_enc, load_sts(sts))["spearman"])
        assert m["mean"] == pytest.approx((m["dml_mean_r1"] + m["sts_mean_spearman"]) / 2)
    assert (
        report["columns"]["uni"]["dml_sop_r1"] != report["columns"]["cross"]["dml_sop_r1"]
        or report["columns"]["uni"]["sts_mini_sts_spearman"] != report["columns"]["cross"]["sts_mini_sts_spearman"]
    )
    md = (tmp_path / "u" / "universal.md").read_text()
    assert "USA heads (uni)" in md and "joint space (cross)" in md and "dml_sop_r1" in md
    assert (tmp_path / "u" / "universal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_universal_report_of_a_sentence_transformers_model_and_its_errors(tmp_path, capsys):
    sts = _sts_file(tmp_path / "s.csv")
    assert (
        main(
            [
                "eval",
                "--model",
                "st:offline-minilm",
                "--universal",
                "--sts",
                sts,
                "--no-plot",
                "--no-progress",
                "--out",
                str(tmp_path / "st"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "st" / "universal.json").read_text())
    assert list(report["columns"]) == ["model"] and report["columns"]["model"]["sts_s_spearman"] > 30
    capsys.readouterr()
    assert main(["eval", "--model", "st:offline-minilm", "--sts", sts, "--out", str(tmp_path / "x")]) == 1
    assert "--dml / --sts are the inputs of the universal report: add --universal" in capsys.readouterr().err
    assert (
        main(["eval", "--model", "st:offline-minilm", "--universal", "--dml", "sopp=/x", "--out", str(tmp_path / "y")])
        == 1
    )
    assert "--dml 'sopp=/x': unknown benchmark 'sopp'" in capsys.readouterr().err
