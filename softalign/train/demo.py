"""``softalign demo``: the offline end-to-end demo on packaged data, on CPU in minutes.

1. builds the Twemoji demo set (:mod:`softalign.data.demo`: emoji images, generated captions, categories);
2. builds the teacher-similarity cache once (packaged all-MiniLM-L6-v2 + EfficientNet-Lite0) under the run
   directory (reused when it matches the demo set and the teachers, rebuilt when stale);
3. trains the recipe's ``base`` (InfoNCE), ``csa_usa`` (+ CUSA's CSA alpha=0.1 and USA beta=0.5, CUSA's
   temperatures) and ``csa_usa_sharp`` (the same with soft-label temperature 0.1 instead of CUSA's 1.0) variants of a
   small from-scratch student for each seed (a finished run is reused when the resolved recipe stored in its
   ``results.json`` equals the current one: rerunning only redoes what is missing or changed);
4. evaluates cross-modal (i2t / t2i R@1/5/10, rsum) and uni-modal (i2i / t2t precision@1, MAP@R with the emoji
   categories as labels; on the USA heads' outputs where the variant has them, and as ``(xm)`` rows on the
   cross-modal embeddings of every variant) retrieval on the held-out images, prints a markdown table (mean +- std over seeds) and
   saves ``results.json``, ``results.md`` and plots (``metrics.png``, ``train_loss.png``, ``recall_at_k.png``) in the
   run directory.

Emoji art: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
VARIANTS = {"base": "base", "csa_usa": "+CUSA", "csa_usa_sharp": "+CUSA (tau_s 0.1)", "cmc": "+CMC"}
TABLE_METRICS = (
    ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
    ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10"), ("rsum", "rsum"),
    ("i2i_precision_at_1", "i2i P@1"), ("i2i_map_at_r", "i2i MAP@R"),
    ("t2t_precision_at_1", "t2t P@1"), ("t2t_map_at_r", "t2t MAP@R"),
    ("i2i_xm_precision_at_1", "i2i P@1 (xm)"), ("i2i_xm_map_at_r", "i2i MAP@R (xm)"),
    ("t2t_xm_precision_at_1", "t2t P@1 (xm)"), ("t2t_xm_map_at_r", "t2t MAP@R (xm)"),
)


# Used when the package is installed without the repository's recipes/ folder; kept equal to recipes/demo.yaml
# (tests/test_demo_*.py checks it).
DEMO_RECIPE_DICT = {
    "name": "demo", "seed": 0, "output_dir": "runs/demo",
    "data": {"kind": "demo", "captions_per_image": 5, "max_images": 1000, "test_fraction": 0.2, "image_size": 32,
             "preload": True, "sample": "images"},
    "model": {"image_encoder": "small_cnn", "text_encoder": "gru", "embed_dim": 256, "word_dim": 128,
              "cnn_width": 16},
    "teacher": {"text": "offline-minilm", "image": "offline-efficientnet-lite0"},
    "loss": {"base": "infonce", "temperature": 0.05, "infonce_reduction": "mean", "alpha": 0.0, "beta": 0.0},
    "optim": {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0001, "schedule": "cosine", "min_lr": 0.00002,
              "grad_clip": 2.0},
    "train": {"epochs": 12, "batch_size": 128, "eval_every": 0},
    "variants": {"base": {}, "csa_usa": {"loss": {"alpha": 0.1, "beta": 0.5}},
                 "csa_usa_sharp": {"loss": {"alpha": 0.1, "beta": 0.5, "teacher_temperature": 0.1}},
                 "cmc": {"loss": {"gamma": 1.0}}},
}


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="offline demo: teacher cache -> train base and +CUSA on Twemoji -> evaluate (CPU, minutes)",
        description="Builds the Twemoji demo set and its teacher cache, trains base and +CUSA students, evaluates "
                    "cross-modal and uni-modal retrieval and prints a table. Emoji art: Twemoji by Twitter, Inc "
                    "and other contributors, CC-BY 4.0.")
    p.add_argument("--out", default="runs/demo", help="run directory (teacher cache, runs, table, plots)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds; the table shows mean ± std over them (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=["base", "csa_usa", "csa_usa_sharp"], choices=sorted(VARIANTS),
                   help="recipe variants to compare (first = baseline)")
    p.add_argument("--recipe", default=None, help="demo recipe YAML (default: recipes/demo.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--max-images", type=int, default=None, help="override data.max_images (smaller = faster)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe value (repeatable)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a finished run exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def demo_recipe(path=None, variant=None, overrides: Sequence[str] = ()):
    from softalign.train.recipe import load_recipe, recipe_from_dict

    path = Path(path) if path else DEMO_RECIPE
    if path.is_file():
        return load_recipe(path, variant=variant, overrides=overrides)
    return recipe_from_dict(DEMO_RECIPE_DICT, variant=variant, overrides=overrides)


def mean_std(values: Sequence[float]):
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summary_table(per_variant: Dict[str, List[dict]], variants: Sequence[str]) -> str:
    """Markdown: one row per metric, one column per variant (mean ± std over seeds), then for every variant after
    the first (the baseline) the paired difference to it (mean ± std over seeds)."""
    n = len(next(iter(per_variant.values())))
    heads = [VARIANTS.get(v, v) for v in variants]
    deltas = list(variants[1:])
    lines = [f"| metric (test, {n} seed{'s' if n > 1 else ''}) | " + " | ".join(heads)
             + "".join(f" | {VARIANTS.get(v, v)} - {heads[0]}" for v in deltas) + " |",
             "|---|" + "---:|" * (len(heads) + len(deltas))]
    for key, label in TABLE_METRICS:
        if not all(key in r["metrics"] for v in variants for r in per_variant[v]):
            continue
        cells = []
        for v in variants:
            m, s = mean_std([r["metrics"][key] for r in per_variant[v]])
            cells.append(f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}")
        for v in deltas:
            diffs = [a["metrics"][key] - b["metrics"][key]
                     for a, b in zip(per_variant[v], per_variant[variants[0]])]
            dm, ds = mean_std(diffs)
            cells.append(f"{dm:+.2f} ± {ds:.2f}" if n > 1 else f"{dm:+.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_plots(per_variant: Dict[str, List[dict]], variants: Sequence[str], out: Path) -> List[str]:
    """``metrics.png`` (bars, mean ± std over seeds), ``train_loss.png`` (per-epoch training loss of the base
    term) and ``recall_at_k.png`` (i2t / t2i R@K of each variant, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    keys = [(k, lab) for k, lab in TABLE_METRICS if k != "rsum"
            and all(k in r["metrics"] for v in variants for r in per_variant[v])]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    width = 0.8 / len(variants)
    x = np.arange(len(keys))
    for j, v in enumerate(variants):
        stats = [mean_std([r["metrics"][k] for r in per_variant[v]]) for k, _ in keys]
        ax.bar(x + (j - (len(variants) - 1) / 2) * width, [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=3, label=VARIANTS.get(v, v))
    ax.set_xticks(x, [lab for _, lab in keys], rotation=30, ha="right")
    ax.set_ylabel("% (test split)")
    ax.set_title("softalign demo (Twemoji): " + " vs ".join(VARIANTS.get(v, v) for v in variants))
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.text(0.99, 0.01, "Emoji art: Twemoji (Twitter, Inc and contributors), CC-BY 4.0", ha="right", fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "metrics.png"))

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for v in variants:
        for i, r in enumerate(per_variant[v]):
            hist = r.get("history") or []
            key = "train_base" if any("train_base" in h for h in hist) else "train_loss"
            ax.plot([h["epoch"] for h in hist], [h.get(key, float("nan")) for h in hist],
                    color=f"C{variants.index(v)}", alpha=0.8, label=f"{VARIANTS.get(v, v)}" if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("base (InfoNCE) loss, training")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out / "train_loss.png"))

    from softalign.eval import plot_recall_at_k

    mean_runs = {VARIANTS.get(v, v): {k: mean_std([r["metrics"][k] for r in per_variant[v]])[0]
                                      for k in per_variant[v][0]["metrics"]} for v in variants}
    paths.append(plot_recall_at_k(mean_runs, str(out / "recall_at_k.png"), "Recall@K (mean over seeds)"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    from softalign.teachers.storage import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return str(path)


def reusable_result(results_path: Path, recipe) -> "tuple[dict | None, str]":
    """``(results, "")`` when ``results_path`` holds a finished run of exactly ``recipe`` (the resolved recipe
    stored in it equals ``recipe`` except in :data:`softalign.train.trainer.RESUME_MUTABLE` fields other than
    ``train.epochs``), else ``(None, why not)``."""
    from softalign.train.trainer import RESUME_MUTABLE, recipe_differences

    try:
        res = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"unreadable ({err})"
    if not res.get("metrics") or len(res.get("history", [])) != recipe.train.epochs:
        return None, "unfinished"
    diff = recipe_differences(res.get("recipe"), recipe, ignore=RESUME_MUTABLE - {"train.epochs"})
    if diff:
        return None, "trained with a different recipe (" + ", ".join(diff) + ")"
    return res, ""


def run(args) -> int:
    from accelerate import Accelerator

    from softalign.data.demo import TWEMOJI_CREDIT
    from softalign.data.pairs import ImageTransform, preload_images
    from softalign.train.recipe import RecipeError
    from softalign.train.trainer import ResumeMismatchError, get_teacher_cache, load_splits, train
    from softalign.teachers.storage import atomic_write_text as _atomic_text

    t0 = time.time()
    out = Path(args.out)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_images is not None:
        overrides.append(f"data.max_images={args.max_images}")
    if args.no_progress:
        overrides.append("train.progress=false")
    overrides.append(f"teacher.cache_dir={out / 'teacher_cache'}")
    overrides.append("teacher.rebuild_on_mismatch=true")  # the demo owns its cache: rebuild it when stale
    try:
        recipes = {(v, s): demo_recipe(args.recipe, v, overrides + [f"seed={s}", f"output_dir={out / f'seed{s}' / v}"])
                   for s in args.seeds for v in args.variants}
    except (RecipeError, FileNotFoundError) as err:
        raise SystemExit(f"softalign demo: {err}")
    print(f"softalign demo -> {out}\n{TWEMOJI_CREDIT}")
    first = next(iter(recipes.values()))
    accelerator = Accelerator(mixed_precision=first.train.mixed_precision, cpu=first.train.cpu)
    train_data, test_data = load_splits(first)
    print(f"demo set: train {train_data.num_images} images / {train_data.num_captions} captions, test "
          f"{test_data.num_images} images / {test_data.num_captions} captions, {len(train_data.label_names)} "
          f"categories ({time.time() - t0:.0f}s)")
    t_cache = time.time()
    cache = get_teacher_cache(first, train_data)
    print(f"teacher cache: {cache.num_captions} captions, {cache.num_images} images ({time.time() - t_cache:.0f}s)")
    tf = ImageTransform(first.data.image_size)
    image_caches = {"train": preload_images(train_data, tf), "test": preload_images(test_data, tf)}

    per_variant: Dict[str, List[dict]] = {v: [] for v in args.variants}
    for s in args.seeds:
        for v in args.variants:
            recipe = recipes[(v, s)]
            results = Path(recipe.output_dir) / "results.json"
            if results.is_file() and not args.fresh:
                res, why = reusable_result(results, recipe)
                if res is not None:
                    print(f"seed {s} {v}: reusing {results}")
                    per_variant[v].append(res)
                    continue
                print(f"seed {s} {v}: not reusing {results}: {why}")
            kw = dict(accelerator=accelerator, train_data=train_data, test_data=test_data,
                      cache=cache if v != "base" else None, image_caches=image_caches)
            try:
                res = train(recipe, resume=not args.fresh, **kw)
            except ResumeMismatchError as err:
                print(f"seed {s} {v}: retraining from scratch: {err}")
                res = train(recipe, resume=False, **kw)
            m = res["metrics"]
            print(f"seed {s} {VARIANTS.get(v, v)}: rsum {m['rsum']:.2f}, i2i P@1 {m.get('i2i_precision_at_1', 0):.2f},"
                  f" t2t P@1 {m.get('t2t_precision_at_1', 0):.2f} ({res['seconds']:.0f}s)")
            per_variant[v].append(res)

    table = summary_table(per_variant, args.variants)
    plots = save_plots(per_variant, args.variants, out)
    wall = time.time() - t0
    md = (f"# softalign demo (Twemoji)\n\n{table}\nSeeds: {list(args.seeds)}; test split: {test_data.num_images} "
          f"held-out images, {test_data.num_captions} captions; uni-modal labels: emoji category. "
          f"Wall time: {wall:.0f}s.\n\n{TWEMOJI_CREDIT}.\n")
    summary = {"seeds": list(args.seeds), "variants": list(args.variants), "wall_seconds": round(wall, 1),
               "credit": TWEMOJI_CREDIT,
               "runs": {v: [{"seed": r["seed"], "metrics": r["metrics"], "output_dir": r["output_dir"]}
                            for r in per_variant[v]] for v in args.variants},
               "mean_std": {v: {k: mean_std([r["metrics"][k] for r in per_variant[v]])
                                for k in per_variant[v][0]["metrics"]} for v in args.variants},
               "plots": plots}
    _atomic_text(out / "results.md", md)
    _atomic_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    print("\n" + table)
    print(f"plots: {', '.join(plots)}\ntable: {out / 'results.md'}\nwall time: {wall:.0f}s\n{TWEMOJI_CREDIT}")
    return 0
