"""``softalign train RECIPE``: train a recipe (optionally one or all of its variants) with the reference trainer.

Runs on Accelerate: ``accelerate launch -m softalign.cli train RECIPE`` for several GPUs; mixed precision via
``--mixed-precision`` (or the recipe's ``train.mixed_precision``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a YAML recipe (reference dual-encoder trainer on Accelerate)",
        description="Train a recipe from recipes/*.yaml. Checkpoints (accelerate's save_state) go to "
        "OUTPUT_DIR/checkpoints/ after every epoch; rerunning resumes from the last one. Metrics: "
        "OUTPUT_DIR/metrics.jsonl, results.json; test embeddings: "
        "OUTPUT_DIR/embeddings_test.safetensors (for `softalign eval --embeddings`).",
    )
    p.add_argument(
        "recipe",
        help="path of a YAML recipe, or the name of a packaged one (demo, coco_clip_vitb32, "
        "flickr30k_vsepp_precomp, ...: softalign/recipes/)",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="apply one of the recipe's variants (e.g. base, csa_usa, cmc), trained into "
        "OUTPUT_DIR/<variant>; 'all' trains each variant in turn",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=2 --set optim.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="override output_dir (a variant trains into OUTPUT_DIR/<variant>, sharing OUTPUT_DIR/teacher_cache)",
    )
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--list-variants",
        action="store_true",
        help="print the recipe's variants with the loss weights each trains with, and exit",
    )
    p.add_argument(
        "--report-to",
        choices=("none", "tensorboard", "wandb", "all"),
        default="none",
        help="also log the metrics to TensorBoard and/or Weights & Biases (accelerate's trackers; one run "
        "per variant, named after it, under OUTPUT_DIR). metrics.jsonl is always written",
    )
    p.set_defaults(func=run)
    return p


def _overrides(args):
    ov = list(args.overrides)
    if args.seed is not None:
        ov.append(f"seed={args.seed}")
    if args.mixed_precision is not None:
        ov.append(f"train.mixed_precision={args.mixed_precision}")
    if args.cpu:
        ov.append("train.cpu=true")
    if args.no_progress:
        ov.append("train.progress=false")
    return ov


def _variant_line(args, variant: str) -> str:
    """``name  base=..., alpha=..., beta=..., gamma=...``: the loss a variant trains, weights resolved."""
    from softalign.train.recipe import load_recipe

    loss = load_recipe(args.recipe, variant=variant, overrides=_overrides(args)).loss
    return f"{variant:<24} base={loss.base}, alpha={loss.alpha:g}, beta={loss.beta:g}, gamma={loss.gamma:g}"


def _trackers(report_to: str) -> list[str]:
    """accelerate's tracker names for ``--report-to``; a tracker whose package is missing is a one-line error."""
    import importlib.util

    names = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[
        report_to
    ]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise SystemExit(f"softalign train: --report-to {report_to} needs the {name} package: pip install {name}")
    return names


def run(args) -> int:
    from softalign.train.recipe import RecipeError, list_variants, load_recipe

    try:
        variants = list_variants(args.recipe)
        if args.list_variants:
            print("\n".join(_variant_line(args, v) for v in variants) if variants else "(no variants)")
            return 0
        names = variants if args.variant == "all" else [args.variant]
        if args.variant == "all" and not variants:
            raise RecipeError(f"{args.recipe} defines no variants")
        recipes = []
        base = [f"output_dir={args.output_dir}"] if args.output_dir else []
        for v in names:
            recipes.append(load_recipe(args.recipe, variant=v, overrides=_overrides(args), base_overrides=base))
    except (RecipeError, FileNotFoundError) as err:
        raise SystemExit(f"softalign train: {err}")

    from accelerate import Accelerator

    from softalign.train.trainer import train

    first = recipes[0]
    trackers = _trackers(args.report_to)
    root = args.output_dir or (Path(first.output_dir).parent if first.variant else Path(first.output_dir))
    accelerator = Accelerator(
        mixed_precision=first.train.mixed_precision,
        cpu=first.train.cpu,
        log_with=trackers or None,
        project_dir=str(root),
    )
    from softalign.teachers.cache import CacheMismatchError
    from softalign.train.trainer import ResumeMismatchError

    for recipe in recipes:
        try:
            result = train(recipe, resume=not args.no_resume, accelerator=accelerator)
        except (ResumeMismatchError, CacheMismatchError) as err:
            raise SystemExit(f"softalign train: {recipe.name}: {err}")
        if accelerator.is_main_process:
            m = result["metrics"]
            shown = ", ".join(f"{k} {m[k]:.2f}" for k in ("i2t_r1", "t2i_r1", "rsum") if k in m)
            print(f"{recipe.name}: {shown} ({result['seconds']:.0f}s) -> {result['output_dir']}")
    return 0
