"""Ray Tune backend for ``tieify search``: the embedded Optuna study, run on a Ray cluster.

The search is the embedded one (same recipe, same :class:`Evaluator`, same Optuna sampler and
the same study store); Ray Tune only decides *where* and *when* each trial runs:

- Candidates come from Optuna through Ray's ``OptunaSearch`` (subclassed here): the study's
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

Each trial appends ``start``/``done`` lines (trial number, pid, node) to
``<out>/ray_trials.jsonl`` so users can see which worker ran what (on a multi-node cluster
this needs ``out_dir`` on shared storage, like the journal file itself).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieify._errors import SearchError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["run_ray", "EVENTS_FILE", "EXPERIMENT_DIR"]

logger = logging.getLogger("tieify.search")

#: Ray Tune's experiment directory inside ``out_dir`` (what ``Tuner.restore`` reads).
EXPERIMENT_DIR = "ray"
#: One JSON line per trial start / end, written by the workers.
EVENTS_FILE = "ray_trials.jsonl"
_ACCURACY_KEY = "accuracy_so_far"
_RESULT_KEY = "tieify_metrics"


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
# Study store, as seen from the driver and from the workers


@dataclass(frozen=True)
class _StoreRef:
    """Where the study lives, in a form that pickles to workers.

    ``url`` is an Optuna storage URL or ``None`` for the journal file ``journal``.
    """

    study_name: str
    url: str | None
    journal: str | None

    def reachable(self) -> bool:
        """Whether this process can see the store without creating it (shared-storage check)."""
        if self.journal is not None:
            return os.path.exists(self.journal)
        if self.url is not None and self.url.startswith("sqlite:///"):
            return os.path.exists(self.url[len("sqlite:///") :])
        return self.url is not None

    def storage(self) -> Any:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        if self.journal is not None:
            return JournalStorage(JournalFileBackend(self.journal))
        return optuna.storages.get_storage(self.url)

    def load(self) -> optuna.Study:
        import optuna

        return optuna.load_study(study_name=self.study_name, storage=self.storage())


def _store_ref(study: optuna.Study, storage: Any) -> _StoreRef:
    """How workers reopen the study: a journal file path or a storage URL."""
    if isinstance(storage, (str, os.PathLike)):
        text = os.fspath(storage)
        if "://" in text:
            return _StoreRef(study.study_name, text, None)
        return _StoreRef(study.study_name, None, os.path.abspath(text))
    backend: Any = getattr(study._storage, "_backend", None)
    journal = getattr(backend, "_file_path", None)
    if isinstance(journal, str):
        return _StoreRef(study.study_name, None, os.path.abspath(journal))
    url = getattr(study._storage, "url", None)
    if isinstance(url, str):
        return _StoreRef(study.study_name, url, None)
    raise SearchError(
        "backend='ray' needs a study store that Ray workers can reopen: the default journal "
        f"file in out_dir, a journal path or an Optuna storage URL; got storage={storage!r} "
        f"({type(study._storage).__name__}). Pass --storage sqlite:///PATH or a journal path."
    )


# --------------------------------------------------------------------------------------------
# Driver context (the searcher is pickled by Tune; heavy objects stay here)


@dataclass
class _Driver:
    evaluator: Any
    study: optuna.Study
    n_trials: int
    progress: Any  # _results.SearchProgress: one log line per finished trial
    deadline: float | None = None  # time.monotonic() after which no new trial starts

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


_DRIVER: _Driver | None = None


def _driver() -> _Driver:
    if _DRIVER is None:  # pragma: no cover - internal invariant
        raise SearchError("the Ray searcher was used outside tieify.search._ray.run_ray")
    return _DRIVER


def _mark_orphans(study: optuna.Study, keep: set[int]) -> list[int]:
    """Fail RUNNING trials that no live Tune trial owns (asked by a killed driver, never run).

    Same reason text as the embedded backend's interrupted trials, so both backends count
    trials alike (:func:`counted_trials` leaves them out).
    """
    import optuna

    from tieify.search._study import INTERRUPTED

    orphans = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number in keep:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "failed_reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        orphans.append(t.number)
    if orphans:
        logger.warning("trials %s were running when the search stopped; marked failed", orphans)
    return orphans


def _reusable(study: optuna.Study, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Metrics of an earlier completed trial with the same parameters (as the embedded loop)."""
    from tieify.search._study import _same_params

    previous = _same_params(study, params)
    if previous is None:
        return None
    metrics = {k: v for k, v in previous.user_attrs.items() if k != "seconds"}
    metrics["reused_from"] = previous.number
    return metrics


# --------------------------------------------------------------------------------------------
# The searcher


def _searcher_class() -> type:
    from optuna.trial import Trial
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from tieify.search._study import counted_trials, record

    class TieifyOptunaSearch(OptunaSearch):  # type: ignore[misc]
        """Ray's OptunaSearch on tieify's study: same sampler, constraints, attributes, store.

        Differences from Ray's class: the study is the one tieify opened (directions, sampler,
        user attributes); the define-by-run space is ``Evaluator.suggest_params``; results are
        recorded with constraints and metrics before ``tell``; intermediate accuracy is reported
        to Optuna only for single-objective studies (Optuna has no multi-objective pruning);
        checkpoints hold trial *numbers*, and the study is reopened from the store on restore.
        """

        def __init__(self, sampler: Any, single_objective: bool) -> None:
            self._tieify_sampler = sampler
            self._single_objective = single_objective
            self._numbers: dict[str, int] = {}
            super().__init__(
                space=self._space_fn,
                metric=_ACCURACY_KEY,
                mode="max",
                sampler=sampler,
            )

        # Tune pickles the searcher into tuner.pkl and its checkpoints: keep only plain state.
        def __getstate__(self) -> dict[str, Any]:
            return {
                "_tieify_sampler": self._tieify_sampler,
                "_single_objective": self._single_objective,
                "_numbers": dict(self._numbers),
                "_completed_trials": set(self._completed_trials),
                "_metric": self._metric,
                "_mode": self._mode,
            }

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)
            self._space = self._space_fn
            self._sampler = self._tieify_sampler
            self._storage = None
            self._seed = None
            self._points_to_evaluate = []
            self._evaluated_rewards = None
            self._ot_study = None
            self._ot_trials = {}

        def _space_fn(self, trial: Any) -> dict[str, Any]:
            return dict(_driver().evaluator.suggest_params(trial))

        def _setup_study(self, mode: Any) -> None:
            if _DRIVER is None:  # unpickled outside the driver: attach lazily
                self._ot_study = None
                return
            study: Any = _driver().study
            study.sampler = self._tieify_sampler
            self._ot_study = study

        def _study(self) -> Any:
            if self._ot_study is None:
                self._setup_study(self._mode)
            return self._ot_study

        def _trial(self, trial_id: str) -> Any:
            if trial_id not in self._ot_trials:
                study = self._study()
                number = self._numbers[trial_id]
                sid = study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, number
                )
                self._ot_trials[trial_id] = Trial(study, sid)
            return self._ot_trials[trial_id]

        def suggest(self, trial_id: str) -> Any:
            study = self._study()
            if trial_id not in self._numbers:
                driver = _driver()
                if counted_trials(study) >= driver.n_trials:
                    return Searcher.FINISHED
                if driver.expired():  # as the embedded loop: running trials finish
                    logger.warning("timeout reached; no new trials")
                    return Searcher.FINISHED
                ot_trial = study.ask()
                self._ot_trials[trial_id] = ot_trial
                self._numbers[trial_id] = ot_trial.number
            ot_trial = self._trial(trial_id)
            params = self._space_fn(ot_trial)
            return {
                "number": ot_trial.number,
                "params": params,
                "reuse": _reusable(study, params),
            }

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if not self._single_objective or trial_id in self._completed_trials:
                return
            step = result.get("step")
            if result.get("final") or step is None or _ACCURACY_KEY not in result:
                return
            self._trial(trial_id).report(float(result[_ACCURACY_KEY]), int(step))

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            if trial_id in self._completed_trials or trial_id not in self._numbers:
                return
            self._completed_trials.add(trial_id)
            study = self._study()
            ot_trial = self._trial(trial_id)
            state = study._storage.get_trial(ot_trial._trial_id).state
            if state.is_finished():  # told before an interruption; nothing to add
                return
            payload = (result or {}).get(_RESULT_KEY)
            metrics: dict[str, Any]
            if payload:
                metrics = json.loads(payload)
            elif error:
                metrics = {
                    "failed_reason": "Ray trial failed after its retries (worker died or "
                    f"raised); see its error.txt under {EXPERIMENT_DIR}/ or the Ray logs"
                }
            else:  # stopped by the scheduler (ASHA) before its final result
                metrics = {"pruned": True}
                accuracy = (result or {}).get(_ACCURACY_KEY)
                if isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
                    metrics["accuracy"] = float(accuracy)
            driver = _driver()
            state = record(study, ot_trial, metrics, driver.evaluator)
            driver.progress.trial_done(ot_trial, ot_trial.params, metrics, state)

        def save(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "wb") as fh:
                pickle.dump(self.__getstate__(), fh)

        def restore(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "rb") as fh:
                state = pickle.load(fh)
            self.__setstate__(state)
            study = self._study()
            live = {n for t, n in self._numbers.items() if t not in self._completed_trials}
            _mark_orphans(study, keep=live)

    return TieifyOptunaSearch


# --------------------------------------------------------------------------------------------
# The trainable (runs on Ray workers)

_WORKER_EVALUATORS: dict[str, Any] = {}


def _event(path: str, **fields: Any) -> None:
    line = json.dumps({"time": time.time(), **fields}, sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # out_dir not visible on this node: events are best effort
        return
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _already_told(store: _StoreRef, number: int) -> bool:
    """Whether trial ``number`` is already finished in the store (resume after a crash)."""
    if not store.reachable():
        return False
    trials = store.load().get_trials(deepcopy=False)
    return number < len(trials) and trials[number].state.is_finished()


def _run_trial(
    config: dict[str, Any],
    *,
    evaluator_factory: Callable[[], Any],
    store: _StoreRef,
    out_dir: str,
    save_weights: bool,
    token: str,
) -> None:
    """Ray Tune function trainable: one Optuna trial, evaluated on this worker."""
    from ray import tune

    number = int(config["number"])
    params = dict(config["params"])
    events = os.path.join(out_dir, EVENTS_FILE)
    where = {"trial": number, "pid": os.getpid(), "node": socket.gethostname(), "ray_node": ""}
    try:
        import ray

        where["ray_node"] = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # informational only
        pass
    if _already_told(store, number):
        _event(events, event="skip", **where)
        tune.report({"final": 1, _ACCURACY_KEY: float("nan"), "already_told": 1})
        return
    if config.get("reuse"):
        metrics = dict(config["reuse"])
        _event(events, event="reuse", **where)
    else:
        _event(events, event="start", **where)
        evaluator = _WORKER_EVALUATORS.get(token)
        if evaluator is None:
            evaluator = _WORKER_EVALUATORS[token] = evaluator_factory()

        def report(step: int, accuracy: float) -> bool:
            tune.report({_ACCURACY_KEY: float(accuracy), "step": int(step), "final": 0})
            return False  # Tune's scheduler (ASHA) stops the trial itself

        weights = os.path.join(out_dir, "trials", f"{number}.pt") if save_weights else None
        try:
            metrics = dict(evaluator.evaluate(params, report, weights_path=weights))
        except Exception as exc:  # as the embedded loop: an error fails this trial only
            logger.debug("trial %d raised", number, exc_info=True)
            metrics = {"failed_reason": f"error: {type(exc).__name__}: {exc}"}
        _event(events, event="done", **where)
    accuracy = metrics.get("accuracy")
    tune.report(
        {
            "final": 1,
            _ACCURACY_KEY: float(accuracy) if isinstance(accuracy, (int, float)) else math.nan,
            _RESULT_KEY: json.dumps(metrics, default=_json_default),
        }
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


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
    global _DRIVER
    _check_args(trials, cpus_per_trial, gpus_per_trial, max_concurrent, max_failures)
    ray, tune = _import_ray()
    from tieify.search._results import SearchProgress
    from tieify.search._study import counted_trials, make_sampler, open_study

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / EXPERIMENT_DIR
    if storage is None:  # Ray needs a store the workers and a restarted driver can reopen
        storage = str(out / "study.journal")
    study = open_study(recipe, storage, study_name, resume)
    store = _store_ref(study, storage)
    evaluator = evaluator_factory()
    directions = list(evaluator.directions)
    restoring = resume and _restorable(tune, exp_path)
    if not restoring and exp_path.exists() and any(exp_path.iterdir()):
        if not resume:
            raise SearchError(
                f"{exp_path} already holds a Ray Tune experiment; pass --resume to continue "
                "it or choose another --out"
            )
    if not restoring:
        _mark_orphans(study, keep=set())

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
            _run_trial,
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
    deadline = None if timeout is None else time.monotonic() + timeout
    _DRIVER = _Driver(
        evaluator=evaluator, study=study, n_trials=trials, progress=progress, deadline=deadline
    )
    try:
        if restoring:
            logger.info("resuming Ray Tune experiment %s", exp_path)
            tune.Tuner.restore(
                str(exp_path), trainable, resume_unfinished=True, resume_errored=False
            ).fit()
        # A fresh Tune run asks for the trials the study still lacks: a new search, or a resumed
        # one whose Tune experiment had nothing left to run (ended by its timeout, or a larger
        # --trials than before).
        if counted_trials(study) < trials and not _DRIVER.expired():
            if exp_path.exists():
                done = exp_path.with_name(f"{EXPERIMENT_DIR}.{time.strftime('%Y%m%d-%H%M%S')}")
                exp_path.rename(done)
                logger.info("kept the previous Tune experiment in %s", done)
            searcher = _searcher_class()(sampler, single_objective=len(directions) == 1)
            scheduler = None
            if len(directions) == 1 and recipe.search.pruner != "none":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(
                    metric=_ACCURACY_KEY, mode="max", grace_period=1, reduction_factor=2
                )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=trials,  # upper bound; the searcher stops at the study's count
                    max_concurrent_trials=max_concurrent,
                    reuse_actors=True,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_DIR,
                    storage_path=str(out),
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    verbose=0,
                ),
            )
            tuner.fit()
    finally:
        _DRIVER = None
        if started_ray:
            ray.shutdown()
    return store.load()


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
