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
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _yaml_number(value: Any) -> Any:
    """A float field: a number, or a numeric string (PyYAML, YAML 1.1, reads ``1e-5`` without a dot as a string);
    booleans are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, str):
        if not _FLOAT_RE.match(value.strip()):
            raise ValueError("expected a number")
        return float(value)
    return value


#: the recipe schema's scalar types: pydantic validates them strictly (no "3" for an integer, no "yes" for a
#: boolean), floats also from YAML's numeric strings
YamlFloat = Annotated[float, BeforeValidator(_yaml_number)]
_CONFIG = ConfigDict(extra="forbid")


class RecipeError(ValueError):
    """A recipe that does not match the schema (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    """Where the data comes from. ``kind``: demo | karpathy | precomp | hf | imagefolder."""

    __pydantic_config__ = _CONFIG

    kind: Literal["demo", "karpathy", "precomp", "hf", "imagefolder"] = "demo"
    path: StrictStr | None = None  # karpathy: JSON file; precomp/imagefolder: folder; hf: hub name or a
    # DatasetDict saved with save_to_disk
    image_root: StrictStr | None = None  # karpathy: image folder
    train_split: StrictStr = "train"
    test_split: StrictStr = "test"
    captions_per_image: StrictInt | None = 5
    image_size: StrictInt = 224
    augment: StrictBool = False
    preload: StrictBool = False  # decode all images once (small data sets)
    max_images: StrictInt | None = None  # cap per split (quick runs)
    test_fraction: YamlFloat = 0.2  # demo only
    # the split that settings and checkpoints are chosen on: a split name (karpathy: "val", precomp: "dev", hf /
    # imagefolder: a split), or a fraction of the training images cut off with the recipe's seed; null: none (the
    # last checkpoint is scored on test, once, at the end)
    validation: YamlFloat | StrictStr | None = None
    image_column: StrictStr | None = None  # hf / imagefolder
    caption_column: StrictStr | None = None
    label_column: StrictStr | None = None
    num_workers: StrictInt = 0
    sample: Literal["captions", "images"] = "captions"  # an epoch visits every caption (VSE++) or every image


@dataclass
class ModelConfig:
    """Student model. ``image_encoder``: small_cnn | precomp | timm:<name> | open_clip:<arch>[/<pretrained>];
    ``text_encoder``: gru | bow | hf:<name or path> | offline-minilm | open_clip (with an open_clip image encoder:
    both towers of that model)."""

    __pydantic_config__ = _CONFIG

    image_encoder: StrictStr = "small_cnn"
    text_encoder: StrictStr = "gru"
    embed_dim: StrictInt = 1024
    word_dim: StrictInt = 300
    min_word_count: StrictInt = 1
    pretrained: StrictBool = True  # timm / hf weights
    finetune_image: StrictBool = True
    finetune_text: StrictBool = True
    cnn_width: StrictInt = 32  # small_cnn channels of the first block
    precomp_pool: Literal["mean", "max"] = "mean"  # precomp region features [R, D] -> [D]


@dataclass
class TeacherConfig:
    """Teacher-similarity cache (only built / loaded when the loss needs it: alpha, beta > 0)."""

    __pydantic_config__ = _CONFIG

    text: StrictStr = "offline-minilm"
    image: StrictStr = "offline-efficientnet-lite0"
    cache_dir: StrictStr | None = None  # default: <output_dir>/teacher_cache; built once, reused afterwards
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    chunk_size: StrictInt = 256
    rebuild_on_mismatch: StrictBool = (
        False  # a cache built for other data / teachers: rebuild it in place (else error)
    )
    views: StrictInt = 0  # K > 0: teacher embeddings of K stored augmentations per training image, replayed by the
    # loader (MobileCLIP's reinforced data; softalign.teachers.views; needs data.augment)


@dataclass
class LossConfig:
    """Options of :class:`softalign.losses.SoftAlignLoss`, with its defaults. An unset ``alpha`` / ``beta`` is the
    loss's default for the base (:func:`softalign.losses.combined.default_weights`: 0.1 / 0.5 for CUSA's InfoNCE
    mean mode, 10 / 10 for the cross-entropy, 3 / 3 for the VSE++ hinge), resolved when the recipe is loaded; a
    recipe trains the base loss alone only when it sets both to 0."""

    __pydantic_config__ = _CONFIG

    base: Literal["vsepp", "vsepp_sum", "infonce", "none"] = "vsepp"
    alpha: YamlFloat | None = None
    beta: YamlFloat | None = None
    gamma: YamlFloat = 0.0
    margin: YamlFloat = 0.2
    temperature: YamlFloat = 0.05
    infonce_reduction: Literal["ce", "cusa_mean"] = "ce"  # cusa_mean: CUSA's mode mean (CE / B)
    csa_mode: Literal["each", "add", "dot"] = "each"
    csa_temperature: YamlFloat = 0.45
    usa_temperature: YamlFloat = 0.45
    # soft-label temperature tau_s: "auto" calibrates it once from the cache (per teacher matrix) so that the soft
    # labels' normalised entropy is soft_label_entropy at the training batch size; a number fixes it (CUSA: 1.0)
    teacher_temperature: YamlFloat | StrictStr = "auto"
    soft_label_entropy: YamlFloat = 0.8
    soft_label_reduction: Literal["auto", "batchmean", "sum"] = "auto"  # auto: summed on a hinge base (per anchor)
    learn_temperatures: StrictBool = True
    cmc_intra_margin: YamlFloat = 0.3
    # true: every term on the global batch of all processes (exact all-gather); false: per-process soft labels and
    # losses, as CUSA's configs compute them
    gather: StrictBool = True
    diagnostics_every: StrictInt = 100  # steps between gradient-share diagnostics (0: never)
    use_heads: StrictBool = True  # USA's uni-modal heads (embed_dim passed to the loss)

    def loss_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        kw.pop("use_heads")
        return kw


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``schedule``: cosine (to ``min_lr``) | step (x ``lr_decay_factor`` at
    ``lr_decay_epoch``) | constant. ``schedule_interval``: the cosine advances every optimizer step, or once per
    epoch (CUSA's timm ``CosineLRScheduler``, stepped per epoch). ``decay_1d``: false (default) exempts biases and
    other 1-D parameters (norms, temperatures) from weight decay, as CUSA's and open_clip's optimizer factories do."""

    __pydantic_config__ = _CONFIG

    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: YamlFloat = 2e-4
    weight_decay: YamlFloat = 0.0
    loss_lr: YamlFloat | None = None  # lr of the loss's heads / temperatures (default: lr)
    schedule: Literal["cosine", "step", "constant"] = "step"
    schedule_interval: Literal["step", "epoch"] = "step"
    decay_1d: StrictBool = False
    min_lr: YamlFloat = 0.0
    lr_decay_epoch: StrictInt | None = None
    lr_decay_factor: YamlFloat = 0.1
    warmup_steps: StrictInt = 0
    grad_clip: YamlFloat | None = 2.0


@dataclass
class TrainConfig:
    __pydantic_config__ = _CONFIG
    epochs: StrictInt = 30
    batch_size: StrictInt = 128
    eval_batch_size: StrictInt = 256
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: StrictInt = 1  # epochs between validation evaluations (0: only after the last)
    keep_best: StrictStr | None = None  # a validation metric (rsum, i2t_r1, t2t_map_at_r, ...): keep the best
    # checkpoint by it (higher is better; medr / meanr lower) and score test on that one; null: the last epoch
    checkpoint_every: StrictInt = 1
    checkpoint_steps: StrictInt = 0  # also checkpoint every N optimizer steps inside an epoch (0: off); a
    # resume then skips the batches already done (accelerate's skip_first_batches)
    progress: StrictBool = True
    cpu: StrictBool = False  # force CPU even when an accelerator is present


@dataclass
class Recipe:
    __pydantic_config__ = _CONFIG
    name: StrictStr = "recipe"
    seed: StrictInt = 0
    output_dir: StrictStr = "runs/recipe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant: StrictStr | None = None  # set by load_recipe when a variant was applied

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- validation
_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _field_type(cls: type, loc: Sequence[Any]) -> tuple[Any, list[str], type]:
    """The schema type at ``loc`` (field names from ``cls`` down), the field names on the way, and the last
    dataclass passed (whose fields an unknown key is compared with)."""
    tp: Any = cls
    names: list[str] = []
    owner: Any = cls
    for part in loc:
        if not (isinstance(part, str) and dataclasses.is_dataclass(tp)):
            break
        hints = typing.get_type_hints(tp, include_extras=True)
        owner = tp
        names.append(part)
        if part not in hints:
            break
        tp = hints[part]
    return tp, names, owner


def _scalar_name(tp: Any) -> str:
    """How an error names the schema type ``tp`` ("an integer", "one of 'a', 'b'", ...), through pydantic's
    Annotated / Strict wrappers."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _scalar_name(typing.get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return " or ".join(_scalar_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp in (StrictInt, int):
        return "an integer"
    if tp in (StrictBool, bool):
        return "a boolean (true/false)"
    if tp in (StrictStr, str):
        return "a string"
    if tp is float:
        return "a number"
    if origin is dict:
        return "a mapping"
    if origin is list:
        return "a list"
    return {type(None): "null (the default)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(err: ValidationError, cls: type, where: str) -> str:
    """One line naming the key (dotted), what was expected and the value, from pydantic's first error."""
    e = err.errors()[0]
    tp, names, owner = _field_type(cls, e["loc"])
    key = ".".join(([where] if where else []) + names)
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        section = ".".join(([where] if where else []) + names[:-1])
        allowed = ", ".join(f.name for f in dataclasses.fields(owner) if not f.name.startswith("_"))
        return f"unknown key {key!r} in recipe; allowed keys{' in ' + section if section else ''}: {allowed}"
    if dataclasses.is_dataclass(tp):
        return f"{key or 'recipe'}: expected a mapping of {getattr(tp, '__name__', tp)} options, got {e['input']!r}"
    return f"{key}: expected {_scalar_name(tp)}, got {e['input']!r}"


def _build(cls, values, where: str):
    """Validate ``values`` against the dataclass ``cls`` with pydantic (strict scalars, unknown keys refused)."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of {cls.__name__} options, got {values!r}")
    try:
        return _adapter(cls).validate_python(copy.deepcopy(dict(values)))
    except ValidationError as err:
        raise RecipeError(_describe(err, cls, where)) from None


def _numbers(r: Recipe):
    """``(dotted key, value)`` of every float field of the recipe's sections."""
    for section in ("data", "model", "teacher", "loss", "optim", "train"):
        for f in dataclasses.fields(getattr(r, section)):
            value = getattr(getattr(r, section), f.name)
            if isinstance(value, float):
                yield f"{section}.{f.name}", value


def _resolve_loss_weights(r: Recipe) -> None:
    """Unset ``loss.alpha`` / ``loss.beta`` take the loss's default for ``loss.base``; a variant named for a
    soft-label term (``csa`` / ``usa`` in its name) that ends with that term's weight at 0 is refused."""
    from softalign.losses.combined import default_weights

    alpha, beta = default_weights(r.loss.base, r.loss.infonce_reduction)
    r.loss.alpha = alpha if r.loss.alpha is None else r.loss.alpha
    r.loss.beta = beta if r.loss.beta is None else r.loss.beta
    name = (r.variant or "").lower()
    for term, key in (("csa", "alpha"), ("usa", "beta")):
        if term in name and not getattr(r.loss, key) > 0:
            raise RecipeError(
                f"variant {r.variant!r} is named for {term.upper()} but trains with loss.{key} = "
                f"{getattr(r.loss, key)}: the term is off. Set loss.{key} > 0 in the variant, or leave "
                f"it unset for the default of base {r.loss.base!r} ({alpha if key == 'alpha' else beta})"
            )


def _check_values(r: Recipe) -> None:
    def need(cond, msg):
        if not cond:
            raise RecipeError(msg)

    need(r.train.epochs >= 1, f"train.epochs must be >= 1, got {r.train.epochs}")
    need(
        r.train.checkpoint_steps >= 0, f"train.checkpoint_steps must be >= 0 (0: off), got {r.train.checkpoint_steps}"
    )
    need(
        r.train.batch_size >= 2,
        f"train.batch_size must be >= 2 (contrastive losses need negatives), got {r.train.batch_size}",
    )
    need(r.optim.lr > 0, f"optim.lr must be > 0, got {r.optim.lr}")
    for where, value in _numbers(r):
        need(value == value and value not in (float("inf"), float("-inf")), f"{where} must be finite, got {value}")
    tau = r.loss.teacher_temperature
    need(
        tau == "auto" or (isinstance(tau, float) and tau > 0),
        f"loss.teacher_temperature: expected 'auto' (calibrated) or a number > 0, got {tau!r}",
    )
    need(
        0 < r.loss.soft_label_entropy < 1,
        f"loss.soft_label_entropy must lie in (0, 1) (a fraction of log B), got {r.loss.soft_label_entropy}",
    )
    need(r.loss.diagnostics_every >= 0, f"loss.diagnostics_every must be >= 0, got {r.loss.diagnostics_every}")
    for k in ("alpha", "beta", "gamma"):
        value = getattr(r.loss, k)
        need(value is None or value >= 0, f"loss.{k} must be >= 0, got {value}")
    need(r.model.embed_dim >= 1, f"model.embed_dim must be >= 1, got {r.model.embed_dim}")
    need(0 < r.data.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {r.data.test_fraction}")
    v = r.data.validation
    if isinstance(v, float):
        need(0 < v < 1, f"data.validation: a fraction of the training images must lie in (0, 1), got {v}")
    elif isinstance(v, str):
        need(
            r.data.kind != "demo",
            f"data.validation: the demo data has no named splits; give a fraction of the "
            f"training images (e.g. 0.1), got {v!r}",
        )
        need(
            v not in (r.data.train_split, r.data.test_split),
            f"data.validation: {v!r} is the {'training' if v == r.data.train_split else 'test'} split; choose "
            "settings on a split of its own",
        )
    need(
        r.train.keep_best is None or v is not None,
        f"train.keep_best: {r.train.keep_best!r} is chosen on validation: set data.validation (a split, or a "
        "fraction of the training images)",
    )
    need(
        r.train.eval_every >= 0,
        f"train.eval_every must be >= 0 (0: only after the last epoch), got {r.train.eval_every}",
    )
    if r.data.kind in ("karpathy", "precomp", "hf", "imagefolder"):
        need(r.data.path is not None, f"data.path is required for data.kind={r.data.kind!r}")
    if r.data.kind == "karpathy":
        need(r.data.image_root is not None, "data.image_root is required for data.kind='karpathy'")
    if r.data.kind == "precomp":
        need(
            r.model.image_encoder == "precomp",
            f"data.kind='precomp' gives feature arrays: set model.image_encoder: precomp "
            f"(got {r.model.image_encoder!r})",
        )
    ie = r.model.image_encoder
    need(
        ie in ("small_cnn", "precomp") or ie.startswith(("timm:", "open_clip:")),
        f"model.image_encoder: expected 'small_cnn', 'precomp', 'timm:<model name>' or "
        f"'open_clip:<arch>[/<pretrained>]', got {ie!r}",
    )
    te = r.model.text_encoder
    need(
        te in ("gru", "bow", "offline-minilm", "open_clip") or te.startswith("hf:"),
        f"model.text_encoder: expected 'gru', 'bow', 'offline-minilm', 'hf:<name or path>' or 'open_clip', got {te!r}",
    )
    need(
        ie.startswith("open_clip:") == (te == "open_clip"),
        f"an open_clip student uses both towers of one model: set model.image_encoder: open_clip:<arch>[/<pretrained>] "
        f"together with model.text_encoder: open_clip (got image_encoder {ie!r}, text_encoder {te!r})",
    )
    if r.optim.schedule == "step":
        need(
            r.optim.lr_decay_epoch is None or r.optim.lr_decay_epoch >= 1,
            f"optim.lr_decay_epoch must be >= 1, got {r.optim.lr_decay_epoch}",
        )


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
        raise RecipeError(
            f"override {item!r}: the value {raw!r} is not valid YAML ({' '.join(str(err).split())})"
        ) from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def recipe_from_dict(
    values: Mapping[str, Any],
    variant: str | None = None,
    overrides: Sequence[str | Mapping[str, Any]] = (),
    base_overrides: Sequence[str | Mapping[str, Any]] = (),
) -> Recipe:
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
        base_cache = (
            (merged.get("teacher") or {}).get("cache_dir") if isinstance(merged.get("teacher"), Mapping) else None
        )
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
    _resolve_loss_weights(recipe)
    return recipe


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``softalign/recipes/*.yaml``, read through
    ``importlib.resources``), e.g. ``demo``, ``coco_clip_vitb32``."""
    from importlib.resources import files

    folder = files("softalign").joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _recipe_source(path: str | os.PathLike):
    """A recipe file: the path as given, else a packaged recipe named by it (``demo``, ``demo.yaml`` or
    ``recipes/demo.yaml``), so the shipped recipes work from any directory and from an installed wheel."""
    from importlib.resources import files

    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("recipes")) and name in packaged_recipes():
        return files("softalign").joinpath("recipes").joinpath(f"{name}.yaml")
    raise FileNotFoundError(f"recipe not found: {path} (the packaged recipes are: {', '.join(packaged_recipes())})")


def _read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document of a recipe file; a missing file, bad encoding or bad YAML is a one-line error."""
    import yaml

    source = _recipe_source(path)
    try:
        with source.open(encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_recipe(
    path: str | os.PathLike,
    variant: str | None = None,
    overrides: Sequence[str | Mapping[str, Any]] = (),
    base_overrides: Sequence[str | Mapping[str, Any]] = (),
) -> Recipe:
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
