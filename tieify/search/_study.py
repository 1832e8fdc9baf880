"""The embedded Optuna engine: sampler, study store and the ask/tell loop.

- Sampler: NSGA-II (default) or TPE, seeded; multi-objective when the recipe lists several
  objectives. Budgets reach Optuna as constraints through ``trial.set_constraint`` before
  ``tell`` (Optuna 5's way; ``constraints_func`` is deprecated), so NSGA-II and TPE use
  constrained domination and the store says which trials are feasible.
- Pruning: Optuna pruners only support single-objective studies; with one objective a
  ``MedianPruner`` stops trials on intermediate (per-epoch) accuracy, with several the trials
  run to the end.
- Store: an Optuna ``JournalStorage`` file (``<out>/study.journal`` by default) or any storage
  URL. Each trial is told as soon as it ends, so a killed search loses at most the trial in
  flight; ``resume=True`` marks that trial failed ("interrupted") and runs the remaining ones.
- A trial whose plan cannot be built or whose training diverges is told ``FAIL`` with its
  ``failed_reason`` user attribute; the study goes on.

Example:
    >>> from tieify.search import load_recipe
    >>> study = open_study(load_recipe("default", {}), None, "demo", False)
    >>> study.directions[0].name
    'MAXIMIZE'
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SearchError
from ._recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "make_sampler",
    "make_pruner",
    "open_study",
    "run_study",
    "record",
    "counted_trials",
    "reusable_metrics",
    "INTERRUPTED",
    "interrupted",
]

logger = logging.getLogger("tieify.search")

#: ``failed_reason`` of a trial that was running when the search process died.
INTERRUPTED = "interrupted: the search process stopped while this trial ran; it was not finished"


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C, or an error raised while one was being handled.

    A Ctrl-C that lands in a library's cleanup can surface as that cleanup's own error:
    Optuna's journal-file lock, interrupted inside its release, retries the removal of a
    file already gone and raises ``FileNotFoundError`` with the ``KeyboardInterrupt`` as its
    context. Such an error is the user's interrupt, not a failure of the trial or the study.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__context__
    return False


def make_sampler(recipe: Recipe, seed: int | None) -> optuna.samplers.BaseSampler:
    """The recipe's sampler (NSGA-II or TPE), seeded with ``seed`` (or ``search.seed``).

    Example:
        >>> from tieify.search import load_recipe
        >>> type(make_sampler(load_recipe("default", {}), 0)).__name__
        'NSGAIISampler'
    """
    import optuna

    s = recipe.search
    seed = s.seed if seed is None else seed
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, s.population_size))


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    """``MedianPruner`` for single-objective recipes with ``pruner: median``; else none."""
    import optuna

    if recipe.search.pruner == "median" and len(recipe.search.objectives) == 1:
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def storage_for(storage: Any) -> Any:
    """An Optuna storage for ``None`` (in memory), a URL (``scheme://``), or a journal path."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None or not isinstance(storage, (str, os.PathLike)):
        return storage
    text = os.fspath(storage)
    if "://" in text:
        try:
            return optuna.storages.get_storage(text)
        except Exception as exc:
            raise SearchError(
                f"storage {text!r} cannot be opened ({type(exc).__name__}: {exc}); pass an "
                "Optuna storage URL (sqlite:///PATH, postgresql://...) or a journal file path."
            ) from None
    path = Path(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(recipe: Recipe, storage: Any, study_name: str | None, resume: bool) -> optuna.Study:
    """Create the study, or load it from the store when ``resume`` is set.

    Args:
        recipe: The validated recipe (directions, sampler, pruner).
        storage: ``None`` (in memory), an Optuna storage URL, a journal file path, or a storage
            object.
        study_name: Name in the store; ``None`` uses ``tieify-<recipe name>``.
        resume: Continue an existing study of that name. Without it, a store that already holds
            trials of that study is an error (nothing is overwritten).

    Raises:
        SearchError: existing study without ``resume``, or a stored study whose objectives
            differ from the recipe's.
    """
    import optuna

    store = storage_for(storage)
    name = study_name or f"tieify-{recipe.name}"
    sampler = make_sampler(recipe, None)
    pruner = make_pruner(recipe)
    existing = []
    if store is not None:
        existing = [s.study_name for s in optuna.study.get_all_study_summaries(store)]
    if name in existing:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        n = len(study.get_trials(deepcopy=False))
        if not resume and n:
            where = storage if isinstance(storage, (str, os.PathLike)) else "the storage"
            raise SearchError(
                f"{os.fspath(where) if isinstance(where, os.PathLike) else where} already holds "
                f"study {name!r} with {n} trial(s); pass --resume (resume=True) to continue it, "
                "or choose another --out / --storage for a new search."
            )
        stored = study.user_attrs.get("objectives")
        if stored is not None and list(stored) != list(recipe.search.objectives):
            raise SearchError(
                f"study {name!r} optimizes {stored}, but the recipe asks for "
                f"{list(recipe.search.objectives)}; resume with the same recipe or use another "
                "--out."
            )
    else:
        study = optuna.create_study(
            storage=store,
            study_name=name,
            directions=recipe.directions,  # type: ignore[arg-type]
            sampler=sampler,
            pruner=pruner,
        )
    study.set_user_attr("objectives", list(recipe.search.objectives))
    study.set_user_attr("recipe", recipe.to_dict())
    return study


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards the requested number (all but interrupted ones)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if not str(t.user_attrs.get("failed_reason", "")).startswith("interrupted")
    )


def mark_interrupted(study: optuna.Study, keep: Collection[int] = ()) -> list[int]:
    """Tell ``FAIL`` (reason :data:`INTERRUPTED`) to trials left running by a killed process.

    Args:
        study: the study.
        keep: numbers of RUNNING trials that are still owned by a live worker.
    """
    import optuna

    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number in keep:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "failed_reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        numbers.append(t.number)
    if numbers:
        logger.warning("trials %s were running when the search stopped; marked failed", numbers)
    return numbers


def record(study: optuna.Study, trial: Any, metrics: Mapping[str, Any], evaluator: Any) -> str:
    """Store a trial's metrics and constraints, then tell Optuna; returns the final state name."""
    from optuna.trial import TrialState

    for key, value in metrics.items():
        trial.set_user_attr(key, _plain(value))
    if metrics.get("failed_reason"):
        study.tell(trial, state=TrialState.FAIL)
        return "FAIL"
    if metrics.get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED"
    values = list(evaluator.objectives(metrics))
    if not all(math.isfinite(v) for v in values):
        trial.set_user_attr("failed_reason", f"non-finite objective values {values}")
        study.tell(trial, state=TrialState.FAIL)
        return "FAIL"
    for i, value in enumerate(evaluator.constraints(metrics)):
        trial.set_constraint(f"c{i}", float(value))
    study.tell(trial, values)
    return "COMPLETE"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def reusable_metrics(previous: Any) -> dict[str, Any]:
    """Metrics of an earlier trial for a new trial with the same parameters (same keys)."""
    metrics = dict(previous.user_attrs)
    metrics["seconds"] = 0.0
    return metrics


def same_params(study: optuna.Study, params: Mapping[str, Any]) -> Any:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == dict(params) and "accuracy" in t.user_attrs:
            return t
    return None


def run_study(
    study: optuna.Study,
    evaluator: Any,
    *,
    trials: int,
    timeout: float | None = None,
    out_dir: str | Path | None = None,
    save_weights: bool = True,
    progress: bool = True,
    on_trial: Callable[[Any, Mapping[str, Any], str], None] | None = None,
) -> optuna.Study:
    """Run trials until the study holds ``trials`` counted trials (or ``timeout`` seconds pass).

    A candidate whose parameters equal an earlier completed trial's reuses that trial's
    metrics (training is deterministic given the seed), which the log line says.
    """
    from ._results import SearchProgress

    mark_interrupted(study)
    single = len(study.directions) == 1
    start = time.monotonic()
    with SearchProgress(study, evaluator, trials, enabled=progress) as bar:
        while counted_trials(study) < trials:
            if timeout is not None and time.monotonic() - start >= timeout:
                logger.warning("timeout of %.0f s reached; stopping the search", timeout)
                break
            trial = study.ask()
            params = evaluator.suggest_params(trial)
            previous = same_params(study, params)
            if previous is not None:  # deterministic training: same parameters, same result
                metrics = reusable_metrics(previous)
                _copy_weights(out_dir, previous.number, trial.number)
                bar.note(
                    f"trial {trial.number}: same parameters as trial {previous.number}; "
                    "its metrics are reused"
                )
            else:
                metrics = _evaluate(trial, evaluator, params, single, out_dir, save_weights)
            state = record(study, trial, metrics, evaluator)
            bar.trial_done(trial, params, metrics, state)
            if on_trial is not None:
                on_trial(trial, metrics, state)
    return study


def _copy_weights(out_dir: str | Path | None, src: int, dst: int) -> None:
    if out_dir is None:
        return
    path = Path(out_dir) / "trials" / f"{src}.pt"
    if path.is_file():
        import shutil

        shutil.copyfile(path, path.with_name(f"{dst}.pt"))


def _evaluate(
    trial: Any,
    evaluator: Any,
    params: Mapping[str, Any],
    single: bool,
    out_dir: str | Path | None,
    save_weights: bool,
) -> dict[str, Any]:
    from optuna.trial import TrialState

    def report(step: int, accuracy: float) -> bool:
        if not single:
            return False
        trial.report(accuracy, step)
        return bool(trial.should_prune())

    weights = None
    if save_weights and out_dir is not None:
        weights = Path(out_dir) / "trials" / f"{trial.number}.pt"
    try:
        return dict(evaluator.evaluate(params, report, weights_path=weights))
    except BaseException as exc:
        if not interrupted(exc):
            if not isinstance(exc, Exception):  # SystemExit and the like pass through
                raise
            logger.debug("trial %d raised", trial.number, exc_info=True)
            return {"failed_reason": f"error: {type(exc).__name__}: {exc}"}  # this trial only
        trial.set_user_attr("failed_reason", INTERRUPTED)
        trial.study.tell(trial, state=TrialState.FAIL)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from exc
