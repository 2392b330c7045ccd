"""How the soft-label defaults were chosen: base losses x weights x entropy targets on the demo's VALIDATION split.

Reuses the demo's data, frozen student features and teacher cache (``softalign demo --out DIR`` builds them; this
script builds them too when missing) and trains the frozen-feature student for each setting and seed. It never
reads the test split. Prints one line per setting: validation rsum, uni-modal MAP@R (on USA's heads) and the
soft terms' mean share of the gradient norm.

    python scripts/sweep_soft_labels.py --out runs/demo                 # the grid behind the defaults
    python scripts/sweep_soft_labels.py --out runs/demo --grid quick    # a smaller one
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from pathlib import Path

import numpy as np

GRIDS = {
    # (base loss kwargs, [(alpha, beta)], [entropy targets])
    "full": [
        ({"base": "infonce"}, [(0.1, 0.5), (1, 1), (3, 3), (10, 10)], [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]),
        ({"base": "infonce", "infonce_reduction": "cusa_mean"}, [(0.1, 0.5)], [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]),
        ({"base": "vsepp_sum"}, [(0.1, 0.1), (1, 1), (3, 3), (10, 10)], [0.5, 0.7, 0.8, 0.9, 0.95]),
        ({"base": "vsepp"}, [(0.1, 0.1), (1, 1), (3, 3), (10, 10)], [0.5, 0.7, 0.8, 0.9, 0.95]),
    ],
    "quick": [
        ({"base": "infonce"}, [(1, 1), (10, 10)], [0.5, 0.8]),
        ({"base": "vsepp"}, [(3, 3)], [0.8]),
    ],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="the demo's run directory (features, teacher cache)")
    p.add_argument("--grid", default="full", choices=sorted(GRIDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="softalign: the soft-label terms")

    from softalign.data.demo import build_demo_data
    from softalign.train.demo import _feature_table, _teacher_cache
    from softalign.train.feature_student import FeatureStudentConfig, mean_share, train_feature_student

    out = Path(args.out)
    train_d, val_d, _ = build_demo_data(
        captions_per_image=3, test_fraction=0.2, val_fraction=0.2, captions="cldr", label="subcategory"
    )
    splits = {n: _feature_table(out / "features" / n, d, True) for n, d in (("train", train_d), ("val", val_d))}
    cache = _teacher_cache(out / "teacher_cache", train_d, True)
    cfg = FeatureStudentConfig()

    def report(name, kwargs):
        runs = [
            train_feature_student(splits["train"], {"val": splits["val"]}, kwargs, cfg, s, cache=cache)
            for s in args.seeds
        ]
        m = {k: np.mean([r["metrics"]["val"][k] for r in runs]) for k in ("rsum", "i2i_map_at_r", "t2t_map_at_r")}
        share = [mean_share(r["gradient_shares"]) for r in runs]
        share_s = f"{np.mean(share):.2f}" if all(x is not None for x in share) else "-"
        print(
            f"{name:<48} val rsum {m['rsum']:7.2f}  i2i MAP@R {m['i2i_map_at_r']:5.2f}  "
            f"t2t MAP@R {m['t2t_map_at_r']:5.2f}  soft share {share_s}",
            flush=True,
        )

    for base, weights, targets in GRIDS[args.grid]:
        label = "+".join(f"{v}" for v in base.values())
        report(f"{label} base only", {**base, "alpha": 0.0, "beta": 0.0})
        report(f"{label} a0.1 b0.5 tau_s=1 (CUSA)", {**base, "alpha": 0.1, "beta": 0.5, "teacher_temperature": 1.0})
        for (a, b), h in itertools.product(weights, targets):
            report(f"{label} a{a} b{b} H{h}", {**base, "alpha": a, "beta": b, "soft_label_entropy": h})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
