"""Evaluating one candidate plan: build, count, time, fine-tune, score against budgets.

An :class:`Evaluator` is prepared once per process (data, dense baseline, search space) and
then turns parameter dicts (one per trial) into metrics. It is shared by the embedded Optuna
engine (:mod:`tieify.search._study`) and the Ray backend (:mod:`tieify.search._ray`).

Metrics of a trial (all plain JSON values, stored as Optuna user attributes):

- ``accuracy``: top-1 on the held-out split (fraction) after fine-tuning the tied model
  (weights transferred from the dense baseline) with the recipe's ``train`` settings;
- ``latency_ms``: milliseconds per forward pass at ``latency.batch_size`` with
  ``latency.threads`` threads, the fastest of the timed rounds, warm-up excluded
  (``measured``), or the latency model's prediction of it (``predicted``); ``auto``
  resolves to one of them once per search (:class:`~tieify.search._recipe.LatencyConfig`);
- ``latency_ratio``: the candidate's latency over the dense model's. Measured, the two are
  timed side by side in interleaved rounds and this is the median of the rounds' ratios:
  a shared machine's speed moves between trials (by a third within minutes on the 2-core
  development host, see ``benchmarks/results``) and moves ``latency_ms`` with it, but
  slows both models of a round alike, so the ratio (and the ``max_latency_ratio`` budget)
  compares trials fairly across a long search. Predicted, it is the two predictions' ratio;
- ``params`` (de-duplicated) and ``macs`` (per sample, fvcore's unit) from :func:`tieify.count`;
- ``plan`` (replayable plan dict), ``assignment`` (per-layer factors), ``failed_reason`` for a
  trial that could not be built or diverged, ``pruned`` for a trial a pruner stopped.

The dense baseline is trained once (``model.pretrain_epochs``) and cached in
``<out>/baseline/``; its accuracy *after the same fine-tuning* as every candidate is the
reference for ``max_accuracy_drop``.

Example:
    >>> from tieify.search import load_recipe
    >>> recipe = load_recipe("default", {"model.pretrain_epochs": 1})
    >>> ev = Evaluator(recipe, "/tmp/x")  # doctest: +SKIP
    >>> ev.evaluate({"B_layer1": 2, "B_layer2": 2, "B_layer3": 4})["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import ModelResolveError, TieifyError
from ..latency._machine import machine_key
from ..latency._timing import num_threads
from ._data import Data, load_data
from ._recipe import Recipe
from ._space import Space, apply_assignment, build_space
from ._train import Diverged, Pruned, accuracy, fit

__all__ = ["Evaluator", "build_model", "measure_latency", "CONSTRAINT_NAMES"]

logger = logging.getLogger("tieify.search")

#: Budget keys in the order :meth:`Evaluator.constraints` returns them (configured ones only).
CONSTRAINT_NAMES = (
    "min_accuracy",
    "max_accuracy_drop",
    "max_latency_ms",
    "max_latency_ratio",
    "max_params",
    "max_macs",
)


def build_model(recipe: Recipe, data: Data) -> nn.Module:
    """The dense model the recipe names, with a head for ``data.num_classes`` classes.

    ``cifar_resnet`` is the package's small ResNet; any other name is a MODEL string of
    ``tieify report`` (torchvision name, ``timm:NAME``, ``module:factory``, ``file.py:factory``).
    """
    kwargs = dict(recipe.model.kwargs)
    if recipe.model.name == "cifar_resnet":
        from ._cifar_resnet import cifar_resnet

        kwargs.setdefault("num_classes", data.num_classes)
        kwargs.setdefault("in_channels", data.input_size[0])
        try:
            return cifar_resnet(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelResolveError(f"model.kwargs {kwargs!r} for cifar_resnet: {exc}") from None
    from .._models import resolve_model

    try:
        model = resolve_model(recipe.model.name, **{"num_classes": data.num_classes, **kwargs})
    except ModelResolveError:
        model = resolve_model(recipe.model.name, **kwargs)
        _replace_head(model, data.num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None or last[1].out_features == num_classes:
        return
    name, m = last
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(m.in_features, num_classes, bias=m.bias is not None))


#: Seconds a latency sample of a trial spans: a trial's latency is one of many in a search,
#: and cheap to take.
SAMPLE_SECONDS = 0.005


def measure_latency(
    model: nn.Module, x: torch.Tensor, *, threads: int = 1, repeats: int = 20, warmup: int = 3
) -> float:
    """Milliseconds per forward pass of ``model(x)`` (eval mode, inference mode), its fastest
    round: :func:`tieify.latency.measure_latency` in milliseconds (samples of about 5 ms),
    the estimator the latency model's remainder is calibrated with, so ``measured`` and
    ``predicted`` agree on what they estimate.

    Example:
        >>> import torch
        >>> measure_latency(torch.nn.Linear(4, 4), torch.randn(1, 4), repeats=3) > 0
        True
    """
    from ..latency import measure_latency as seconds

    return 1000.0 * seconds(
        model, x, repeats=repeats, threads=threads, warmup=warmup, sample_seconds=SAMPLE_SECONDS
    )


def _count(model: nn.Module, x: torch.Tensor) -> tuple[int, int | None]:
    try:
        from .._count import count

        c = count(model, x)
        return int(c.params), int(c.macs)
    except Exception as exc:  # counting must not end a search; params are always known
        logger.debug("counting MACs failed: %s", exc)
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
        return total, None


class Evaluator:
    """Prepared once per process; evaluates parameter dicts of the recipe's search space.

    Args:
        recipe: The validated recipe.
        out_dir: Output folder (the dense baseline is cached in ``<out>/baseline``).
        evaluate_fn: Optional ``evaluate(model) -> float`` replacing fine-tuning and top-1
            (e.g. a user metric); it must return an accuracy-like value, higher is better.
        log: Whether to log baseline training progress.
    """

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        *,
        evaluate_fn: Callable[[nn.Module], float] | None = None,
        log: bool = True,
    ) -> None:
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.evaluate_fn = evaluate_fn
        self._log = log
        self.data = load_data(recipe.data)
        with torch.random.fork_rng():  # the same recipe builds the same initial weights
            torch.manual_seed(recipe.train.seed)
            model = build_model(recipe, self.data)
        self.example = self.data.example_batch(1)
        self.latency_input = self.data.example_batch(recipe.latency.batch_size)
        self.space: Space = build_space(
            recipe.search.space, model, self.example, recipe.search.choices
        )
        with num_threads(recipe.train.threads):
            self.dense = self._pretrained(model)
            #: ``measured`` or ``predicted``: the recipe's mode with ``auto`` resolved.
            cached = self._cached_baseline()  # read once: it decides both below
            self.latency_mode = self._latency_mode(cached)
            self.baseline = self._baseline_metrics(cached)

    # -- the contract with the engines ------------------------------------------------------

    @property
    def directions(self) -> list[str]:
        """Optuna directions of :meth:`objectives`, in order."""
        return self.recipe.directions

    @property
    def objective_names(self) -> list[str]:
        return list(self.recipe.search.objectives)

    @property
    def constraint_names(self) -> list[str]:
        """Configured budgets, in the order of :meth:`constraints`."""
        b = self.recipe.budgets
        return [n for n in CONSTRAINT_NAMES if getattr(b, n) is not None]

    def suggest_params(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for one candidate (deterministic given the sampler's seed)."""
        return self.space.suggest(trial)

    def objectives(self, metrics: Mapping[str, Any]) -> list[float]:
        """Objective values in :attr:`directions` order."""
        return [float(metrics[o]) for o in self.recipe.search.objectives]

    def constraints(self, metrics: Mapping[str, Any]) -> list[float]:
        """One value per configured budget; ``<= 0`` means the budget is met.

        Accuracy budgets are in accuracy units (fractions); latency (in ms or as a ratio to
        the dense model), params and MACs are relative overshoots (``value / budget - 1``).
        """
        b = self.recipe.budgets
        acc = float(metrics["accuracy"])
        out = []
        for name in self.constraint_names:
            limit = getattr(b, name)
            if name == "min_accuracy":
                out.append(limit - acc)
            elif name == "max_accuracy_drop":
                out.append((self.baseline["accuracy"] - acc) - limit)
            else:
                value = metrics.get(name.removeprefix("max_"))
                out.append(0.0 if value is None else float(value) / float(limit) - 1.0)
        return [round(v, 9) for v in out]

    def evaluate(
        self,
        params: Mapping[str, Any],
        report: Callable[[int, float], bool] | None = None,
        *,
        weights_path: str | Path | None = None,
    ) -> dict[str, Any]:
        """Build, count, time and fine-tune one candidate; see the module docstring.

        Args:
            params: A parameter dict from :meth:`suggest_params`.
            report: ``report(epoch, accuracy) -> prune?`` after each fine-tuning epoch.
            weights_path: Where to save the fine-tuned ``state_dict`` (optional).

        Returns:
            The metrics dict; ``failed_reason`` is set when the candidate could not be built
            or its training diverged, ``pruned`` when ``report`` stopped it.
        """
        with num_threads(self.recipe.train.threads):
            return self._evaluate(params, report, weights_path)

    def _evaluate(
        self,
        params: Mapping[str, Any],
        report: Callable[[int, float], bool] | None,
        weights_path: str | Path | None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        bs, gs = self.space.assignment(params)
        metrics: dict[str, Any] = {
            "assignment": {"B": bs, "groups": gs},
            "baseline_accuracy": self.baseline["accuracy"],
        }
        try:
            tied, plan = apply_assignment(self.dense, bs, gs, self.example)
            metrics["plan"] = plan
            tied(self.example)
        except Exception as exc:
            metrics["failed_reason"] = f"unbuildable plan: {type(exc).__name__}: {exc}"
            metrics.setdefault("plan", {"B": bs, "groups": gs})
            return metrics
        metrics["params"], metrics["macs"] = _count(tied, self.example)
        metrics["latency_ms"], metrics["latency_ratio"] = self._latency(tied)
        try:
            metrics["accuracy"] = self._accuracy(tied, report)
        except Diverged as exc:
            metrics["failed_reason"] = str(exc)
            return metrics
        except Pruned as exc:
            metrics["accuracy"] = exc.accuracy
            metrics["pruned"] = True
            return metrics
        metrics["accuracy_drop"] = self.baseline["accuracy"] - metrics["accuracy"]
        metrics["seconds"] = round(time.perf_counter() - start, 3)
        if weights_path is not None:
            Path(weights_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(tied.state_dict(), weights_path)
        return metrics

    # -- internals --------------------------------------------------------------------------

    def _accuracy(self, model: nn.Module, report: Callable[[int, float], bool] | None) -> float:
        if self.evaluate_fn is not None:
            return float(self.evaluate_fn(model))
        t = self.recipe.train
        if t.epochs == 0:
            return accuracy(model, self.data.val)
        teacher = self.dense if t.kd_alpha > 0 else None
        result = fit(
            model,
            self.data.train,
            self.data.val,
            t,
            batch_size=self.recipe.data.batch_size,
            teacher=teacher,
            report=report,
        )
        return result.accuracy

    def _prepare_allocator(self) -> None:
        if self.recipe.latency.allocator == "tuned":
            from ..latency import tune_allocator

            tune_allocator()

    def _latency_mode(self, cached: dict[str, Any] | None) -> str:
        """The recipe's latency mode, ``auto`` resolved: the mode this search's baseline
        recorded (so a resumed search and every Ray worker keep the driver's choice), else
        ``predicted`` when the latency table is warm for the dense model, else ``measured``."""
        lat = self.recipe.latency
        if lat.mode != "auto":
            return lat.mode
        if cached is not None:
            # A baseline written before modes were recorded was measured (the old default):
            # keep its trials comparable.
            recorded = cached.get("latency_mode", "measured")
            return recorded if recorded in ("measured", "predicted") else "measured"
        self._prepare_allocator()  # the table keys entries by the allocator state
        try:
            from ..latency import is_warm

            warm = is_warm(self.dense, self.latency_input, threads=lat.threads)
        except Exception as exc:  # a model the table cannot follow: measure it
            logger.warning("latency table lookup failed (%s); latency will be measured", exc)
            warm = False
        mode = "predicted" if warm else "measured"
        logger.info(
            "latency.mode auto: %s (%s)",
            mode,
            "the latency table is warm for this model and input"
            if warm
            else "no latency table for this model and input on this machine yet; "
            "--latency predicted fills it",
        )
        return mode

    def _latency(self, model: nn.Module) -> tuple[float, float]:
        """``model``'s latency in milliseconds and its ratio to the dense model's (1.0 for
        the dense model itself): predicted, both from the latency model, or measured, side
        by side with the dense model (see ``latency_ratio`` in the module docstring)."""
        lat = self.recipe.latency
        self._prepare_allocator()
        if lat.optimize:
            from ..latency import optimize

            optimize(model, self.latency_input, threads=lat.threads)
            if not self._dense_optimized:  # the dense model, timed beside each candidate
                if model is not self.dense:
                    optimize(self.dense, self.latency_input, threads=lat.threads)
                self._dense_optimized = True
        if self.latency_mode == "predicted":
            predicted = _predicted_ms(model, self.latency_input, lat.threads)
            if model is self.dense:  # the baseline: kept for the candidates' ratios
                self._dense_ms = predicted
            dense = self._dense_predicted()
            if predicted is not None and dense:
                return predicted, round(predicted / dense, 5)
        if model is self.dense:
            ms = measure_latency(
                model,
                self.latency_input,
                threads=lat.threads,
                repeats=lat.repeats,
                warmup=lat.warmup,
            )
            return round(ms, 5), 1.0
        return _side_by_side_ms(
            model, self.dense, self.latency_input, lat.threads, lat.repeats, lat.warmup
        )

    _dense_optimized = False
    _dense_ms: float | None = None

    def _dense_predicted(self) -> float | None:
        """The dense model's predicted milliseconds, predicted once per evaluator (by the
        baseline's timing where this process did it)."""
        if self._dense_ms is None:
            self._dense_ms = _predicted_ms(
                self.dense, self.latency_input, self.recipe.latency.threads
            )
        return self._dense_ms

    def _cache_key(self) -> str:
        d = self.recipe.to_dict()
        key = {k: d[k] for k in ("model", "data", "train")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _pretrained(self, model: nn.Module) -> nn.Module:
        m = self.recipe.model
        if m.checkpoint is not None:
            state = torch.load(m.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        if m.pretrain_epochs == 0:
            return model.eval()
        folder = self.out_dir / "baseline"
        path = folder / f"dense-{self._cache_key()}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        if self._log:
            logger.info(
                "training the dense baseline for %d epochs (cached in %s)", m.pretrain_epochs, path
            )
        pre = self.recipe.train
        fit(
            model,
            self.data.train,
            self.data.val,
            pre,
            batch_size=self.recipe.data.batch_size,
            epochs=m.pretrain_epochs,
        )
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        return model.eval()

    def _baseline_path(self) -> Path:
        return self.out_dir / "baseline" / f"baseline-{self._cache_key()}.json"

    def _cached_baseline(self) -> dict[str, Any] | None:
        """The baseline an earlier run of this search wrote (same model, data, training and
        latency input), or None."""
        path = self._baseline_path()
        if not path.is_file() or self.evaluate_fn is not None:
            return None
        cached = json.loads(path.read_text())
        if cached.get("latency_input") != list(self.latency_input.shape):
            return None
        return dict(cached)

    def _baseline_metrics(self, cached: dict[str, Any] | None) -> dict[str, Any]:
        """The dense baseline's metrics: ``cached`` (:meth:`_cached_baseline`) when there is
        one, else fine-tuned, counted and timed now and written beside the weights."""
        path = self._baseline_path()
        folder = path.parent
        machine = machine_key(self.latency_input.device)
        if cached is not None:
            timed_on = cached.get("machine")
            if timed_on is not None and timed_on != machine:
                logger.warning(
                    "the dense baseline's latency in %s was timed on another machine (%s); this "
                    "one is %s. Trials timed here are not comparable with it or with the "
                    "trials timed there: run a search on one kind of machine, or start it "
                    "in a new output folder to time everything here.",
                    path,
                    timed_on,
                    machine,
                )
            if cached.get("latency_mode") != self.latency_mode:
                # Same training, another latency mode: only the latency is redone.
                cached["latency_ms"] = self._latency(self.dense)[0]
                cached["latency_mode"] = self.latency_mode
                path.write_text(json.dumps(cached, indent=2))
            cached.setdefault("latency_ratio", 1.0)  # a baseline written before ratios
            return cached
        dense = copy.deepcopy(self.dense)
        try:
            acc = self._accuracy(dense, None)
        except Diverged as exc:
            raise TieifyError(
                f"the dense baseline diverged while fine-tuning ({exc}); lower train.lr"
            ) from None
        params, macs = _count(self.dense, self.example)
        metrics: dict[str, Any] = {
            "accuracy": acc,
            "pretrained_accuracy": accuracy(self.dense, self.data.val),
            "params": params,
            "macs": macs,
            "latency_ms": self._latency(self.dense)[0],
            "latency_ratio": 1.0,
            "latency_input": list(self.latency_input.shape),
            "latency_mode": self.latency_mode,
            "machine": machine,
        }
        if not all(math.isfinite(float(v)) for v in (acc, metrics["latency_ms"])):
            raise TieifyError(f"the dense baseline has non-finite metrics: {metrics}")
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        return metrics


def _side_by_side_ms(
    model: nn.Module, dense: nn.Module, x: torch.Tensor, threads: int, repeats: int, warmup: int
) -> tuple[float, float]:
    """``model``'s fastest round in milliseconds per forward and the median over interleaved rounds
    of its time over ``dense``'s in the same round (samples as :func:`measure_latency`'s)."""
    from ..latency._predict import measure_side_by_side
    from ..latency._timing import LATENCY_STATISTIC, reduce_samples

    samples = measure_side_by_side(
        {"model": model, "dense": dense},
        x,
        repeats=repeats,
        threads=threads,
        warmup=warmup,
        sample_seconds=SAMPLE_SECONDS,
    )
    ms = 1000.0 * reduce_samples(samples["model"], LATENCY_STATISTIC)
    ratio = statistics.median(
        m / d for m, d in zip(samples["model"], samples["dense"], strict=True)
    )
    return round(ms, 5), round(ratio, 5)


def _predicted_ms(model: nn.Module, x: torch.Tensor, threads: int) -> float | None:
    """``tieify.predict_latency`` (seconds) in milliseconds; None when it is unavailable."""
    try:
        from ..latency import predict_latency
    except ImportError:
        logger.warning("latency.mode 'predicted' needs tieify.predict_latency; measuring instead")
        return None
    try:
        seconds = predict_latency(model, x, threads=threads)
    except Exception as exc:
        logger.warning("predict_latency failed (%s); measuring instead", exc)
        return None
    return round(1000.0 * float(seconds), 5)
