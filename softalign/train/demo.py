"""``softalign demo``: does +CUSA help a student on frozen pre-trained features? Offline, on CPU, in minutes.

1. **Data** (:func:`softalign.data.demo.build_demo_data`): Twemoji images, each with 3 captions from Unicode CLDR
   (the emoji's name, then phrasings of its keywords), split by image into train / validation (cut from train) /
   test. Uni-modal labels: the emoji sub-category (``face-smiling``, ``animal-bird``, ...).
2. **Student backbones, frozen**: EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (text) encode every split once
   (stored as feature tables); the student trains an MLP per modality on them plus CUSA's heads
   (:mod:`softalign.train.feature_student`).
3. **Teachers**: EfficientNet-Lite2 (images) and all-mpnet-base-v2 (text), a cache over the training split. No
   weights are shared between student and teacher; they are of the same families (ImageNet EfficientNet-Lite;
   sentence-transformers trained on the same sentence-pair data), so their features are not independent.
4. **Soft-label diagnostics** at CUSA's ``tau_s = 1`` and at the calibrated ``tau_s`` (entropy / log B, diagonal
   mass, same-sub-category share of the off-diagonal mass next to its chance level).
5. **Validation** (never the test split): the soft-label entropy target of the calibration is chosen among
   ``--targets`` by the mean validation rsum over the seeds.
6. **Test**: base (the loss with alpha = beta = 0) vs +CUSA with the library defaults, vs +CUSA with the
   validation choice (when it differs), vs +CUSA at CUSA's fixed ``tau_s = 1``; 3 seeds, paired differences.

Writes ``results.json``, ``results.md`` and plots (``metrics.png``, ``soft_labels.png``, ``validation.png``) in
the run directory. Emoji art: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STUDENT_BACKBONES = {"text": "offline-minilm", "image": "offline-efficientnet-lite0"}
TEACHERS = {"text": "offline-mpnet", "image": "offline-efficientnet-lite2"}
TABLE_METRICS = (
    ("i2t_r1", "i2t R@1"),
    ("i2t_r5", "i2t R@5"),
    ("t2i_r1", "t2i R@1"),
    ("t2i_r5", "t2i R@5"),
    ("rsum", "rsum"),
    ("i2i_precision_at_1", "i2i P@1"),
    ("i2i_map_at_r", "i2i MAP@R"),
    ("t2t_precision_at_1", "t2t P@1"),
    ("t2t_map_at_r", "t2t MAP@R"),
    ("i2i_xm_map_at_r", "i2i MAP@R (xm)"),
    ("t2t_xm_map_at_r", "t2t MAP@R (xm)"),
)


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="offline demo: frozen-feature student, base vs +CUSA, settings chosen on validation (CPU)",
        description="Twemoji + CLDR captions; student on frozen EfficientNet-Lite0 / MiniLM features, teachers "
        "EfficientNet-Lite2 / mpnet; the soft-label entropy target is chosen on a validation split cut "
        "from training; test: base vs +CUSA over seeds with paired differences. Emoji art: Twemoji by "
        "Twitter, Inc and other contributors, CC-BY 4.0.",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory (feature tables, teacher cache, results; default "
        "runs/demo, or runs/demo-text-layers-K with --text-layers K)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument(
        "--base",
        default="infonce",
        choices=["vsepp", "vsepp_sum", "infonce"],
        help="base loss of every variant (default: InfoNCE; VSE++'s max-violation hinge collapses on "
        "this student without soft labels)",
    )
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=[0.5, 0.7, 0.8, 0.9],
        help="soft-label entropy targets (fractions of log B) compared on the validation split",
    )
    p.add_argument(
        "--text-layers",
        type=int,
        default=0,
        metavar="K",
        help="trained-encoder regime: MiniLM's top K transformer layers train with the student "
        "(default 0: frozen features)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=5,
        help="validation folds of the training images; seed s validates on fold s mod FOLDS and trains "
        "on the others (default 5)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 30)")
    p.add_argument("--max-images", type=int, default=None, help="use an evenly spaced subset (faster)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def mean_std(values: Sequence[float]):
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summary_table(
    per_variant: dict[str, list[dict]], variants: Sequence[str], labels: dict[str, str], split: str = "test"
) -> str:
    """Markdown: a row per metric, a column per variant (mean ± std over seeds), then for every variant after the
    first (the baseline) the paired difference to it (mean ± std over seeds)."""
    n = len(per_variant[variants[0]])
    heads = [labels.get(v, v) for v in variants]
    lines = [
        f"| metric ({split}, {n} seed{'s' if n > 1 else ''}) | "
        + " | ".join(heads)
        + "".join(f" | {h} − {heads[0]}" for h in heads[1:])
        + " |",
        "|---|" + "---:|" * (2 * len(heads) - 1),
    ]
    for key, label in TABLE_METRICS:
        if not all(key in r["metrics"][split] for v in variants for r in per_variant[v]):
            continue
        cells = []
        for v in variants:
            m, s = mean_std([r["metrics"][split][key] for r in per_variant[v]])
            cells.append(f"{m:.2f} ± {s:.2f}")
        for v in variants[1:]:
            diffs = [
                a["metrics"][split][key] - b["metrics"][split][key]
                for a, b in zip(per_variant[v], per_variant[variants[0]])
            ]
            dm, ds = mean_std(diffs)
            cells.append(f"**{dm:+.2f}** ± {ds:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def soft_label_table(rows: list[dict]) -> str:
    lines = [
        "| teacher matrix | tau_s | entropy / log B | diagonal mass | same-label share (chance) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['matrix']} | {r['label']} = {r['tau']:.4g} | {r['entropy']:.3f} | "
            f"{r['diagonal_mass']:.3f} (1/B = {1 / r['batch_size']:.3f}) | "
            f"{r['same_label_mass']:.3f} ({r['same_label_chance']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def soft_label_diagnostics(
    cache, batch_size: int, targets: Sequence[float], image_labels=None, num_batches: int = 16, seed: int = 0
) -> list[dict]:
    """Soft-label statistics of the cache's teachers on training-size batches, at CUSA's ``tau_s = 1``, at a
    sharp fixed 0.1 and at the calibrated ``tau_s`` of each entropy target."""
    import torch

    from softalign import soft_labels as cal

    ids, t_img, t_txt = cal.cache_batches(cache, batch_size, num_batches, seed)
    c2i = torch.as_tensor(cache.caption_to_image).long()
    labels = None if image_labels is None else torch.as_tensor(image_labels).long()[c2i[ids]]
    rows = []
    for matrix, sims in (("image-image", t_img), ("text-text", t_txt)):
        taus = [("CUSA", 1.0), ("fixed", 0.1)] + [
            (f"calibrated H={t:g}", cal.calibrate_temperature(sims, t)) for t in targets
        ]
        for label, tau in taus:
            rows.append({"matrix": matrix, "label": label, **cal.soft_label_stats(sims, tau, labels)})
    return rows


def _cached_embeddings(path: Path, data, models: dict[str, str], progress: bool, dtype: str = "float16"):
    """A :class:`~softalign.teachers.TeacherCache` of ``data`` encoded by ``models`` (``{"text", "image"}``): loaded
    when one for the same data and models is there, else (re)built."""
    from softalign.teachers import TeacherCache

    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            return TeacherCache.load(
                path,
                expect_fingerprint=TeacherCache.fingerprint_of(data.captions, data.images, data.caption_to_image),
                expect_text_teacher=models["text"],
                expect_image_teacher=models["image"],
            )
        except ValueError:
            pass  # stale: rebuilt below
    return TeacherCache.build(
        path,
        data.captions,
        data.images,
        data.caption_to_image,
        text_teacher=models["text"],
        image_teacher=models["image"],
        dtype=dtype,
        progress=progress,
        overwrite=manifest.is_file(),
    )


def _feature_table(path: Path, data, progress: bool):
    """Frozen student-backbone features of a split (stored once as a table of embeddings)."""

    from softalign.train.feature_student import FeatureSplit

    table = _cached_embeddings(path, data, STUDENT_BACKBONES, progress, dtype="float32")
    img, txt = _all_embeddings(table)
    return FeatureSplit(img, txt, data)


def _all_embeddings(table):
    """``(image [N_images, D_i], text [N_captions, D_t])`` fp32 rows of an embeddings table, in split order."""
    import torch

    img = table.image_embeddings(torch.arange(table.num_images)).float()
    return img, table.embeddings(torch.arange(table.num_captions))[1].float()


def _teacher_cache(path: Path, data, progress: bool):
    return _cached_embeddings(path, data, TEACHERS, progress)


def _teacher_uni_modal(path: Path, data, progress: bool) -> dict[str, float]:
    """The teachers' own uni-modal retrieval on a split (their embeddings, the split's labels): the ceiling of what
    USA's heads learn from them."""
    import torch

    from softalign.eval.unimodal import uni_modal_metrics

    img, txt = _all_embeddings(_cached_embeddings(path, data, TEACHERS, progress))
    return uni_modal_metrics(img, txt, torch.as_tensor(data.image_labels), torch.as_tensor(data.text_labels))


#: the uni-modal rows of the "which embeddings" table
UNI_MODAL_ROWS = (
    ("i2i", "precision_at_1", "P@1"),
    ("i2i", "map_at_r", "MAP@R"),
    ("t2t", "precision_at_1", "P@1"),
    ("t2t", "map_at_r", "MAP@R"),
)


def uni_modal_choice(test_runs: dict[str, list[dict]], teacher: dict[str, float], variant: str = "cusa_default"):
    """``(markdown, advice)``: test uni-modal scores of the teachers, the base's joint space, and ``variant``'s USA
    heads and joint space (means over seeds); and, per modality, the embeddings to use for uni-modal retrieval,
    chosen by validation MAP@R (heads vs joint space of ``variant``), with what test then showed."""
    import numpy as np

    def mean(v, split, key):
        values = [r["metrics"][split].get(key) for r in test_runs[v]]
        return float(np.mean(values)) if values and None not in values else float("nan")

    def cell(x: float) -> str:
        return "-" if x != x else f"{x:.2f}"

    lines = [
        "| metric (test, mean of seeds) | teachers' own | base, joint space | +CUSA, USA heads | +CUSA, joint space |",
        "|---|---:|---:|---:|---:|",
    ]
    for mod, key, name in UNI_MODAL_ROWS:
        lines.append(
            f"| {mod} {name} | {cell(teacher.get(f'{mod}_{key}', float('nan')))} | "
            f"{cell(mean('base', 'test', f'{mod}_xm_{key}'))} | {cell(mean(variant, 'test', f'{mod}_{key}'))} "
            f"| {cell(mean(variant, 'test', f'{mod}_xm_{key}'))} |"
        )
    advice: dict[str, dict[str, Any]] = {}
    for mod, what in (("i2i", "image->image"), ("t2t", "text->text")):
        val = {
            "USA heads": mean(variant, "val", f"{mod}_map_at_r"),
            "joint space": mean(variant, "val", f"{mod}_xm_map_at_r"),
        }
        test = {
            "USA heads": mean(variant, "test", f"{mod}_map_at_r"),
            "joint space": mean(variant, "test", f"{mod}_xm_map_at_r"),
        }
        if any(x != x for x in val.values()):
            advice[mod] = {
                "use": None,
                "text": f"{what}: not chosen (the validation split has no label shared by two items)",
            }
            continue
        pick = max(val, key=lambda k: val[k])
        other = "joint space" if pick == "USA heads" else "USA heads"
        held = "test agrees" if test[pick] >= test[other] else "test disagrees"
        ceiling = teacher.get(f"{mod}_map_at_r", float("nan"))
        advice[mod] = {
            "use": pick,
            "validation_map_at_r": val,
            "test_map_at_r": test,
            "teacher_test_map_at_r": ceiling,
            "text": f"{what}: use the {pick} (validation MAP@R {val[pick]:.2f} vs {val[other]:.2f} for the "
            f"{other}; {held}: {test[pick]:.2f} vs {test[other]:.2f}; the teacher alone: "
            f"{cell(ceiling)})",
        }
    return "\n".join(lines) + "\n", advice


def save_plots(
    test_runs: dict[str, list[dict]],
    variants: Sequence[str],
    labels: dict[str, str],
    sweep: dict[str, list[dict]],
    diag: list[dict],
    out: Path,
    regime: str = "frozen-feature",
) -> list[str]:
    """``metrics.png`` (test metrics, mean ± std over seeds), ``validation.png`` (each setting's paired rsum gain
    over the base on validation, where it was chosen, next to test's) and ``soft_labels.png`` (same-label share of
    the soft labels vs tau_s)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    keys = [
        (k, lab)
        for k, lab in TABLE_METRICS
        if k != "rsum" and all(k in r["metrics"]["test"] for v in variants for r in test_runs[v])
    ]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    width = 0.8 / len(variants)
    x = np.arange(len(keys))
    for j, v in enumerate(variants):
        stats = [mean_std([r["metrics"]["test"][k] for r in test_runs[v]]) for k, _ in keys]
        ax.bar(
            x + (j - (len(variants) - 1) / 2) * width,
            [s[0] for s in stats],
            width,
            yerr=[s[1] for s in stats],
            capsize=3,
            label=labels.get(v, v),
        )
    ax.set_xticks(x, [lab for _, lab in keys], rotation=30, ha="right")
    ax.set_ylabel("% (test split)")
    ax.set_title(f"softalign demo: {regime} student, test split")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.text(0.99, 0.01, "Emoji art: Twemoji (Twitter, Inc and contributors), CC-BY 4.0", ha="right", fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "metrics.png"))

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    names = [n for n in sweep if n != "base"]
    for j, split in enumerate(("val", "test")):
        stats = [
            mean_std(
                [a["metrics"][split]["rsum"] - b["metrics"][split]["rsum"] for a, b in zip(sweep[n], sweep["base"])]
            )
            for n in names
        ]
        ax.errorbar(
            np.arange(len(names)) + (j - 0.5) * 0.15,
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            fmt="o",
            capsize=3,
            label="validation (chooses)" if split == "val" else "test (reported)",
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("rsum gain over base (paired, mean ± std)")
    ax.set_title(f"{regime}: settings on validation vs test")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out / "validation.png"))

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for j, matrix in enumerate(("image-image", "text-text")):
        rows = sorted((r for r in diag if r["matrix"] == matrix), key=lambda r: r["tau"])
        ax.plot(
            [r["tau"] for r in rows],
            [r["same_label_mass"] for r in rows],
            "o-",
            color=f"C{j}",
            label=f"{matrix}: same-label share",
        )
        ax.axhline(rows[0]["same_label_chance"], color=f"C{j}", ls=":", label=f"{matrix}: chance")
    ax.set_xscale("log")
    ax.set_xlabel("soft-label temperature tau_s")
    ax.set_ylabel("share of off-diagonal soft-label mass")
    ax.set_title("what the soft labels point at")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out / "soft_labels.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    from softalign.io import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return str(path)


def run(args) -> int:
    """``softalign demo``: holds the run directory's lock (one demo per directory at a time)."""
    from softalign.locking import directory_lock

    _check_args(args)  # before anything is written
    if args.out is None:
        args.out = "runs/demo" if not args.text_layers else f"runs/demo-text-layers-{args.text_layers}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; --out names the demo's run directory")
    with directory_lock(out, "softalign demo"):
        return _run(args)


def _check_args(args) -> None:
    """Refuse settings that would train nothing or compare nothing, naming the flag (one line, exit 1)."""
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(
            f"softalign demo: --epochs must be >= 1, got {args.epochs} (every variant would be an untrained student)"
        )
    if not args.seeds:
        raise SystemExit(
            "softalign demo: --seeds needs at least one seed (the table reports paired differences over seeds)"
        )
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(
            f"softalign demo: --seeds {' '.join(map(str, args.seeds))} repeats a seed; a repeated run "
            "adds no evidence to the paired differences"
        )
    if args.batch_size is not None and args.batch_size < 2:
        raise SystemExit(
            f"softalign demo: --batch-size must be >= 2 (contrastive losses need negatives), got {args.batch_size}"
        )
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"softalign demo: --max-images must be a positive number of images, got {args.max_images}")
    if not 0 <= args.text_layers <= 6:
        raise SystemExit(
            f"softalign demo: --text-layers must be in [0, 6] (MiniLM has 6 layers), got {args.text_layers}"
        )
    if args.folds < 2:
        raise SystemExit(f"softalign demo: --folds must be >= 2, got {args.folds}")
    if any(not 0 < t < 1 for t in args.targets):
        raise SystemExit(f"softalign demo: --targets must lie in (0, 1), got {args.targets}")


def _run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from softalign.data.demo import TWEMOJI_CREDIT, build_demo_data, stratified_folds
    from softalign.io import atomic_write_text
    from softalign.soft_labels import DEFAULT_SOFT_LABEL_ENTROPY
    from softalign.train.feature_student import FeatureStudentConfig, mean_share, train_feature_student

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    cfg = FeatureStudentConfig(text_layers=int(args.text_layers))
    if args.epochs is not None:
        cfg.epochs = int(args.epochs)
    if args.batch_size is not None:
        cfg.batch_size = int(args.batch_size)
    regime = regime_name(cfg.text_layers)
    print(f"softalign demo ({regime}) -> {out}\n{TWEMOJI_CREDIT}")
    pool_d, test_d = build_demo_data(
        captions_per_image=3, test_fraction=0.2, max_images=args.max_images, captions="cldr", label="subcategory"
    )
    folds = stratified_folds(pool_d.image_labels, args.folds, seed=0)
    fold_of = {s: i % args.folds for i, s in enumerate(args.seeds)}
    sizes = {f: int((folds == f).sum()) for f in sorted(set(fold_of.values()))}
    smallest = min(min(sizes.values()), pool_d.num_images - max(sizes.values()), test_d.num_images)
    if smallest < 2:
        raise SystemExit(
            f"softalign demo: --max-images {args.max_images} leaves {smallest} image(s) in a "
            f"training, validation or test split (training pool {pool_d.num_images}, validation folds "
            f"{sizes}, test {test_d.num_images}); every split needs at least 2: use a larger "
            "--max-images (e.g. 200), or leave it unset for all images"
        )
    cfg.batch_size = min(cfg.batch_size, pool_d.num_images - max(sizes.values()))
    print(
        f"data: training pool {pool_d.num_images} images / {pool_d.num_captions} captions in {args.folds} folds "
        f"(seed s validates on fold s mod {args.folds}: {max(sizes.values())} images or fewer, trains on the "
        f"rest), test {test_d.num_images} / {test_d.num_captions}; {len(pool_d.label_names)} sub-categories "
        f"({time.time() - t0:.0f}s)"
    )

    t1 = time.time()
    pool = _feature_table(out / "features" / "pool", pool_d, progress)
    test = _feature_table(out / "features" / "test", test_d, progress)
    text_backbone = None
    if cfg.text_layers:
        from softalign.train.text_top_layers import bottom_states, load_sentence_encoder

        text_backbone, tokenizer = load_sentence_encoder(STUDENT_BACKBONES["text"])
        for split in (pool, test):
            split.text = bottom_states(text_backbone, tokenizer, split.data.captions, cfg.text_layers)
    print(
        f"student features ({regime}: {STUDENT_BACKBONES['image']} + {STUDENT_BACKBONES['text']}): "
        f"{time.time() - t1:.0f}s"
    )
    t1 = time.time()
    cache = _teacher_cache(out / "teacher_cache", pool_d, progress)
    print(f"teacher cache ({TEACHERS['image']} + {TEACHERS['text']}): {time.time() - t1:.0f}s")

    diag = soft_label_diagnostics(
        cache,
        cfg.batch_size,
        sorted(set(args.targets) | {DEFAULT_SOFT_LABEL_ENTROPY}),
        image_labels=pool_d.image_labels,
    )
    diag_md = soft_label_table(diag)
    print(f"\nsoft labels on training batches of {cfg.batch_size} (labels: emoji sub-category)\n{diag_md}")

    val_splits = {f: pool.select_images(np.flatnonzero(folds == f)) for f in sizes}

    def runs(loss_kwargs, desc):
        res = []
        for s in tqdm(args.seeds, desc=desc, disable=not progress, leave=False):
            f = fold_of[s]
            res.append(
                train_feature_student(
                    pool,
                    {"val": val_splits[f], "test": test},
                    {"base": args.base, **loss_kwargs},
                    cfg,
                    s,
                    cache=cache,
                    train_images=np.flatnonzero(folds != f),
                    text_backbone=text_backbone,
                )
            )
        return res

    # ---- every setting trains once per seed and is scored on its seed's validation fold and on test; the choice
    # reads validation only
    targets = sorted(set(args.targets) | {DEFAULT_SOFT_LABEL_ENTROPY})
    settings = {
        "base": {"alpha": 0.0, "beta": 0.0},
        "CUSA tau_s=1": {"teacher_temperature": 1.0},
        **{f"H={t:g}": {"soft_label_entropy": t} for t in targets},
    }
    sweep = {k: runs(kw, k) for k, kw in settings.items()}
    val_rsum = {k: mean_std([r["metrics"]["val"]["rsum"] for r in v])[0] for k, v in sweep.items()}
    chosen = max(args.targets, key=lambda t: val_rsum[f"H={t:g}"])
    val_lines = [
        "| setting | validation rsum | Δ rsum vs base, validation (paired) | Δ rsum vs base, test (paired) "
        "| i2i MAP@R (val) | t2t MAP@R (val) | soft share of the gradient |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in sweep.items():
        m = mean_std([r["metrics"]["val"]["rsum"] for r in v])
        d = {
            split: mean_std(
                [a["metrics"][split]["rsum"] - b["metrics"][split]["rsum"] for a, b in zip(v, sweep["base"])]
            )
            for split in ("val", "test")
        }
        i2i = mean_std([r["metrics"]["val"].get("i2i_map_at_r", float("nan")) for r in v])[0]
        t2t = mean_std([r["metrics"]["val"].get("t2t_map_at_r", float("nan")) for r in v])[0]
        share = [mean_share(r["gradient_shares"]) for r in v]
        known = [x for x in share if x is not None]
        share_s = f"{100 * np.mean(known):.1f}%" if len(known) == len(share) and k != "base" else "-"
        val_lines.append(
            f"| {k} | {m[0]:.2f} ± {m[1]:.2f} | {d['val'][0]:+.2f} ± {d['val'][1]:.2f} | "
            f"{d['test'][0]:+.2f} ± {d['test'][1]:.2f} | {i2i:.2f} | {t2t:.2f} | {share_s} |"
        )
    agreement = validation_vs_test(sweep)
    val_md = "\n".join(val_lines) + "\n\n" + agreement["text"] + "\n"
    print(
        f"\nsettings ({len(args.seeds)} seeds, seed s validating on fold s mod {args.folds}):\n{val_md}\n"
        f"chosen on validation: soft-label entropy {chosen:g} (library default {DEFAULT_SOFT_LABEL_ENTROPY:g})"
    )

    # ---- test
    test_runs = {
        "base": sweep["base"],
        "cusa_default": sweep[f"H={DEFAULT_SOFT_LABEL_ENTROPY:g}"],
        "cusa_tau1": sweep["CUSA tau_s=1"],
    }
    labels = {
        "base": "base",
        "cusa_default": f"+CUSA (defaults, H={DEFAULT_SOFT_LABEL_ENTROPY:g})",
        "cusa_tau1": "+CUSA (tau_s=1, CUSA)",
    }
    if chosen != DEFAULT_SOFT_LABEL_ENTROPY:
        test_runs["cusa_val"] = sweep[f"H={chosen:g}"]
        labels["cusa_val"] = f"+CUSA (validation choice, H={chosen:g})"
    order = list(test_runs)
    table = summary_table(test_runs, order, labels)
    teacher_test = _teacher_uni_modal(out / "teacher_eval" / "test", test_d, progress)
    uni_md, uni_advice = uni_modal_choice(test_runs, teacher_test)
    uni_text = "\n".join(f"- {a['text']}" for a in uni_advice.values())
    plots = save_plots(test_runs, order, labels, sweep, diag, out, regime)
    cal = test_runs["cusa_default"][0]["loss_config"].get("calibration", {})
    wall = time.time() - t0
    md = (
        f"# softalign demo: {regime} student, base `{args.base}`\n\n{table}\n"
        f"Seeds {list(args.seeds)}; test: {test_d.num_images} held-out images, {test_d.num_captions} captions; "
        f"uni-modal labels: emoji sub-category; uni-modal rows on USA's heads (base: cross-modal embeddings), "
        f"(xm) rows on the cross-modal embeddings. Calibrated tau_s (defaults): image {cal.get('image', 0):.4g}, "
        f"text {cal.get('text', 0):.4g} at batch {cal.get('batch_size', '-')}.\n\n"
        f"## Uni-modal retrieval: which embeddings (+CUSA defaults; chosen on validation)\n\n{uni_md}\n"
        f"{uni_text}\n\n"
        f"## Settings on validation, and what test showed\n\n{val_md}\nChosen on validation: H = {chosen:g}.\n\n"
        f"## Soft labels\n\n{diag_md}\nWall time: {wall:.0f}s.\n\n{TWEMOJI_CREDIT}; emoji names and keywords: "
        f"Unicode CLDR.\n"
    )
    summary = {
        "seeds": list(args.seeds),
        "folds": args.folds,
        "fold_of_seed": {str(k): v for k, v in fold_of.items()},
        "base": args.base,
        "regime": regime,
        "student": cfg.to_dict(),
        "student_backbones": STUDENT_BACKBONES,
        "teachers": TEACHERS,
        "chosen_entropy": chosen,
        "default_entropy": DEFAULT_SOFT_LABEL_ENTROPY,
        "validation_rsum": val_rsum,
        "validation_vs_test": {k: v for k, v in agreement.items() if k != "text"},
        "soft_labels": diag,
        "test": {
            v: [
                {
                    "seed": r["seed"],
                    "metrics": r["metrics"],
                    "loss_config": r["loss_config"],
                    "gradient_shares": r["gradient_shares"],
                }
                for r in test_runs[v]
            ]
            for v in order
        },
        "labels": labels,
        "wall_seconds": round(wall, 1),
        "credit": TWEMOJI_CREDIT,
        "plots": plots,
        "uni_modal": {"teachers_test": teacher_test, "choice": uni_advice},
    }
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    print("\n" + table)
    print(f"uni-modal retrieval, which embeddings (+CUSA defaults; chosen on validation):\n{uni_md}\n{uni_text}\n")
    print(f"plots: {', '.join(plots)}\ntable: {out / 'results.md'}\nwall time: {wall:.0f}s\n{TWEMOJI_CREDIT}")
    return 0


def regime_name(text_layers: int) -> str:
    return "frozen-feature" if not text_layers else f"trained-encoder (MiniLM's top {text_layers} layers train)"


def validation_vs_test(sweep: dict[str, list[dict]], baseline: str = "base", key: str = "rsum") -> dict[str, Any]:
    """How well validation predicted test over the settings of ``sweep``: each setting's paired gain over
    ``baseline`` (mean over seeds) on validation and on test, their Spearman rank correlation, whether the setting
    best on validation was best on test, and the share of (setting, seed) pairs whose gain has the same sign on
    both."""
    import numpy as np

    names = [k for k in sweep if k != baseline]
    gains = {
        split: {
            k: [a["metrics"][split][key] - b["metrics"][split][key] for a, b in zip(sweep[k], sweep[baseline])]
            for k in names
        }
        for split in ("val", "test")
    }
    val = np.array([np.mean(gains["val"][k]) for k in names])
    test = np.array([np.mean(gains["test"][k]) for k in names])
    rho = _spearman(val, test) if len(names) > 2 else float("nan")
    signs = [np.sign(v) == np.sign(t) for k in names for v, t in zip(gains["val"][k], gains["test"][k])]
    best_val, best_test = names[int(val.argmax())], names[int(test.argmax())]
    same_sign = float(np.mean(signs))
    text = (
        f"How validation predicted test ({key}, gains over {baseline} per setting): Spearman rho = {rho:.2f} "
        f"over {len(names)} settings; best on validation: {best_val}, best on test: {best_test}; the sign of a "
        f"seed's gain agreed on {100 * same_sign:.0f}% of (setting, seed) pairs."
    )
    return {
        "spearman": rho,
        "best_validation": best_val,
        "best_test": best_test,
        "same_sign_share": same_sign,
        "validation_gain": dict(zip(names, val.tolist())),
        "test_gain": dict(zip(names, test.tolist())),
        "text": text,
    }


def _spearman(a, b) -> float:
    """scipy's Spearman rank correlation; nan when either side is constant (no ranking to compare)."""
    import numpy as np
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])
