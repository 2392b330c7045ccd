"""Training recipes: YAML files validated against a dataclass schema.

A recipe has the sections ``data``, ``model``, ``teacher``, ``loss``, ``optim``, ``train`` (all optional, with
defaults) plus ``name``, ``seed``, ``output_dir``, and ``variants``: named overrides (nested mappings merged into
the recipe) such as ``base`` / ``csa_usa`` / ``cmc``. Unknown keys are errors naming the key and the allowed
keys; values of the wrong type are errors naming the key, the expected type and the value.

    recipe = load_recipe("recipes/flickr30k_vsepp.yaml", variant="csa_usa", overrides=["train.epochs=2"])
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class RecipeError(ValueError):
    """A recipe that does not match the schema (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    """Where the data comes from. ``kind``: demo | karpathy | precomp | hf | imagefolder."""

    kind: Literal["demo", "karpathy", "precomp", "hf", "imagefolder"] = "demo"
    path: str | None = None            # karpathy: JSON file; precomp/imagefolder: folder; hf: hub name or a
                                          # DatasetDict saved with save_to_disk
    image_root: str | None = None      # karpathy: image folder
    train_split: str = "train"
    test_split: str = "test"
    captions_per_image: int | None = 5
    image_size: int = 224
    augment: bool = False
    preload: bool = False                 # decode all images once (small data sets)
    max_images: int | None = None      # cap per split (quick runs)
    test_fraction: float = 0.2            # demo only
    image_column: str | None = None    # hf / imagefolder
    caption_column: str | None = None
    label_column: str | None = None
    num_workers: int = 0
    sample: Literal["captions", "images"] = "captions"   # an epoch visits every caption (VSE++) or every image


@dataclass
class ModelConfig:
    """Student model. ``image_encoder``: small_cnn | precomp | timm:<name>; ``text_encoder``: gru | bow |
    hf:<name or path> | offline-minilm."""

    image_encoder: str = "small_cnn"
    text_encoder: str = "gru"
    embed_dim: int = 1024
    word_dim: int = 300
    min_word_count: int = 1
    pretrained: bool = True               # timm / hf weights
    finetune_image: bool = True
    finetune_text: bool = True
    cnn_width: int = 32                   # small_cnn channels of the first block
    precomp_pool: Literal["mean", "max"] = "mean"   # precomp region features [R, D] -> [D]


@dataclass
class TeacherConfig:
    """Teacher-similarity cache (only built / loaded when the loss needs it: alpha, beta > 0)."""

    text: str = "offline-minilm"
    image: str = "offline-efficientnet-lite0"
    cache_dir: str | None = None       # default: <output_dir>/teacher_cache; built once, reused afterwards
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    chunk_size: int = 256
    rebuild_on_mismatch: bool = False     # a cache built for other data / teachers: rebuild it in place (else error)


@dataclass
class LossConfig:
    """Options of :class:`softalign.losses.SoftAlignLoss` (CUSA defaults: alpha 0.1, beta 0.5)."""

    base: Literal["vsepp", "vsepp_sum", "infonce", "none"] = "vsepp"
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    margin: float = 0.2
    temperature: float = 0.05
    infonce_reduction: Literal["ce", "cusa_mean", "sum", "mean"] = "ce"  # cusa_mean: CUSA's mode mean (CE / B);
    # "sum" / "mean" are the old names of "ce" / "cusa_mean" (deprecated)
    csa_mode: Literal["each", "add", "dot"] = "each"
    csa_temperature: float = 0.45
    usa_temperature: float = 0.45
    # soft-label temperature tau_s: "auto" calibrates it once from the cache (per teacher matrix) so that the soft
    # labels' normalised entropy is soft_label_entropy at the training batch size; a number fixes it (CUSA: 1.0)
    teacher_temperature: float | str = "auto"
    soft_label_entropy: float = 0.8
    soft_label_reduction: Literal["auto", "batchmean", "sum"] = "auto"   # auto: summed on a hinge base (per anchor)
    learn_temperatures: bool = True
    cmc_intra_margin: float = 0.3
    # true: every term on the global batch of all processes (exact all-gather); false: per-process soft labels and
    # losses, as CUSA's configs compute them
    gather: bool = True
    diagnostics_every: int = 100          # steps between gradient-share diagnostics (0: never)
    use_heads: bool = True                # USA's uni-modal heads (embed_dim passed to the loss)

    def loss_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        kw.pop("use_heads")
        return kw


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``schedule``: cosine (to ``min_lr``) | step (x ``lr_decay_factor`` at
    ``lr_decay_epoch``) | constant."""

    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    loss_lr: float | None = None       # lr of the loss's heads / temperatures (default: lr)
    schedule: Literal["cosine", "step", "constant"] = "step"
    min_lr: float = 0.0
    lr_decay_epoch: int | None = None
    lr_decay_factor: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = 2.0


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 256
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = 1                   # epochs between test-split evaluations (0: only at the end)
    checkpoint_every: int = 1
    progress: bool = True
    cpu: bool = False                     # force CPU even when an accelerator is present


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 0
    output_dir: str = "runs/recipe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant: str | None = None         # set by load_recipe when a variant was applied

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (dict, dict):
        return "a mapping"
    if origin in (list, list):
        return "a list"
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except RecipeError as err:
                errors.append(err)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (dict, dict):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): copy.deepcopy(v) for k, v in value.items()}
    if origin in (list, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [v if inner is Any else _convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected a boolean (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported schema type {tp!r}")  # pragma: no cover


def _build(cls, values, where: str):
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of {cls.__name__} options, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise RecipeError(f"unknown key {key!r} in recipe; allowed keys{' in ' + where if where else ''}: "
                          f"{', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _numbers(r: Recipe):
    """``(dotted key, value)`` of every float field of the recipe's sections."""
    for section in ("data", "model", "teacher", "loss", "optim", "train"):
        for f in dataclasses.fields(getattr(r, section)):
            value = getattr(getattr(r, section), f.name)
            if isinstance(value, float):
                yield f"{section}.{f.name}", value


def _check_values(r: Recipe) -> None:
    def need(cond, msg):
        if not cond:
            raise RecipeError(msg)

    need(r.train.epochs >= 1, f"train.epochs must be >= 1, got {r.train.epochs}")
    need(r.train.batch_size >= 2, f"train.batch_size must be >= 2 (contrastive losses need negatives), "
                                  f"got {r.train.batch_size}")
    need(r.optim.lr > 0, f"optim.lr must be > 0, got {r.optim.lr}")
    for where, value in _numbers(r):
        need(value == value and value not in (float("inf"), float("-inf")), f"{where} must be finite, got {value}")
    tau = r.loss.teacher_temperature
    need(tau == "auto" or (isinstance(tau, float) and tau > 0),
         f"loss.teacher_temperature: expected 'auto' (calibrated) or a number > 0, got {tau!r}")
    need(0 < r.loss.soft_label_entropy < 1,
         f"loss.soft_label_entropy must lie in (0, 1) (a fraction of log B), got {r.loss.soft_label_entropy}")
    need(r.loss.diagnostics_every >= 0, f"loss.diagnostics_every must be >= 0, got {r.loss.diagnostics_every}")
    for k in ("alpha", "beta", "gamma"):
        need(getattr(r.loss, k) >= 0, f"loss.{k} must be >= 0, got {getattr(r.loss, k)}")
    need(r.model.embed_dim >= 1, f"model.embed_dim must be >= 1, got {r.model.embed_dim}")
    need(0 < r.data.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {r.data.test_fraction}")
    if r.data.kind in ("karpathy", "precomp", "hf", "imagefolder"):
        need(r.data.path is not None, f"data.path is required for data.kind={r.data.kind!r}")
    if r.data.kind == "karpathy":
        need(r.data.image_root is not None, "data.image_root is required for data.kind='karpathy'")
    if r.data.kind == "precomp":
        need(r.model.image_encoder == "precomp",
             f"data.kind='precomp' gives feature arrays: set model.image_encoder: precomp "
             f"(got {r.model.image_encoder!r})")
    ie = r.model.image_encoder
    need(ie in ("small_cnn", "precomp") or ie.startswith("timm:"),
         f"model.image_encoder: expected 'small_cnn', 'precomp' or 'timm:<model name>', got {ie!r}")
    te = r.model.text_encoder
    need(te in ("gru", "bow", "offline-minilm") or te.startswith("hf:"),
         f"model.text_encoder: expected 'gru', 'bow', 'offline-minilm' or 'hf:<name or path>', got {te!r}")
    if r.optim.schedule == "step":
        need(r.optim.lr_decay_epoch is None or r.optim.lr_decay_epoch >= 1,
             f"optim.lr_decay_epoch must be >= 1, got {r.optim.lr_decay_epoch}")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_override(item: str) -> dict[str, Any]:
    import yaml

    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. train.epochs=2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {item!r}: the value {raw!r} is not valid YAML "
                          f"({' '.join(str(err).split())})") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def recipe_from_dict(values: Mapping[str, Any], variant: str | None = None,
                     overrides: Sequence[str | Mapping[str, Any]] = (),
                     base_overrides: Sequence[str | Mapping[str, Any]] = ()) -> Recipe:
    """Validate ``values`` (a parsed YAML mapping); apply ``base_overrides``, then ``variant``, then ``overrides``
    (each ``"a.b=value"`` or a nested mapping).

    A variant trains into ``<output_dir>/<variant>`` (unless it sets ``output_dir`` itself) and, unless
    ``teacher.cache_dir`` is set, shares the teacher cache ``<output_dir>/teacher_cache`` with the other variants.
    """
    if not isinstance(values, Mapping):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(values).__name__}")
    raw = dict(values)
    variants = raw.get("variants") or {}
    if not isinstance(variants, Mapping):
        raise RecipeError(f"variants: expected a mapping of name -> overrides, got {variants!r}")
    # validate every variant up front so that a typo in an unused variant is still reported
    base_only = {k: v for k, v in raw.items() if k not in ("variants", "variant")}
    for vname, vover in variants.items():
        if not isinstance(vover, Mapping):
            raise RecipeError(f"variants.{vname}: expected a mapping of overrides, got {vover!r}")
        if "variants" in vover:
            raise RecipeError(f"variants.{vname}: a variant cannot define variants")
        try:
            _build(Recipe, _merge(base_only, vover), "")
        except RecipeError as err:
            raise RecipeError(f"in variant {vname!r}: {err}") from None
    merged = base_only
    for item in base_overrides:
        merged = _merge(merged, _parse_override(item) if isinstance(item, str) else item)
    if variant is not None:
        if variant not in variants:
            raise RecipeError(f"unknown variant {variant!r}; the recipe defines: {sorted(variants) or 'none'}")
        base_out = str(merged.get("output_dir", Recipe.output_dir))
        base_cache = (merged.get("teacher") or {}).get("cache_dir") if isinstance(merged.get("teacher"), Mapping) \
            else None
        merged = _merge(merged, variants[variant])
        merged["name"] = f"{merged.get('name', Recipe.name)}-{variant}"
        if "output_dir" not in variants[variant]:
            merged["output_dir"] = os.path.join(base_out, variant)
        teacher = dict(merged.get("teacher") or {})
        if teacher.get("cache_dir") is None and base_cache is None:
            teacher["cache_dir"] = os.path.join(base_out, "teacher_cache")
            merged["teacher"] = teacher
    for item in overrides:
        merged = _merge(merged, _parse_override(item) if isinstance(item, str) else item)
    recipe = _build(Recipe, {**merged, "variants": variants}, "")
    recipe.variant = variant
    _check_values(recipe)
    return recipe


def _read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document of a recipe file; a missing file, bad encoding or bad YAML is a one-line error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_recipe(path: str | os.PathLike, variant: str | None = None,
                overrides: Sequence[str | Mapping[str, Any]] = (),
                base_overrides: Sequence[str | Mapping[str, Any]] = ()) -> Recipe:
    """Read and validate a YAML recipe; see :func:`recipe_from_dict`."""
    values = _read_yaml(path)
    try:
        return recipe_from_dict(values or {}, variant=variant, overrides=overrides, base_overrides=base_overrides)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def list_variants(path: str | os.PathLike) -> list[str]:
    """Names of the recipe's variants (sorted); the recipe must be a mapping whose ``variants`` is a mapping."""
    values = _read_yaml(path) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(values).__name__}")
    variants = values.get("variants") or {}
    if not isinstance(variants, dict):
        raise RecipeError(f"{path}: variants: expected a mapping of name -> overrides, got {variants!r}")
    return sorted(variants)
