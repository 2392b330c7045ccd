"""What a resume accepts: the recipe of a checkpoint (or of a finished run) against the recipe asked for. Only the
fields of :data:`RESUME_MUTABLE` may differ; a key that a saved recipe lacks counts as its schema default."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from softalign.train.recipe import Recipe

#: Recipe fields that may change between a checkpoint and its resume (and between a finished run and its reuse by
#: the demo, except ``train.epochs``): the number of epochs, logging / progress / evaluation cadence, output
#: locations, and resources that do not change what is trained.
RESUME_MUTABLE = frozenset(
    {
        "name",
        "output_dir",
        "variants",
        "train.epochs",
        "train.progress",
        "train.eval_every",
        "train.checkpoint_every",
        "train.checkpoint_steps",
        "train.eval_batch_size",
        "train.cpu",
        "teacher.cache_dir",
        "teacher.chunk_size",
        "teacher.rebuild_on_mismatch",
        "data.num_workers",
    }
)


class ResumeMismatchError(ValueError):
    """A checkpoint (or finished run) was made with a different recipe than the one asked for."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "variants":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(
    saved: Mapping[str, Any] | None, recipe: Recipe, ignore: Iterable[str] = RESUME_MUTABLE
) -> list[str]:
    """Dotted keys whose value in the ``saved`` recipe dict (a checkpoint's or a results.json's) differs from
    ``recipe`` (keys in ``ignore`` excepted). A key missing from ``saved`` (written before the option existed)
    counts as its schema default. ``saved=None`` -> ``["<no recipe stored>"]``."""
    if not isinstance(saved, Mapping):
        return ["<no recipe stored>"]
    ignore = set(ignore)
    defaults = _flatten(Recipe().to_dict())
    old, new = _flatten(saved), _flatten(recipe.to_dict())
    keys = sorted(set(old) | set(new))
    return [k for k in keys if k not in ignore and old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]


def _describe_differences(saved: Mapping[str, Any], recipe: Recipe, keys: list[str]) -> str:
    old, new = _flatten(saved), _flatten(recipe.to_dict())
    return "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys)
