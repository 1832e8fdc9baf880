"""Search recipes: model, data, space, training, latency, budgets and search settings.

A recipe is a YAML file (or a name from the ``tieify.recipes`` package, e.g. ``default``)
validated into frozen dataclasses *before* anything is trained: an unknown key, a wrong type,
an impossible budget or a missing data path raises :class:`~tieify.RecipeError` naming the
key, the value received and the allowed values.

Example:
    >>> from tieify.search import load_recipe
    >>> r = load_recipe("default", {"budgets.max_params": 20000})
    >>> r.budgets.max_params
    20000
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import RecipeError
from . import _packaged

__all__ = [
    "Recipe",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "LatencyConfig",
    "Budgets",
    "SearchConfig",
    "load_recipe",
    "recipe_from_dict",
    "builtin_recipes",
    "OBJECTIVES",
]

RECIPE_VERSION = 1
#: Objective names and their Optuna directions.
OBJECTIVES = {
    "accuracy": "maximize",
    "latency_ms": "minimize",
    "latency_ratio": "minimize",
    "params": "minimize",
    "macs": "minimize",
}
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
OPTIMIZERS = ("sgd", "adamw")
SAMPLERS = ("nsga2", "tpe")
PRUNERS = ("median", "none")
LATENCY_MODES = ("auto", "measured", "predicted")
#: The largest ``budgets.max_latency_ratio``: a tied model up to twice the dense model's time
#: (larger values are taken for percentages, e.g. 50 for 0.5).
MAX_LATENCY_RATIO = 2.0
#: ``tuned``: tieify.tune_allocator() before timing (no page faults on large outputs).
ALLOCATORS = ("tuned", "system")
BUILTIN_SPACES = ("uniform", "per_stage", "per_layer", "roots")


@dataclass(frozen=True)
class ModelConfig:
    """The dense model: ``cifar_resnet`` (built in) or any MODEL string of ``tieify report``."""

    name: str = "cifar_resnet"
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Epochs that train the dense baseline from scratch (0: use the weights as built).
    pretrain_epochs: int = 0
    #: Optional checkpoint (``state_dict``) to start from instead of pretraining.
    checkpoint: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split."""

    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int = 16
    val_fraction: float = 0.2
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning of every candidate (and of the dense baseline, for a fair drop)."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 2
    max_steps_per_epoch: int | None = None
    label_smoothing: float = 0.0
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    seed: int = 0
    threads: int | None = None


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is obtained: measured (the fastest of timed rounds), or predicted.

    ``mode``: ``measured`` times every candidate; ``predicted`` asks
    :func:`tieify.predict_latency` (a per-layer table cached on this machine: the first
    candidates fill it); ``auto`` (the default) predicts when the table is already warm for
    the dense model on this machine (:func:`tieify.latency.is_warm`: an earlier predicted
    search or ``predict_latency`` call filled it) and measures otherwise. A search resolves
    ``auto`` once and records the mode in its baseline (``latency_mode``), so every trial of
    it, Ray workers included, uses the same one.

    ``allocator: tuned`` calls :func:`tieify.tune_allocator` in the process that times (a
    search trial's), so large activations do not page-fault on every forward; ``system``
    times under the allocator as the process has it.

    ``optimize: true`` runs :func:`tieify.optimize` on each candidate with the latency
    input before timing or predicting it (each tied layer on its fastest measured path and,
    for the NCHW input, the tied layers in channels-last where the model runs faster so):
    the latency of the candidate as deployed after ``optimize``, at the cost of its
    timings (cached per layer configuration, so later candidates mostly reuse them). The
    dense model the candidates are compared with is optimized too: its inputs made
    channels-last at its entry where that is faster.
    """

    mode: str = "auto"
    batch_size: int = 1
    threads: int = 1
    repeats: int = 20
    warmup: int = 3
    allocator: str = "tuned"
    optimize: bool = False


@dataclass(frozen=True)
class Budgets:
    """Constraints a candidate must meet to be feasible (``None``: no budget)."""

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    #: Latency over the dense model's (0.5: at most half its time), timed side by side.
    max_latency_ratio: float | None = None
    max_params: int | None = None
    max_macs: int | None = None


@dataclass(frozen=True)
class SearchConfig:
    """Space, sampler, objectives and trial budget."""

    space: str = "per_stage"
    choices: tuple[int, ...] = (1, 2, 4, 8)
    objectives: tuple[str, ...] = ("accuracy", "latency_ms", "params")
    sampler: str = "nsga2"
    population_size: int = 8
    pruner: str = "median"
    trials: int = 20
    timeout: float | None = None
    seed: int = 0
    save_weights: bool = True


@dataclass(frozen=True)
class Recipe:
    """A validated search recipe (see ``recipes/default.yaml`` for a commented example)."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    budgets: Budgets = field(default_factory=Budgets)
    search: SearchConfig = field(default_factory=SearchConfig)
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/YAML serializable), accepted back by :func:`recipe_from_dict`."""
        out = dataclasses.asdict(self)
        out["search"]["choices"] = list(self.search.choices)
        out["search"]["objectives"] = list(self.search.objectives)
        return out

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.search.objectives]


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "latency": LatencyConfig,
    "budgets": Budgets,
    "search": SearchConfig,
}


# --------------------------------------------------------------------------------------------
# Type checking of plain values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except RecipeError:
                continue
        raise _type_error(key, value, tp)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp)
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp)
    return value  # pragma: no cover - every field type is handled above


def _type_error(key: str, value: Any, tp: Any) -> RecipeError:
    return RecipeError(
        f"recipe key {key!r} must be {_type_name(tp)}, but got {value!r} ({type(value).__name__})."
    )


def _section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe key {name!r} must be a mapping of settings, but got {raw!r}; allowed keys: "
            f"{', '.join(f.name for f in dataclasses.fields(cls))}."
        )
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in allowed:
            raise RecipeError(
                f"unknown recipe key {name}.{key} (value {value!r}); allowed keys in {name!r}: "
                f"{', '.join(allowed)}."
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(
            f"recipe key {key!r} must be one of {', '.join(allowed)}, but got {value!r}."
        )


def _positive(key: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"recipe key {key!r} must be {bound}, but got {value!r}.")


def _fraction(key: str, value: float | None, *, closed: bool = True) -> None:
    if value is None:
        return
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        rng = "[0, 1]" if closed else "(0, 1)"
        raise RecipeError(
            f"recipe key {key!r} must lie in {rng} (a fraction, not a percentage), "
            f"but got {value!r}."
        )


def _validate(r: Recipe, base_dir: Path | None) -> None:
    d, t, lat, b, s = r.data, r.train, r.latency, r.budgets, r.search
    _one_of("data.dataset", d.dataset, DATASETS)
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("latency.mode", lat.mode, LATENCY_MODES)
    _one_of("latency.allocator", lat.allocator, ALLOCATORS)
    _one_of("search.sampler", s.sampler, SAMPLERS)
    _one_of("search.pruner", s.pruner, PRUNERS)
    for key, value in (
        ("data.image_size", d.image_size),
        ("data.batch_size", d.batch_size),
        ("data.max_train_samples", d.max_train_samples),
        ("data.max_val_samples", d.max_val_samples),
        ("train.lr", t.lr),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch),
        ("train.kd_temperature", t.kd_temperature),
        ("train.threads", t.threads),
        ("latency.batch_size", lat.batch_size),
        ("latency.threads", lat.threads),
        ("latency.repeats", lat.repeats),
        ("search.population_size", s.population_size),
        ("search.trials", s.trials),
        ("search.timeout", s.timeout),
        ("budgets.max_latency_ms", b.max_latency_ms),
        ("budgets.max_latency_ratio", b.max_latency_ratio),
        ("budgets.max_params", b.max_params),
        ("budgets.max_macs", b.max_macs),
    ):
        _positive(key, value)
    for key, value in (
        ("model.pretrain_epochs", r.model.pretrain_epochs),
        ("train.epochs", t.epochs),
        ("train.momentum", t.momentum),
        ("train.weight_decay", t.weight_decay),
        ("latency.warmup", lat.warmup),
    ):
        _positive(key, value, allow_zero=True)
    _fraction("data.val_fraction", d.val_fraction, closed=False)
    _fraction("train.label_smoothing", t.label_smoothing)
    _fraction("train.kd_alpha", t.kd_alpha)
    _fraction("budgets.min_accuracy", b.min_accuracy)
    _fraction("budgets.max_accuracy_drop", b.max_accuracy_drop)
    if b.max_latency_ratio is not None and b.max_latency_ratio > MAX_LATENCY_RATIO:
        raise RecipeError(
            f"recipe key 'budgets.max_latency_ratio' is a candidate's latency over the dense "
            f"model's (0.5: at most half its time) and must lie in (0, {MAX_LATENCY_RATIO:g}], "
            f"but got {b.max_latency_ratio!r}; a percentage? Write 0.5 for 50%."
        )
    if s.population_size < 2 and s.sampler == "nsga2":
        raise RecipeError(
            f"recipe key 'search.population_size' must be >= 2 for NSGA-II, "
            f"but got {s.population_size}."
        )
    if not s.choices or any(c < 1 for c in s.choices):
        raise RecipeError(
            f"recipe key 'search.choices' must be a non-empty list of integers >= 1, "
            f"but got {list(s.choices)!r}; e.g. [1, 2, 4, 8]."
        )
    if not s.objectives or len(set(s.objectives)) != len(s.objectives):
        raise RecipeError(
            f"recipe key 'search.objectives' must be a non-empty list without repeats of "
            f"{', '.join(OBJECTIVES)}, but got {list(s.objectives)!r}."
        )
    for o in s.objectives:
        _one_of("search.objectives", o, tuple(OBJECTIVES))
    if (
        (b.max_accuracy_drop is not None or b.min_accuracy is not None)
        and t.epochs == 0
        and (r.model.pretrain_epochs == 0 and r.model.checkpoint is None)
    ):
        raise RecipeError(
            "accuracy budgets need a trained model, but got train.epochs=0, "
            "model.pretrain_epochs=0 and no model.checkpoint; set one of them."
        )
    if d.dataset == "imagefolder":
        if d.root is None:
            raise RecipeError(
                "recipe key 'data.root' must name a folder with train/ and val/ "
                "(ImageFolder layout) for dataset 'imagefolder', but got None."
            )
        root = _resolve_path(d.root, base_dir)
        if not (root / "train").is_dir():
            raise RecipeError(
                f"recipe key 'data.root' = {d.root!r}: {root / 'train'} is not a folder; "
                "ImageFolder data needs ROOT/train/<class>/<image> (and optionally ROOT/val/)."
            )
    if d.dataset in ("cifar10", "cifar100"):
        folder = "cifar-10-batches-py" if d.dataset == "cifar10" else "cifar-100-python"
        root = _resolve_path(d.root or "data", base_dir)
        if not d.download and not (root / folder).is_dir():
            raise RecipeError(
                f"recipe key 'data.root' = {d.root!r}: {root / folder} does not exist and "
                "data.download is false; set data.download: true (needs network) or point "
                "data.root at a folder holding it."
            )
    sp = s.space
    if sp not in BUILTIN_SPACES and not sp.endswith((".yaml", ".yml")) and ":" not in sp:
        raise RecipeError(
            f"recipe key 'search.space' must be one of {', '.join(BUILTIN_SPACES)}, a YAML file "
            f"or a Python callable 'module:function', but got {sp!r}."
        )
    if sp.endswith((".yaml", ".yml")) and not _resolve_path(sp, base_dir).is_file():
        raise RecipeError(f"recipe key 'search.space' = {sp!r}: no such YAML file.")
    if r.model.checkpoint is not None:
        ckpt = _resolve_path(r.model.checkpoint, base_dir)
        if not ckpt.is_file():
            raise RecipeError(
                f"recipe key 'model.checkpoint' = {r.model.checkpoint!r}: no such file ({ckpt})."
            )


def _resolve_path(path: str, base_dir: Path | None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and base_dir is not None and not p.exists():
        candidate = base_dir / p
        if candidate.exists():
            return candidate
    return p


def recipe_from_dict(raw: Any, *, base_dir: str | os.PathLike[str] | None = None) -> Recipe:
    """Validate a plain mapping into a :class:`Recipe`.

    Args:
        raw: Mapping with optional keys ``name``, ``model``, ``data``, ``train``, ``latency``,
            ``budgets``, ``search`` (and ``version``).
        base_dir: Folder that relative data paths are also looked up in (the recipe's folder).

    Raises:
        RecipeError: unknown key, wrong type, impossible value or missing path.

    Example:
        >>> recipe_from_dict({"search": {"trials": 4}}).search.trials
        4
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, but got {type(raw).__name__}.")
    allowed = ["name", "version", *_SECTIONS]
    for key, value in raw.items():
        if key not in allowed:
            raise RecipeError(
                f"unknown recipe key {key!r} (value {value!r}); allowed top-level keys: "
                f"{', '.join(allowed)}."
            )
    version = raw.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(
            f"recipe key 'version' must be {RECIPE_VERSION}, but got {version!r}; this tieify "
            "reads recipe format version 1."
        )
    name = raw.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"recipe key 'name' must be a non-empty string, but got {name!r}.")
    sections = {k: _section(k, cls, raw.get(k)) for k, cls in _SECTIONS.items()}
    recipe = Recipe(name=name, **sections)
    base = Path(base_dir) if base_dir is not None else None
    _validate(recipe, base)
    return _absolute_paths(recipe, base)


def _absolute_paths(recipe: Recipe, base: Path | None) -> Recipe:
    """Paths found relative to the recipe's folder become absolute (the recipe may move)."""
    if base is None:
        return recipe
    data, model = recipe.data, recipe.model
    if data.root is not None and not Path(data.root).exists():
        candidate = _resolve_path(data.root, base)
        if candidate.exists():
            data = dataclasses.replace(data, root=str(candidate.resolve()))
    if model.checkpoint is not None:
        model = dataclasses.replace(
            model, checkpoint=str(_resolve_path(model.checkpoint, base).resolve())
        )
    return dataclasses.replace(recipe, data=data, model=model)


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``tieify.recipes`` (``recipes/`` in the repository)."""
    return _packaged.names("tieify.recipes")


def _read_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {where} is not valid YAML: {exc}") from None


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and "." not in key:
            section = out.setdefault(key, {})
            if not isinstance(section, dict):
                section = out[key] = {}
            section.update(value)
            continue
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = value
            continue
        if len(parts) != 2:
            raise RecipeError(
                f"override key {key!r} must be 'section.key' (e.g. 'budgets.max_params'), "
                f"got {len(parts)} parts."
            )
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            section = out[parts[0]] = {}
        section[parts[1]] = value
    return out


def load_recipe(
    name_or_path: str | os.PathLike[str] | Recipe | None = None,
    overrides: dict[str, Any] | None = None,
) -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path, apply overrides, validate.

    Args:
        name_or_path: ``None``/``"default"``, another built-in name, a YAML path, or a
            :class:`Recipe` (re-validated with the overrides).
        overrides: ``{"section.key": value}`` or ``{"section": {...}}``; ``None`` values are
            ignored (convenient for unset CLI flags).

    Returns:
        The validated recipe.

    Raises:
        RecipeError: unknown recipe name or file, bad YAML, or any validation error.

    Example:
        >>> load_recipe("default", {"search.trials": 3}).search.trials
        3
    """
    overrides = dict(overrides or {})
    base_dir: Path | None = None
    if isinstance(name_or_path, Recipe):
        raw: Any = name_or_path.to_dict()
    else:
        spec = "default" if name_or_path is None else os.fspath(name_or_path)
        path = Path(os.path.expanduser(spec))
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise RecipeError(f"recipe file {spec!r} does not exist.")
            raw = _read_yaml(path.read_text(), repr(spec))
            base_dir = path.resolve().parent
        else:
            text = _packaged.read("tieify.recipes", spec)
            if text is None:
                raise RecipeError(
                    f"unknown recipe {spec!r}: not a file and not a built-in recipe; built-in "
                    f"recipes: {', '.join(builtin_recipes())}."
                )
            raw = _read_yaml(text, repr(spec))
            raw = raw if raw is not None else {}
            if isinstance(raw, dict):
                raw.setdefault("name", spec)
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(
            f"recipe {name_or_path!r} must hold a mapping of sections, got {type(raw).__name__}."
        )
    raw = _apply_overrides(raw or {}, overrides)
    return recipe_from_dict(raw, base_dir=base_dir)
