"""``python -m softalign.integrations.open_clip_train``: open_clip's own training script with softalign's loss.

It runs the installed ``open_clip_train.main`` unchanged, with every one of its flags, and swaps the loss: no copy
or hand edit of ``main.py``::

    python -m softalign.integrations.open_clip_train --model ViT-B-32 --pretrained openai \\
        --train-data train.csv --val-data val.csv --dataset-type csv --epochs 10 --batch-size 128 \\
        --distill-model ViT-L-14 --distill-pretrained openai          # the teacher of the soft labels
    torchrun --nproc_per_node 4 -m softalign.integrations.open_clip_train ...   # several GPUs, as open_clip
    python -m softalign.integrations.open_clip_train ... --resume logs/RUN/checkpoints/epoch_5.pt   # resume
    python -m softalign.integrations.open_clip_train --model ViT-B-32 --val-data val.csv \\
        --resume logs/RUN/checkpoints/epoch_10.pt                       # evaluation only (no teacher needed)

How: the :class:`~softalign.integrations.open_clip.SoftAlignClipLoss` is built with the student and becomes its
submodule ``softalign_loss``. So main.py's own code does the rest, in its own order: its optimizer takes the loss's
temperatures (and heads) with the model's parameters (no weight decay on them, as on every 1-D parameter), its
checkpoints hold the loss state (temperatures, calibrated soft-label temperature, step counter) in ``state_dict``
next to the model, and ``--resume`` restores it with the model, before the optimizer state. main.py's
``create_loss(args)`` returns that same module. The soft labels come from the ``--distill-model`` teacher's
features (open_clip's data pipeline gives no caption ids for a cache).

softalign's options (the rest goes to open_clip unchanged): ``--softalign-alpha``, ``--softalign-beta`` (default:
the loss's for CLIP's cross-entropy, 10 / 10), ``--softalign-soft-label-entropy`` (0.8),
``--softalign-teacher-temperature`` (``auto`` or a number; CUSA: 1.0).

A checkpoint so written loads into a plain open_clip model with :func:`softalign.integrations.open_clip.
load_checkpoint` (the model strictly, the loss state apart), or with ``open_clip.load_checkpoint(model, path,
strict=False)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from softalign.integrations.open_clip import LOSS_KEY, SoftAlignClipLoss, check_args

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--softalign-alpha", type=float, default=None, help="CSA weight (default: the loss's, 10)")
    p.add_argument("--softalign-beta", type=float, default=None, help="USA weight (default: the loss's, 10)")
    p.add_argument(
        "--softalign-soft-label-entropy",
        type=float,
        default=None,
        help="target normalised entropy of the calibrated soft labels (default 0.8)",
    )
    p.add_argument(
        "--softalign-teacher-temperature",
        default=None,
        help="'auto' (calibrated once, default) or a fixed soft-label temperature (CUSA: 1.0)",
    )
    return p


def _loss_options(ns: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if ns.softalign_alpha is not None:
        options["alpha"] = ns.softalign_alpha
    if ns.softalign_beta is not None:
        options["beta"] = ns.softalign_beta
    if ns.softalign_soft_label_entropy is not None:
        options["soft_label_entropy"] = ns.softalign_soft_label_entropy
    tau = ns.softalign_teacher_temperature
    if tau is not None:
        try:
            options["teacher_temperature"] = tau if tau == "auto" else float(tau)
        except ValueError:
            raise SystemExit(f"--softalign-teacher-temperature: expected 'auto' or a number, got {tau!r}") from None
    return options


def main(argv: Sequence[str] | None = None):
    """Run ``open_clip_train.main.main`` over ``argv`` (default ``sys.argv[1:]``) with softalign's loss."""
    import sys

    try:
        import open_clip_train.main as oc_main
    except ImportError:
        raise SystemExit(
            "python -m softalign.integrations.open_clip_train runs open_clip's trainer: "
            "pip install 'softalign[clip]' 'open_clip_torch[training]'"
        ) from None
    ns, rest = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [a for a in rest if a.startswith("--softalign")]
    if unknown:
        raise SystemExit(
            f"unknown softalign option(s) {unknown}; softalign's are: {', '.join(_parser()._option_string_actions)}"
        )
    loss = SoftAlignClipLoss(**_loss_options(ns))
    real_create_model, real_create_loss = oc_main.create_model_and_transforms, oc_main.create_loss
    attached: list[Any] = []

    def create_model_and_transforms(*args, **kwargs):
        model, preprocess_train, preprocess_val = real_create_model(*args, **kwargs)
        if not attached:  # main.py builds the student first; a second call (--distill-model) is the teacher
            device = next(model.parameters()).device
            model.add_module(LOSS_KEY, loss.to(device))
            attached.append(model)
        return model, preprocess_train, preprocess_val

    def create_loss_for_main(args):
        check_args(args)  # refuses SigLIP / CoCa, and training without a teacher, by name
        return loss

    oc_main.create_model_and_transforms, oc_main.create_loss = create_model_and_transforms, create_loss_for_main
    try:
        return oc_main.main(rest)
    finally:
        oc_main.create_model_and_transforms, oc_main.create_loss = real_create_model, real_create_loss


if __name__ == "__main__":  # pragma: no cover - exercised through tests/test_open_clip_train.py's main() calls
    raise SystemExit(main())
