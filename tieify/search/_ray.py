"""Ray Tune backend for ``tieify search``: the embedded Optuna study, run on a Ray cluster.

The search is the embedded one (same recipe, same :class:`Evaluator`, same Optuna sampler and
the same study store); Ray Tune only decides *where* and *when* each trial runs:

- Candidates come from Optuna through Ray's ``OptunaSearch`` (subclassed in
  :mod:`._ray_searcher`, which runs on the driver; the trials run :func:`._ray_trial.run_trial`
  on the workers). The study's
  sampler is the one :func:`make_sampler` builds, asked through a define-by-run function that is
  :meth:`Evaluator.suggest_params`, so the same seed proposes the same first candidates as the
  embedded backend.
- Ray's ``OptunaSearch`` tells Optuna the objective values only. Budgets are constraints
  (``trial.set_constraint``), metrics and plan are trial attributes; the searcher here writes all
  of them before ``study.tell``, so the study store holds what the embedded backend writes and
  :func:`write_results`, ``--resume`` and optuna-dashboard read it the same way.
- Fault tolerance: a trial whose worker dies is retried by ``FailureConfig(max_failures)`` (the
  Optuna trial stays the same; it is told once). A search interrupted as a whole resumes with
  ``Tuner.restore`` from ``<out>/ray``; a restored trial that had already been told to the
  store reports its stored result instead of training again, so no trial runs twice, and trials
  the driver asked Optuna for but Tune never recorded are marked failed ("interrupted").
- Ray is imported lazily; without it ``backend="ray"`` raises :class:`SearchError`.

Each trial appends ``start``/``done`` lines (trial number, pid, host, Ray node) to
``<out>/ray_trials.jsonl`` so users can see which worker ran what (on a multi-node cluster
this needs ``out_dir`` on shared storage, like the journal file itself).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieify._errors import SearchError

from ._ray_trial import ACCURACY_KEY, EVENTS_FILE, run_trial, store_ref

if TYPE_CHECKING:  # pragma: no cover
    import optuna

logger = logging.getLogger("tieify.search")


__all__ = ["run_ray", "EVENTS_FILE", "EXPERIMENT_DIR"]

#: Ray Tune's experiment directory inside ``out_dir`` (what ``Tuner.restore`` reads).
EXPERIMENT_DIR = "ray"


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import tune
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SearchError(
            "backend='ray' needs Ray Tune, which is not installed "
            f"({exc.__class__.__name__}: {exc}); install it with: pip install 'tieify[ray]'"
        ) from None
    return ray, tune


# --------------------------------------------------------------------------------------------
# Entry point


def _check_args(
    trials: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_concurrent: int | None,
    max_failures: int,
) -> None:
    if not isinstance(trials, int) or trials < 1:
        raise SearchError(f"trials must be an integer >= 1, got trials={trials!r}")
    if not cpus_per_trial > 0:
        raise SearchError(
            f"cpus_per_trial must be > 0 (Ray needs a CPU to run a trial), got {cpus_per_trial!r}"
        )
    if not gpus_per_trial >= 0:
        raise SearchError(f"gpus_per_trial must be >= 0, got {gpus_per_trial!r}")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise SearchError(
            f"max_concurrent must be None (as many as fit) or an integer >= 1, "
            f"got {max_concurrent!r}"
        )
    if not isinstance(max_failures, int) or max_failures < -1:
        raise SearchError(
            f"max_failures must be an integer >= 0 (or -1 for unlimited retries), "
            f"got {max_failures!r}"
        )


def run_ray(
    recipe: Any,
    evaluator_factory: Callable[[], Any],
    *,
    out_dir: str | os.PathLike[str],
    trials: int,
    timeout: float | None,
    storage: Any,
    resume: bool,
    seed: int | None,
    ray_address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_concurrent: int | None = None,
    max_failures: int = 2,
    study_name: str | None = None,
) -> optuna.Study:
    """Run the search's trials on Ray Tune; the study store ends up as the embedded backend's.

    Args:
        recipe: The validated recipe.
        evaluator_factory: Zero-argument, picklable callable that builds the Evaluator; called
            once on the driver (for the search space and budgets) and once per Ray worker
            process (reused across the trials that process runs).
        out_dir: Output folder: study journal (default store), Ray Tune's experiment
            (``<out>/ray``) and ``ray_trials.jsonl``. Must be on shared storage for multi-node
            clusters that use the default journal store.
        trials: Number of trials the study should hold (trials already in a resumed store
            count).
        timeout: Seconds after which no new trial starts (running ones finish, as in the
            embedded backend), or None.
        storage: Optuna storage URL/path, or None for ``<out>/study.journal``.
        resume: Continue the study (and Ray Tune's experiment, when one was saved).
        seed: Sampler seed (same seed as the embedded backend: same first candidates).
        ray_address: ``None`` starts Ray locally; ``"auto"`` or ``"host:port"`` joins a
            cluster.
        cpus_per_trial: CPUs Ray reserves for each trial.
        gpus_per_trial: GPUs Ray reserves for each trial (fractions allowed).
        max_concurrent: Most trials running at once (None: as many as resources allow).
        max_failures: Retries of a trial whose worker dies or raises (-1: unlimited).
        study_name: Study name; None lets ``open_study`` choose (as the embedded backend).

    Returns:
        The Optuna study, reloaded from its store after Ray Tune finished.

    Example:
        >>> from tieify.search import load_recipe, search  # doctest: +SKIP
        >>> search(load_recipe("default", {}), backend="ray", out_dir="runs/r", trials=8,
        ...        max_concurrent=2)  # doctest: +SKIP
    """
    _check_args(trials, cpus_per_trial, gpus_per_trial, max_concurrent, max_failures)
    ray, tune = _import_ray()
    from tieify.search import _ray_searcher
    from tieify.search._results import SearchProgress
    from tieify.search._study import counted_trials, make_sampler, open_study

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / EXPERIMENT_DIR
    if storage is None:  # Ray needs a store the workers and a restarted driver can reopen
        storage = str(out / "study.journal")
    study = open_study(recipe, storage, study_name, resume)
    store = store_ref(study, storage)
    evaluator = evaluator_factory()
    single = len(evaluator.directions) == 1
    restoring = resume and _restorable(tune, exp_path)
    if not restoring and exp_path.exists() and any(exp_path.iterdir()):
        if not resume:
            raise SearchError(
                f"{exp_path} already holds a Ray Tune experiment; pass --resume to continue "
                "it or choose another --out"
            )
    if not restoring:
        _ray_searcher.mark_orphans(study, keep=set())

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_ray = not ray.is_initialized()
    if started_ray:
        kwargs: dict[str, Any] = {"address": ray_address}
        if ray_address is None:
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)

    sampler = make_sampler(recipe, seed)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            evaluator_factory=evaluator_factory,
            store=store,
            out_dir=str(out),
            save_weights=bool(recipe.search.save_weights),
            token=f"{store.study_name}@{store.journal or store.url}",
        ),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    study.set_user_attr("baseline", dict(evaluator.baseline))
    study.set_user_attr("constraint_names", list(evaluator.constraint_names))
    progress = SearchProgress(study, evaluator, trials, enabled=False)
    driver = _ray_searcher.Driver(
        evaluator=evaluator, study=study, n_trials=trials, progress=progress, timeout=timeout
    )
    try:
        with _ray_searcher.attached(driver):
            if restoring:
                logger.info("resuming Ray Tune experiment %s", exp_path)
                tune.Tuner.restore(
                    str(exp_path), trainable, resume_unfinished=True, resume_errored=False
                ).fit()
            # A fresh Tune run asks for the trials the study still lacks: a new search, or a
            # resumed one whose Tune experiment had nothing left to run (ended by its timeout,
            # or a larger --trials than before).
            if counted_trials(study) < trials and not driver.expired():
                _fresh_tuner(
                    tune,
                    trainable,
                    _ray_searcher.TieifyOptunaSearch(sampler, single_objective=single),
                    exp_path=exp_path,
                    trials=trials,
                    asha=single and recipe.search.pruner != "none",
                    max_concurrent=max_concurrent,
                    max_failures=max_failures,
                ).fit()
    finally:
        if started_ray:
            ray.shutdown()
    return store.load()


def _fresh_tuner(
    tune: Any,
    trainable: Any,
    searcher: Any,
    *,
    exp_path: Path,
    trials: int,
    asha: bool,
    max_concurrent: int | None,
    max_failures: int,
) -> Any:
    """A new Tune experiment in ``exp_path`` (a previous one there is kept beside it)."""
    if exp_path.exists():
        kept = exp_path.with_name(f"{exp_path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        exp_path.rename(kept)
        logger.info("kept the previous Tune experiment in %s", kept)
    scheduler = None
    if asha:  # single objective: early stopping on intermediate accuracy
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            metric=ACCURACY_KEY, mode="max", grace_period=1, reduction_factor=2
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=trials,  # an upper bound: the searcher stops at the study's count
            max_concurrent_trials=max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=exp_path.name,
            storage_path=str(exp_path.parent),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=0,
        ),
    )


def _restorable(tune: Any, exp_path: Path) -> bool:
    """Whether ``exp_path`` holds a Tune experiment with at least one recorded trial.

    A driver killed before Tune recorded any trial leaves a state ``Tuner.restore`` cannot
    resume; the search then starts a fresh Tune run on the same study.
    """
    if not tune.Tuner.can_restore(str(exp_path)):
        return False
    states = sorted(exp_path.glob("experiment_state-*.json"))
    if not states:
        return False
    try:
        return bool(json.loads(states[-1].read_text()).get("trial_data"))
    except (OSError, ValueError):
        return False


def _trial_dirname(trial: Any) -> str:
    number = trial.config.get("number")
    return f"trial_{number}_{trial.trial_id}" if number is not None else trial.trial_id
