"""Ray backend, worker side: the study store as workers see it, and the trial trainable.

Each trial is one Optuna trial (its number and parameters come in the Tune config). The
trainable builds the Evaluator once per worker process, reports each epoch's accuracy to Tune
(for ASHA and Optuna's intermediate values) and ends with the trial's metrics as JSON; the
driver's searcher records them in the study. A restored trial whose Optuna trial is already
finished in the store reports that instead of training again. Each trial appends
``start``/``done`` lines (trial, pid, host, Ray node) to ``<out>/ray_trials.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tieify._errors import SearchError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

logger = logging.getLogger("tieify.search")

#: One JSON line per trial start / end, written by the workers.
EVENTS_FILE = "ray_trials.jsonl"
#: Result key Tune's scheduler and the searcher read (intermediate and final top-1).
ACCURACY_KEY = "accuracy_so_far"
#: Result key of the final metrics (JSON text).
RESULT_KEY = "tieify_metrics"


# --------------------------------------------------------------------------------------------
# Study store, as seen from the driver and from the workers


@dataclass(frozen=True)
class StoreRef:
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


def store_ref(study: optuna.Study, storage: Any) -> StoreRef:
    """How workers reopen the study: a journal file path or a storage URL."""
    if isinstance(storage, (str, os.PathLike)):
        text = os.fspath(storage)
        if "://" in text:
            return StoreRef(study.study_name, text, None)
        return StoreRef(study.study_name, None, os.path.abspath(text))
    backend: Any = getattr(study._storage, "_backend", None)
    journal = getattr(backend, "_file_path", None)
    if isinstance(journal, str):
        return StoreRef(study.study_name, None, os.path.abspath(journal))
    url = getattr(study._storage, "url", None)
    if isinstance(url, str):
        return StoreRef(study.study_name, url, None)
    raise SearchError(
        "backend='ray' needs a study store that Ray workers can reopen: the default journal "
        f"file in out_dir, a journal path or an Optuna storage URL; got storage={storage!r} "
        f"({type(study._storage).__name__}). Pass --storage sqlite:///PATH or a journal path."
    )


# --------------------------------------------------------------------------------------------
# The trainable

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


def _already_told(store: StoreRef, number: int) -> bool:
    """Whether trial ``number`` is already finished in the store (resume after a crash)."""
    if not store.reachable():
        return False
    trials = store.load().get_trials(deepcopy=False)
    return number < len(trials) and trials[number].state.is_finished()


def run_trial(
    config: dict[str, Any],
    *,
    evaluator_factory: Callable[[], Any],
    store: StoreRef,
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
        tune.report({"final": 1, ACCURACY_KEY: float("nan"), "already_told": 1})
        return
    if config.get("reuse"):
        metrics = dict(config["reuse"])
        _event(events, event="reuse", **where)
    else:
        _event(events, event="start", **where)

        def report(step: int, accuracy: float) -> bool:
            tune.report({ACCURACY_KEY: float(accuracy), "step": int(step), "final": 0})
            return False  # Tune's scheduler (ASHA) stops the trial itself

        weights = os.path.join(out_dir, "trials", f"{number}.pt") if save_weights else None
        try:
            evaluator = _WORKER_EVALUATORS.get(token)
            if evaluator is None:  # once per worker process (data, dense baseline, space)
                evaluator = _WORKER_EVALUATORS[token] = evaluator_factory()
            metrics = dict(evaluator.evaluate(params, report, weights_path=weights))
        except Exception as exc:  # as the embedded loop: an error fails this trial only
            logger.debug("trial %d raised", number, exc_info=True)
            metrics = {"failed_reason": f"error: {type(exc).__name__}: {exc}"}
        _event(events, event="done", **where)
    accuracy = metrics.get("accuracy")
    tune.report(
        {
            "final": 1,
            ACCURACY_KEY: float(accuracy) if isinstance(accuracy, (int, float)) else math.nan,
            RESULT_KEY: json.dumps(metrics, default=_json_default),
        }
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
