"""Ray backend, driver side: Ray Tune's ``OptunaSearch`` on tieify's study.

Imports Ray: import this module only once Ray is known to be installed (``_ray.run_ray``).
The searcher class lives at module level so that Tune's pickles (``tuner.pkl``, searcher
checkpoints) refer to it by name instead of copying it with the driver's objects.

Ray's ``OptunaSearch`` tells Optuna the objective values only; this subclass writes what the
embedded backend writes (metrics as user attributes, budgets as constraints through
``trial.set_constraint``, failures and pruning with their reasons) with the embedded
:func:`~tieify.search._study.record`, asks the same sampler through
``Evaluator.suggest_params`` (so the same seed proposes the same candidates), counts trials the
way the embedded loop does, and checkpoints only plain state (trial numbers and the sampler)
so ``Tuner.restore`` reattaches it to the study in its store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.trial import Trial
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from tieify._errors import SearchError

from ._ray_trial import ACCURACY_KEY, RESULT_KEY
from ._study import counted_trials, record

if TYPE_CHECKING:  # pragma: no cover
    import optuna

logger = logging.getLogger("tieify.search")


# --------------------------------------------------------------------------------------------
# Driver context (the searcher is pickled by Tune; heavy objects stay here)


@dataclass
class Driver:
    evaluator: Any
    study: optuna.Study
    n_trials: int
    progress: Any  # _results.SearchProgress: one log line per finished trial
    timeout: float | None = None  # seconds after the first suggestion; then no new trial
    _started: float | None = None

    def expired(self) -> bool:
        """Whether the timeout has passed (the clock starts at the first call, like the
        embedded loop's, which starts when trials start rather than at process start)."""
        if self.timeout is None:
            return False
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return now - self._started >= self.timeout


_DRIVER: Driver | None = None


@contextlib.contextmanager
def attached(driver: Driver) -> Iterator[Driver]:
    """Make ``driver`` the context of searchers built or unpickled in this process."""
    global _DRIVER
    _DRIVER = driver
    try:
        yield driver
    finally:
        _DRIVER = None


def _driver() -> Driver:
    if _DRIVER is None:  # pragma: no cover - internal invariant
        raise SearchError("the Ray searcher was used outside tieify.search._ray.run_ray")
    return _DRIVER


def mark_orphans(study: optuna.Study, keep: set[int]) -> list[int]:
    """Fail RUNNING trials that no live Tune trial owns (asked by a killed driver, never run).

    Same reason text as the embedded backend's interrupted trials, so both backends count
    trials alike (:func:`counted_trials` leaves them out).
    """
    from tieify.search._study import mark_interrupted

    return mark_interrupted(study, keep)


def _reusable(study: optuna.Study, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Metrics of an earlier completed trial with the same parameters (as the embedded loop)."""
    from tieify.search._study import reusable_metrics, same_params

    previous = same_params(study, params)
    return None if previous is None else reusable_metrics(previous)


# --------------------------------------------------------------------------------------------
# The searcher


#: The lock types a sampler may hold, by the name a pickle carries (the types themselves do
#: not pickle), and how to make one.
_LOCKS = {
    "lock": (type(threading.Lock()), threading.Lock),
    "rlock": (type(threading.RLock()), threading.RLock),
}


class _PicklableSampler:
    """An Optuna sampler as Tune's pickles carry it: its attributes but the thread locks,
    which pickle refuses and which are made anew, unheld, on load. Optuna 5.1's GA samplers
    (NSGA-II, the recipes' default) hold one for their generation cache, and Tune pickles
    the searcher when the Tuner is made ("cannot pickle '_thread.lock' object")."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __getstate__(self) -> dict[str, Any]:
        attrs = dict(vars(self.sampler))
        locks = {
            name: kind
            for name, value in attrs.items()
            for kind, (lock_type, _) in _LOCKS.items()
            if type(value) is lock_type
        }
        for name in locks:
            del attrs[name]
        return {"cls": type(self.sampler), "attrs": attrs, "locks": locks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        sampler = state["cls"].__new__(state["cls"])
        vars(sampler).update(state["attrs"])
        for name, kind in state["locks"].items():
            setattr(sampler, name, _LOCKS[kind][1]())
        self.sampler = sampler


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
            metric=ACCURACY_KEY,
            mode="max",
            sampler=sampler,
        )

    # Tune pickles the searcher into tuner.pkl and its checkpoints: keep only plain state.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "_tieify_sampler": _PicklableSampler(self._tieify_sampler),
            "_single_objective": self._single_objective,
            "_numbers": dict(self._numbers),
            "_completed_trials": set(self._completed_trials),
            "_metric": self._metric,
            "_mode": self._mode,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        boxed = self._tieify_sampler  # a bare sampler in checkpoints of earlier versions
        if isinstance(boxed, _PicklableSampler):
            self._tieify_sampler = boxed.sampler
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
            sid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
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
        if result.get("final") or step is None or ACCURACY_KEY not in result:
            return
        self._trial(trial_id).report(float(result[ACCURACY_KEY]), int(step))

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
        payload = (result or {}).get(RESULT_KEY)
        metrics: dict[str, Any]
        if payload:
            metrics = json.loads(payload)
        elif error:
            metrics = {
                "failed_reason": "Ray trial failed after its retries (worker died or "
                "raised); see its error.txt under OUT/ray/ or the Ray logs"
            }
        else:  # stopped by the scheduler (ASHA) on its last intermediate result
            metrics = {"pruned": True}
            accuracy, step = (result or {}).get(ACCURACY_KEY), (result or {}).get("step")
            if isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
                metrics["accuracy"] = float(accuracy)
                # Tune does not pass a result that stops a trial to the searcher; report
                # it here so Optuna holds the value it was pruned on (as embedded).
                if self._single_objective and step is not None:
                    ot_trial.report(float(accuracy), int(step))
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
        mark_orphans(study, keep=live)
