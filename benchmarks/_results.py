"""Where a benchmark's results go: ``<out>/<stem>.json`` and ``<out>/<stem>.md``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import _allocator_flag


def write_results(out: Path, stem: str, res: dict, markdown: str) -> None:
    """Write ``res`` as JSON and ``markdown`` beside it under ``out``, and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def table(header: str | Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table's lines: ``header``'s cells (a sequence, or one string of them
    separated by ``|``), the rule (``align``, one letter a column: ``l`` left, ``r`` right),
    then one line a row of ``rows``, each cell as ``str(cell)``."""
    if isinstance(header, str):
        header = [cell.strip() for cell in header.split("|")]
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(
            f"align {align!r} needs one of 'l' or 'r' for each of {len(header)} columns"
        )

    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {c} |" if c else " |" for c in cells)

    lines = [line(header)]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(header)} columns")
        lines.append(line(cells))
    return lines


def timing_facts(res: dict) -> str:
    """The sentence on how a run of interleaved rounds timed its models, and where."""
    return (
        f"{res['threads']} threads, {res['rounds']} interleaved rounds (medians of per-round "
        f"ratios); torch {res['torch']}, {res['machine']}."
    )


def against_table(
    header: str,
    rows: Iterable[dict],
    lead: Callable[[dict], list],
    names: Sequence[str],
    ratio: str | None = None,
) -> list[str]:
    """The Markdown table of rows of :func:`models.against` (models timed against a dense
    one): per row the cells ``lead(row)``, the dense model's ms, each of ``names`` as ``ms
    (ratio to dense)`` and, where given, ``row[ratio]``; ``header`` names every column (the
    leading ``case``, ``mode`` and ``layout`` left-aligned, the others right-aligned)."""
    cells = [cell.strip() for cell in header.split("|")]
    first = len(cells) - len(names) - 1 - (ratio is not None)
    align = "".join("l" if c in ("case", "mode", "layout") else "r" for c in cells[:first])
    return table(
        cells,
        align + "r" * (len(cells) - first),
        (
            lead(r)
            + [f"{r['dense_ms']:.1f}"]
            + [f"{r[f'{n}_ms']:.1f} ({r[n]:.3f})" for n in names]
            + ([f"{r[ratio]:.3f}"] if ratio is not None else [])
            for r in rows
        ),
    )


def run_facts(res: dict) -> str:
    """The sentence on the host during a run: its load average (1/5/15 min) at the start and
    the end and, where the run recorded it, the allocator."""
    text = (
        f"Load average (1/5/15 min) at start {res['loadavg_start']}, at end {res['loadavg_end']}."
    )
    return text + (f" Allocator: {res['allocator']}." if "allocator" in res else "")


def run_model_benchmark(
    name: str,
    description: str,
    cases: list[str],
    measure: Callable[[argparse.Namespace], dict],
    markdown: Callable[[dict], str],
    argv: list[str] | None = None,
    facts: Callable[[], dict] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The ``main`` of a benchmark of whole models that needs tieify's kernel: its options
    (``--cases`` from ``cases``, ``--batches``, ``--size``, ``--threads``, ``--rounds``,
    ``--target-s``, ``--out`` and the allocator flag), the threads and allocator set, then
    ``measure(args)``'s entries in the results beside the run's settings, machine, load
    average and ``facts()``, written as ``<out>/<name>.json`` and ``markdown(res)``;
    ``options(parser)`` adds a script's own options."""
    import torch

    import tieify
    from tieify.latency._machine import describe_machine

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cases", nargs="+", default=cases)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--target-s", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    _allocator_flag.add_flag(p)
    if options is not None:
        options(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = _allocator_flag.apply(args)
    if not tieify.kernel_status().startswith("available"):
        print(f"tieify's kernel is not available: {tieify.kernel_status()}", file=sys.stderr)
        return 1
    load_start = os.getloadavg()
    start = time.time()
    res = {
        "benchmark": name,
        "threads": args.threads,
        "rounds": args.rounds,
        "size": args.size,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "allocator": allocator,
        **(facts() if facts is not None else {}),
    }
    res.update(measure(args))
    res["seconds"] = round(time.time() - start, 1)
    res["loadavg_start"] = [round(v, 2) for v in load_start]
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    write_results(args.out, name, res, markdown(res))
    return 0
