"""``tieify search``: find per-layer / per-stage B under accuracy, latency and size budgets.

Pipeline: a recipe (model, data, space, training, budgets) -> an :class:`Evaluator` (data,
dense baseline, search space; prepared once) -> an Optuna study (embedded, or on Ray Tune with
``backend="ray"``) whose trials are plans fine-tuned and measured -> the feasible Pareto front
(accuracy vs latency vs params) written to ``out_dir``.

Example:
    >>> import tieify
    >>> summary = tieify.search("default", trials=4, out_dir="runs/demo")  # doctest: +SKIP
    >>> [p["decisions"] for p in summary["front"]]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._errors import SearchError
from ._recipe import Recipe, RecipeError, load_recipe

__all__ = ["search", "load_recipe", "Recipe", "RecipeError", "DEFAULT_OUT", "JOURNAL"]

logger = logging.getLogger("tieify.search")

#: Default output folder (``runs/<recipe name>``).
DEFAULT_OUT = "runs"
#: File name of the default study store inside the output folder.
JOURNAL = "study.journal"
BACKENDS = ("optuna", "ray")


def _evaluator(recipe: Recipe, out_dir: str, evaluate_fn: Any = None) -> Any:
    from ._objective import Evaluator

    return Evaluator(recipe, out_dir, evaluate_fn=evaluate_fn)


def search(
    recipe: str | os.PathLike[str] | Recipe | None = None,
    *,
    backend: str = "optuna",
    out_dir: str | os.PathLike[str] | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    ray_address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_concurrent: int | None = None,
    max_failures: int = 2,
    study_name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    evaluate_fn: Callable[[Any], float] | None = None,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run a search and write its results; returns the ``pareto.json`` summary.

    Args:
        recipe: Recipe name (``recipes/NAME.yaml``), YAML path or :class:`Recipe`;
            ``None`` = ``default`` (a small CIFAR-style ResNet on scikit-learn's digits).
        backend: ``"optuna"`` (embedded) or ``"ray"`` (Ray Tune; ``pip install 'tieify[ray]'``).
        out_dir: Output folder; default ``runs/<recipe name>``.
        trials: Number of trials the study should hold (default: the recipe's
            ``search.trials``); trials of a resumed study count.
        timeout: Wall-clock budget in seconds for this run (default: ``search.timeout``).
        storage: Optuna storage URL or journal path; default ``<out_dir>/study.journal``.
        resume: Continue the study found in the store (a killed search loses at most the
            trial that was running).
        seed: Sampler seed (default: ``search.seed``).
        ray_address, cpus_per_trial, gpus_per_trial, max_concurrent, max_failures: Ray backend
            settings (see :func:`tieify.search._ray.run_ray`).
        study_name: Study name in the store (default ``tieify-<recipe name>``).
        overrides: Recipe overrides ``{"section.key": value}`` (e.g. budgets).
        evaluate_fn: Your own ``evaluate(model) -> float`` (higher is better) replacing the
            fine-tune + top-1 step.
        progress: Show the progress bar, per-trial lines and the final table.
        console: A ``rich.console.Console`` to print to.

    Returns:
        The summary written to ``pareto.json`` plus ``out_dir`` and ``wall_seconds``.

    Raises:
        RecipeError: an invalid recipe (before any training).
        SearchError: an existing study without ``resume``, an unknown backend, Ray missing.

    Example:
        >>> from tieify.search import search
        >>> s = search("default", trials=2, out_dir="/tmp/demo", progress=False)  # doctest: +SKIP
        >>> len(s["front"]) >= 1  # doctest: +SKIP
        True
    """
    start = time.monotonic()
    if backend not in BACKENDS:
        raise SearchError(f"backend must be one of {', '.join(BACKENDS)}, but got {backend!r}.")
    r = load_recipe(recipe, dict(overrides or {}))
    n_trials = r.search.trials if trials is None else trials
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise SearchError(f"trials must be an integer >= 1, but got {n_trials!r}.")
    timeout = r.search.timeout if timeout is None else timeout
    if timeout is not None and not timeout > 0:
        raise SearchError(f"timeout must be > 0 seconds or None, but got {timeout!r}.")
    out = Path(out_dir) if out_dir is not None else Path(DEFAULT_OUT) / r.name
    out.mkdir(parents=True, exist_ok=True)
    store = storage if storage is not None else str(out / JOURNAL)
    seed = r.search.seed if seed is None else seed

    from ._results import print_front, write_results
    from ._study import interrupted, make_sampler, open_study, run_study

    if backend == "ray":
        try:
            from ._ray import run_ray
        except ImportError as exc:  # pragma: no cover - the module imports ray lazily
            raise SearchError(
                f"backend='ray' needs Ray Tune ({exc}); install it with: pip install 'tieify[ray]'"
            ) from None
        factory = functools.partial(_evaluator, r, str(out.resolve()), evaluate_fn)
        study = run_ray(
            r,
            factory,
            out_dir=out,
            trials=n_trials,
            timeout=timeout,
            storage=store,
            resume=resume,
            seed=seed,
            ray_address=ray_address,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
            max_concurrent=max_concurrent,
            max_failures=max_failures,
            study_name=study_name,
        )
    else:
        study = open_study(r, store, study_name, resume)
        # A resumed study reseeds past the trials it already has, so the sampler does not
        # propose the first candidates again (they would only be reused, not explored).
        study.sampler = make_sampler(r, seed + len(study.trials) if resume else seed)
        evaluator = _evaluator(r, str(out), evaluate_fn)
        study.set_user_attr("baseline", dict(evaluator.baseline))
        study.set_user_attr("constraint_names", evaluator.constraint_names)
        if progress:
            _print_start(r, evaluator, n_trials, out, console)
        try:
            run_study(
                study,
                evaluator,
                trials=n_trials,
                timeout=timeout,
                out_dir=out,
                save_weights=r.search.save_weights,
                progress=progress,
            )
        except BaseException as exc:  # Ctrl-C: keep what was found; --resume continues
            if not interrupted(exc):
                raise
            write_results(study, r, out)
            logger.warning("interrupted: results so far written to %s; --resume continues", out)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from exc
    summary = write_results(study, r, out)
    summary["out_dir"] = str(out)
    summary["wall_seconds"] = round(time.monotonic() - start, 2)
    if progress:
        _print_end(summary, out, console)
        print_front(summary, console)
    return summary


def _print_start(r: Recipe, evaluator: Any, trials: int, out: Path, console: Any) -> None:
    from rich.console import Console

    console = console or Console()
    b = evaluator.baseline
    console.print(
        f"[bold]tieify search[/] recipe [cyan]{r.name}[/]: model {r.model.name}, data "
        f"{r.data.dataset}, space {evaluator.space.name} ({len(evaluator.space.decisions)} "
        f"decisions), {trials} trials, objectives {', '.join(r.search.objectives)}"
    )
    console.print(
        f"dense baseline: accuracy {100 * b['accuracy']:.2f}% after the same fine-tuning, "
        f"latency {b['latency_ms']:.3f} ms ({evaluator.latency_mode}), {b['params']} params; "
        f"output in {out}"
    )


def _print_end(summary: Mapping[str, Any], out: Path, console: Any) -> None:
    from rich.console import Console

    console = console or Console()
    if not summary["front"]:
        console.print(
            f"[bold red]No feasible point[/] among {summary['trials']} trials for budgets "
            f"{summary['budgets']}; the closest candidates are listed below. Relax a budget or "
            "run more trials."
        )
    console.print(
        f"wrote {', '.join(summary['files'])} to {out} in {summary['wall_seconds']:.1f} s"
    )


class _CallableModule(types.ModuleType):
    """``tieify.search`` is both this package and the function: importing the subpackage
    rebinds the attribute ``tieify.search`` to the module, so the module forwards calls."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
