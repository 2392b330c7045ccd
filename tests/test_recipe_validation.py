"""Recipe schema: the shipped recipes load, unknown keys / wrong types / bad values give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from softalign.train.recipe import RecipeError, list_variants, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {
        "demo",
        "flickr30k_clip_vitb32",
        "coco_clip_vitb32",
        "flickr30k_vsepp_precomp",
        "coco_vsepp_precomp",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_and_variant_validates(path):
    variants = list_variants(path)
    assert {"base", "csa_usa", "cmc"} <= set(variants)
    base, cusa, cmc = (load_recipe(path, variant=v) for v in ("base", "csa_usa", "cmc"))
    assert (base.loss.alpha, base.loss.beta, base.loss.gamma) == (0, 0, 0)
    if cusa.loss.base == "infonce":
        assert (cusa.loss.alpha, cusa.loss.beta) == (0.1, 0.5)  # CUSA's rates (with its InfoNCE mean mode)
    else:  # a hinge base: softalign's defaults for it
        from softalign.losses.combined import DEFAULT_WEIGHTS

        assert (cusa.loss.alpha, cusa.loss.beta) == DEFAULT_WEIGHTS[cusa.loss.base]
    assert cmc.loss.gamma > 0
    assert cusa.name.endswith("-csa_usa") and cusa.variant == "csa_usa"


@pytest.mark.parametrize(
    "name,epochs,batch",
    [
        ("flickr30k_clip_vitb32", 40, 128),
        ("coco_clip_vitb32", 30, 128),
        ("flickr30k_clip_vitl14_336", 40, 16),
        ("coco_clip_vitl14_336", 30, 16),
    ],
)
def test_clip_recipes_follow_the_cusa_configs(name, epochs, batch):
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml", variant="csa_usa")
    assert (r.train.epochs, r.train.batch_size) == (epochs, batch)
    assert r.loss.base == "infonce" and r.loss.temperature == 0.05
    assert r.loss.infonce_reduction == "cusa_mean"  # CUSA's contrastive_loss_mode "mean", the scale of its 0.1 / 0.5
    assert (r.loss.csa_mode, r.loss.csa_temperature, r.loss.usa_temperature, r.loss.teacher_temperature) == (
        "each",
        0.45,
        0.45,
        1.0,
    )
    assert (r.optim.optimizer, r.optim.lr, r.optim.weight_decay, r.optim.schedule, r.optim.min_lr) == (
        "adamw",
        1e-5,
        1e-4,
        "cosine",
        1e-6,
    )


def test_vsepp_recipe_hyper_parameters():
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "flickr30k_vsepp_precomp.yaml")
    assert (r.loss.base, r.loss.margin, r.optim.lr, r.optim.lr_decay_epoch, r.train.epochs) == (
        "vsepp",
        0.2,
        2e-4,
        15,
        30,
    )


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(RecipeError, match=r"unknown key 'loss\.alpah'.*allowed keys in loss: base, alpha, beta"):
        recipe_from_dict({"loss": {"alpah": 0.1}})
    with pytest.raises(RecipeError, match=r"unknown key 'epochs'.*allowed keys: name, seed"):
        recipe_from_dict({"epochs": 3})


def test_unknown_key_in_an_unused_variant_is_reported():
    with pytest.raises(RecipeError, match=r"in variant 'cusa': unknown key 'loss\.bta'"):
        recipe_from_dict({"variants": {"cusa": {"loss": {"bta": 0.5}}}})


@pytest.mark.parametrize(
    "values,match",
    [
        ({"train": {"epochs": "3"}}, r"train\.epochs: expected an integer, got '3'"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs: expected an integer"),
        ({"loss": {"alpha": "high"}}, r"loss\.alpha: expected a number or null \(the default\), got 'high'"),
        ({"train": {"progress": "yes"}}, r"train\.progress: expected a boolean"),
        ({"loss": {"base": "triplet"}}, r"loss\.base: expected one of 'vsepp', 'vsepp_sum', 'infonce', 'none'"),
        ({"data": ["demo"]}, r"data: expected a mapping of DataConfig options"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be >= 1"),
        ({"loss": {"beta": -1}}, r"loss\.beta must be >= 0"),
        ({"data": {"kind": "karpathy"}}, r"data\.path is required for data\.kind='karpathy'"),
        ({"data": {"kind": "precomp", "path": "x"}}, r"set model\.image_encoder: precomp"),
        (
            {"model": {"image_encoder": "resnet"}},
            r"model\.image_encoder: expected 'small_cnn', 'precomp', 'timm:<model "
            r"name>' or 'open_clip:<arch>\[/<pretrained>\]', got 'resnet'",
        ),
        (
            {"model": {"image_encoder": "open_clip:ViT-B-32"}},
            r"set model\.image_encoder: open_clip:<arch>.* together "
            r"with model\.text_encoder: open_clip",
        ),
        (
            {"model": {"text_encoder": "open_clip"}},
            r"together with model\.text_encoder: open_clip \(got image_encoder "
            r"'small_cnn'",
        ),
        ({"optim": {"schedule_interval": "batch"}}, r"optim\.schedule_interval"),
    ],
)
def test_bad_values_give_clear_errors(values, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(values)


def test_variant_and_overrides_apply_in_order():
    r = recipe_from_dict(
        {"name": "x", "loss": {"alpha": 0.0}, "variants": {"v": {"loss": {"alpha": 0.1}}}},
        variant="v",
        overrides=["loss.alpha=0.3", "optim.lr=1e-3", "train.mixed_precision=bf16"],
    )
    assert r.loss.alpha == 0.3 and r.optim.lr == 1e-3 and r.train.mixed_precision == "bf16"
    with pytest.raises(RecipeError, match=r"unknown variant 'w'; the recipe defines: \['v'\]"):
        recipe_from_dict({"variants": {"v": {}}}, variant="w")
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        recipe_from_dict({}, overrides=["train.epochs"])
    with pytest.raises(RecipeError, match=r"unknown key 'train\.epoch'"):
        recipe_from_dict({}, overrides=["train.epoch=2"])


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 1e-5\n")  # PyYAML reads this as the string '1e-5'
    assert load_recipe(p).optim.lr == 1e-5
    p.write_text("optim: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "none.yaml")


def test_cli_lists_variants_and_reports_recipe_errors(tmp_path, capsys):
    from softalign.cli import main

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    assert main(["train", str(demo), "--list-variants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["base", "cmc", "csa_usa", "csa_usa_tau1"]
    assert lines[2].split(maxsplit=1)[1] == "base=infonce, alpha=0.1, beta=0.5, gamma=0"  # the resolved weights
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alpah: 1\n")
    with pytest.raises(SystemExit, match=r"unknown key 'loss\.alpah'"):
        main(["train", str(bad)])


def test_variants_train_into_their_own_folder_and_share_the_teacher_cache():
    values = {"output_dir": "runs/x", "variants": {"a": {}, "b": {"output_dir": "elsewhere"}}}
    a = recipe_from_dict(values, variant="a")
    assert a.output_dir == "runs/x/a" and a.teacher.cache_dir == "runs/x/teacher_cache"
    assert recipe_from_dict(values, variant="b").output_dir == "elsewhere"
    moved = recipe_from_dict(values, variant="a", base_overrides=["output_dir=/tmp/y"])
    assert moved.output_dir == "/tmp/y/a" and moved.teacher.cache_dir == "/tmp/y/teacher_cache"
    own = recipe_from_dict({**values, "teacher": {"cache_dir": "c"}}, variant="a")
    assert own.teacher.cache_dir == "c"
    assert recipe_from_dict(values).output_dir == "runs/x"


def test_loss_section_mirrors_the_soft_align_loss_options():
    import dataclasses
    import inspect

    from softalign.losses import SoftAlignLoss
    from softalign.train.recipe import LossConfig

    options = set(inspect.signature(SoftAlignLoss.__init__).parameters)
    kwargs = LossConfig().loss_kwargs()
    assert set(kwargs) <= options, sorted(set(kwargs) - options)
    assert {f.name for f in dataclasses.fields(LossConfig)} - set(kwargs) == {"use_heads"}
    for name, value in kwargs.items():  # the loss's defaults (base / margin: below; alpha / beta: resolved)
        if name not in ("base", "margin"):
            assert inspect.signature(SoftAlignLoss.__init__).parameters[name].default == value, name
    # the loss leaves base / margin unset (None) so that a shim can adopt a trainer's criterion; unset they resolve
    # to the recipe's defaults
    plain = SoftAlignLoss()
    assert (plain.base.margin, plain.base.max_violation) == (kwargs["margin"], kwargs["base"] == "vsepp")


def test_recipes_ship_as_package_data_and_load_by_name_from_anywhere(tmp_path, monkeypatch):
    from pathlib import Path

    from softalign.train.recipe import list_variants, packaged_recipes

    names = packaged_recipes()
    repo = Path(__file__).resolve().parents[1] / "recipes"
    assert names == sorted(p.stem for p in repo.glob("*.yaml")) and "demo" in names
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    for name in names:
        assert load_recipe(name).name and load_recipe(f"recipes/{name}.yaml").to_dict() == load_recipe(name).to_dict()
    assert "csa_usa" in list_variants("demo")
    with pytest.raises(FileNotFoundError, match=r"recipe not found: nope.yaml \(the packaged recipes are: .*demo"):
        load_recipe("nope.yaml")


@pytest.mark.parametrize(
    "loss,weights",
    [
        ({"base": "infonce"}, (10.0, 10.0)),
        ({"base": "infonce", "infonce_reduction": "cusa_mean"}, (0.1, 0.5)),
        ({}, (3.0, 3.0)),
        ({"base": "vsepp_sum", "beta": 0.0}, (10.0, 0.0)),
    ],
)
def test_unset_weights_take_the_losss_default_for_the_base(loss, weights):
    """A self-written recipe that leaves alpha / beta unset trains with the soft terms on, as SoftAlignLoss does."""
    from softalign.losses import SoftAlignLoss

    r = recipe_from_dict({"loss": loss, "variants": {"soft": {}}}, variant="soft")
    assert (r.loss.alpha, r.loss.beta) == weights
    built = SoftAlignLoss(**{k: v for k, v in loss.items() if k not in ("alpha", "beta")})
    if "beta" not in loss:
        assert (built.alpha, built.beta) == weights  # the same numbers the loss itself takes
    assert r.to_dict()["loss"]["alpha"] == weights[0]  # recipe.yaml and results.json show the resolved values


def test_a_variant_named_for_a_soft_term_that_switches_it_off_is_refused():
    values = {
        "loss": {"base": "infonce"},
        "variants": {"csa_usa": {"loss": {"alpha": 0.0, "beta": 0.0}}, "usa_only": {"loss": {"alpha": 0.0}}},
    }
    with pytest.raises(RecipeError, match=r"variant 'csa_usa' is named for CSA but trains with loss.alpha = 0.0"):
        recipe_from_dict(values, variant="csa_usa")
    assert recipe_from_dict(values, variant="usa_only").loss.beta == 10.0
