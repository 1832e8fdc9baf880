"""Search results: the feasible Pareto front, files, tables and the live progress bar.

:func:`write_results` reads any finished Optuna study made by either backend (metrics are
trial user attributes, budgets are constraints) and writes into ``out_dir``:

- ``trials.csv``: every trial (state, decisions, metrics, feasibility, failure reason);
- ``pareto.json``: baseline, objectives, the feasible Pareto front (or, when nothing is
  feasible, the closest candidates by total budget violation);
- ``front/<n>/best_plan.json`` (plan of front point ``n``, replayable with
  ``Plan.from_json(...).apply(model)``), ``front/<n>/metrics.json`` and, when the trial's
  fine-tuned weights were saved, ``front/<n>/weights.pt`` (the tied model's ``state_dict``);
- ``pareto.png`` (accuracy against latency and against params) and ``report.md``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._recipe import Recipe

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["write_results", "pareto_front", "print_front", "SearchProgress", "describe"]

_METRICS = ("accuracy", "accuracy_drop", "latency_ms", "latency_ratio", "params", "macs")


def describe(params: Mapping[str, Any]) -> str:
    """Compact text of a trial's decisions: ``layer1=2 layer2=4``."""
    return " ".join(f"{str(k).removeprefix('B_')}={v}" for k, v in params.items()) or "dense"


def _violation(trial: Any) -> float:
    return sum(max(0.0, float(v)) for v in trial.constraints.values())


def _feasible(trial: Any) -> bool:
    return all(float(v) <= 0.0 for v in trial.constraints.values())


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    better = False
    for x, y, s in zip(a, b, signs, strict=True):
        if s * x < s * y:
            return False
        if s * x > s * y:
            better = True
    return better


def pareto_front(trials: Sequence[Any], directions: Sequence[Any]) -> list[Any]:
    """Non-dominated trials among ``trials`` (completed, with values), best accuracy first.

    Duplicates (same objective values) keep the earliest trial.
    """
    signs = [1 if getattr(d, "name", str(d)).lower().startswith("max") else -1 for d in directions]
    front: list[Any] = []
    seen: set[tuple[float, ...]] = set()
    for t in trials:
        if any(_dominates(o.values, t.values, signs) for o in trials):
            continue
        key = tuple(t.values)
        if key in seen:
            continue
        seen.add(key)
        front.append(t)
    return sorted(front, key=lambda t: [-s * v for s, v in zip(signs, t.values, strict=True)])


def _row(t: Any) -> dict[str, Any]:
    ua = t.user_attrs
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
    row["decisions"] = describe(t.params)
    for k in _METRICS:
        row[k] = ua.get(k, "")
    row["feasible"] = _feasible(t) if t.state.name == "COMPLETE" else ""
    row["violation"] = round(_violation(t), 6) if t.constraints else 0.0
    row["failed_reason"] = ua.get("failed_reason", "")
    start, end = t.datetime_start, t.datetime_complete
    row["seconds"] = round((end - start).total_seconds(), 2) if start and end else ""
    return row


def _point(t: Any, index: int | None = None) -> dict[str, Any]:
    ua = t.user_attrs
    out: dict[str, Any] = {"trial": t.number, "decisions": dict(t.params)}
    if index is not None:
        out["index"] = index
        out["plan_file"] = f"front/{index}/best_plan.json"
    out.update({k: ua.get(k) for k in _METRICS})
    out["values"] = list(t.values) if t.values is not None else None
    out["constraints"] = dict(t.constraints)
    out["violation"] = _violation(t)
    return out


def _weights_for(out: Path, t: Any) -> Path | None:
    path = out / "trials" / f"{t.number}.pt"
    return path if path.is_file() else None


def _baseline_file(out: Path) -> dict[str, Any]:
    files = sorted((out / "baseline").glob("baseline-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    return dict(json.loads(files[-1].read_text()))


def write_results(study: optuna.Study, recipe: Recipe, out_dir: str | Path) -> dict[str, Any]:
    """Write the result files for a finished study; returns the ``pareto.json`` content.

    Args:
        study: A study made by :func:`tieify.search.search` (either backend).
        recipe: Its recipe (objective names, budgets).
        out_dir: Folder to write into (created).

    Example:
        >>> summary = write_results(study, recipe, "runs/default")  # doctest: +SKIP
        >>> [p["accuracy"] for p in summary["front"]]  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.values is not None]
    feasible = [t for t in complete if _feasible(t)]
    front = pareto_front(feasible, study.directions)
    baseline = _baseline_file(out) or study.user_attrs.get("baseline") or {}
    if not baseline:
        for t in trials:
            if "baseline_accuracy" in t.user_attrs:
                baseline = {"accuracy": t.user_attrs["baseline_accuracy"]}
                break
    budgets = {k: v for k, v in recipe.to_dict()["budgets"].items() if v is not None}
    closest = sorted((t for t in complete if not _feasible(t)), key=_violation)[:5]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    summary: dict[str, Any] = {
        "version": 1,
        "recipe": recipe.name,
        "study": study.study_name,
        "objectives": list(recipe.search.objectives),
        "directions": [d.name.lower() for d in study.directions],
        "budgets": budgets,
        "baseline": baseline,
        "trials": len(trials),
        "states": counts,
        "feasible": len(feasible),
        "front": [_point(t, i) for i, t in enumerate(front)],
        "closest": [] if front else [_point(t) for t in closest],
        "failed": [
            {"trial": t.number, "reason": t.user_attrs.get("failed_reason", "")}
            for t in trials
            if t.state.name == "FAIL"
        ],
    }
    _write_csv(out / "trials.csv", [_row(t) for t in trials])
    shutil.rmtree(out / "front", ignore_errors=True)
    for i, t in enumerate(front):
        folder = out / "front" / str(i)
        folder.mkdir(parents=True, exist_ok=True)
        plan = t.user_attrs.get("plan") or {}
        (folder / "best_plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))
        (folder / "metrics.json").write_text(json.dumps(_point(t, i), indent=2, default=str))
        weights = _weights_for(out, t)
        if weights is not None:
            shutil.copyfile(weights, folder / "weights.pt")
    best_plan = front[0].user_attrs.get("plan") if front else None
    (out / "best_plan.json").write_text(json.dumps(best_plan or {}, indent=2, sort_keys=True))
    (out / "pareto.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["files"] = ["trials.csv", "pareto.json", "report.md", "best_plan.json", "front/"]
    if _plot(out / "pareto.png", complete, front, baseline):
        summary["files"].append("pareto.png")
    (out / "report.md").write_text(_markdown(summary, recipe))
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["trial", "state", "decisions", *_METRICS, "feasible", "violation"]
    fields += ["seconds", "failed_reason"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _plot(path: Path, complete: list[Any], front: list[Any], baseline: Mapping[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "latency_ms", "latency (ms / forward)"),
        (axes[1], "params", "parameters"),
    ):
        for group, style in (
            ([t for t in complete if not _feasible(t)], {"c": "tab:orange", "marker": "x"}),
            ([t for t in complete if _feasible(t)], {"c": "tab:blue", "marker": "o"}),
            (front, {"c": "tab:red", "marker": "*", "s": 120}),
        ):
            xs = [t.user_attrs.get(key) for t in group]
            ys = [t.user_attrs.get("accuracy") for t in group]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), **style)  # type: ignore[arg-type]
        if baseline.get(key) is not None and baseline.get("accuracy") is not None:
            ax.scatter([baseline[key]], [baseline["accuracy"]], c="black", marker="s")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(["infeasible", "feasible", "Pareto front", "dense baseline"], loc="lower right")
    fig.suptitle("tieify search: candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(value: Any, kind: str) -> str:
    if value is None or value == "":
        return "-"
    if kind == "accuracy":
        return f"{100 * float(value):.2f}%"
    if kind == "accuracy_drop":
        return f"{100 * float(value):+.2f} pt"
    if kind == "latency_ms":
        return f"{float(value):.3f}"
    if kind == "latency_ratio":
        return f"{float(value):.3f}x"
    v = float(value)
    if math.isnan(v):
        return "nan"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{int(v)}"


def _table_rows(points: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            str(p.get("index", "")),
            str(p["trial"]),
            describe(p["decisions"]),
            _fmt(p.get("accuracy"), "accuracy"),
            _fmt(p.get("accuracy_drop"), "accuracy_drop"),
            _fmt(p.get("latency_ms"), "latency_ms"),
            _fmt(p.get("latency_ratio"), "latency_ratio"),
            _fmt(p.get("params"), "params"),
            _fmt(p.get("macs"), "macs"),
        ]
        for p in points
    ]


_HEAD = ["#", "trial", "decisions", "accuracy", "drop", "latency ms", "x dense", "params", "MACs"]


def _markdown(summary: dict[str, Any], recipe: Recipe) -> str:
    b = summary["baseline"]
    lines = [
        f"# tieify search: {summary['recipe']}",
        "",
        f"- study `{summary['study']}`: {summary['trials']} trials {summary['states']}, "
        f"{summary['feasible']} feasible",
        f"- objectives: {', '.join(f'{o} ({d})' for o, d in zip(summary['objectives'], summary['directions'], strict=True))}",  # noqa: E501
        f"- budgets: {summary['budgets'] or 'none'}",
        f"- dense baseline: accuracy {_fmt(b.get('accuracy'), 'accuracy')}, latency "
        f"{_fmt(b.get('latency_ms'), 'latency_ms')} ms, params {_fmt(b.get('params'), 'p')}, "
        f"MACs {_fmt(b.get('macs'), 'm')}",
        "",
    ]
    points = summary["front"] or summary["closest"]
    title = (
        "## Feasible Pareto front"
        if summary["front"]
        else ("## No feasible point — closest candidates (by total budget violation)")
    )
    lines += [title, "", "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(points)]
    lines += [
        "",
        "Replay a front point: `Plan.from_json(open('front/N/best_plan.json').read())"
        ".apply(model)` (or `tieify.search._space.replay(model, plan)`), then load "
        "`front/N/weights.pt` with `load_state_dict`.",
        "",
        "![Pareto front](pareto.png)",
    ]
    if summary["failed"]:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {f['trial']}: {f['reason']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def print_front(summary: Mapping[str, Any], console: Any = None) -> None:
    """Print the feasible front (or the closest candidates) as a rich table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    points = summary["front"] or summary["closest"]
    if summary["front"]:
        title = f"Feasible Pareto front ({len(points)} points of {summary['trials']} trials)"
    else:
        title = (
            f"No feasible point in {summary['trials']} trials; closest candidates "
            f"(budgets {summary['budgets']})"
        )
    # The numbers keep their width and the decisions wrap between them (one per line in an
    # 80-column terminal) rather than being cut to "layer1…".
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    short = {"accuracy": "acc", "latency ms": "ms"}
    for h in _HEAD:
        if h == "decisions":
            table.add_column(h, justify="left", min_width=8, overflow="fold")
        else:
            table.add_column(short.get(h, h), justify="right", no_wrap=True)
    for r in _table_rows(list(points)):
        table.add_row(*r)
    b = summary.get("baseline") or {}
    if b:
        table.caption = (
            f"dense baseline: {_fmt(b.get('accuracy'), 'accuracy')}, "
            f"{_fmt(b.get('latency_ms'), 'latency_ms')} ms, {_fmt(b.get('params'), 'p')} params"
        )
    console.print(table)


class SearchProgress:
    """A rich progress bar over trials with the best feasible point so far, plus log lines."""

    def __init__(self, study: Any, evaluator: Any, total: int, *, enabled: bool = True) -> None:
        self.study = study
        self.evaluator = evaluator
        self.total = total
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._best: str = "best feasible: none yet"

    def __enter__(self) -> SearchProgress:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from ._study import counted_trials

        self._progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[best]}"),
        )
        self._progress.__enter__()
        self._task = self._progress.add_task(
            "trials", total=self.total, completed=counted_trials(self.study), best=self._best
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def trial_done(
        self, trial: Any, params: Mapping[str, Any], metrics: Mapping[str, Any], state: str
    ) -> None:
        line = _log_line(trial.number, self.total, params, metrics, state)
        feasible = state == "COMPLETE" and all(v <= 0 for v in self.evaluator.constraints(metrics))
        line += " feasible" if feasible else (" infeasible" if state == "COMPLETE" else "")
        if feasible and "accuracy" in metrics:
            best = self._best_value
            if best is None or metrics["accuracy"] > best:
                self._best_value = float(metrics["accuracy"])
                self._best = (
                    f"best feasible: {describe(params)} acc {_fmt(metrics['accuracy'], 'accuracy')}"
                    f" {_fmt(metrics.get('latency_ms'), 'latency_ms')} ms"
                )
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
            self._progress.update(self._task, advance=1, best=self._best)
        else:
            import logging

            logging.getLogger("tieify.search").info(line)

    _best_value: float | None = None

    def note(self, text: str) -> None:
        """Print a line above the bar (or log it)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, style="dim")
        else:
            import logging

            logging.getLogger("tieify.search").info(text)


def _log_line(
    number: int, total: int, params: Mapping[str, Any], metrics: Mapping[str, Any], state: str
) -> str:
    head = f"trial {number}: {describe(params)}"
    if state == "FAIL":
        return f"{head} FAILED: {metrics.get('failed_reason', '')}"
    acc = _fmt(metrics.get("accuracy"), "accuracy")
    text = (
        f"{head} acc {acc} lat {_fmt(metrics.get('latency_ms'), 'latency_ms')} ms "
        f"({_fmt(metrics.get('latency_ratio'), 'latency_ratio')} dense) "
        f"params {_fmt(metrics.get('params'), 'p')}"
    )
    if state == "PRUNED":
        text += " PRUNED"
    return text
