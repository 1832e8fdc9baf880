"""``tieify.report``: what tying changed, layer by layer, in parameters and multiply-adds,
and on request in latency.

Units: **params** (stored scalars, shared storage counted once), **MACs (multiply-adds)**
(one fused multiply-add = 1, fvcore's unit, for the whole batch of ``example_inputs``) and
**FLOPs = 2·MACs**. Counting is :func:`tieify.count`'s (fvcore, falling back to
``torch.utils.flop_counter``). Latency (``latency="measured"`` or ``"predicted"``) is the
whole model's forward time on this machine, in milliseconds: measured side by side
(interleaved rounds: each model's fastest, the median of the rounds' ratios) or predicted
by :func:`tieify.predict_latency`.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ._count import Counts, count
from .nn import TIED_TYPES

__all__ = ["Report", "ReportLatency", "ReportRow", "report"]

REPORT_VERSION = 1
UNITS = {
    "params": "parameters (tensors sharing storage counted once)",
    "macs": "MACs (multiply-adds; one fused multiply-add = 1)",
    "flops": "FLOPs = 2·MACs",
}
_SHORT_KIND = {
    "conv": "conv",
    "grouped_conv": "grouped",
    "depthwise_conv": "depthwise",
    "linear": "linear",
    "conv_subclass": "conv (own forward)",
    "functional_conv": "F.conv",
    "functional_linear": "F.linear",
}
_ATTENTION_ORDER = ("SE", "GC", "CBAM")
LATENCY_MODES = ("measured", "predicted")
#: Measured latency: timed rounds (both models in each) spanning at least this long.
MEASURE_SECONDS = 2.0


@dataclass(frozen=True)
class ReportRow:
    """One layer of a :class:`Report`.

    ``params_*`` count the module at ``name`` (recursively, so a mixer added under it is
    included); ``macs_*`` are the multiply-adds run inside it. ``None`` means the module does
    not exist on that side.
    """

    name: str
    kind: str
    action: str
    B: int | None
    groups: int | None
    in_channels: int | None
    out_channels: int | None
    params_before: int | None
    params_after: int | None
    macs_before: int | None
    macs_after: int | None
    attention: str | None = None
    reason: str = ""
    module_before: str = ""
    module_after: str = ""
    stage: str | None = None
    role: str | None = None
    mixer: str | None = None

    @property
    def display_kind(self) -> str:
        short = _SHORT_KIND.get(self.kind, self.kind)
        return f"{self.attention} {short}" if self.attention else short

    @property
    def b_g(self) -> str:
        """``"B=4"``, ``"G=32"``, ``"B=4 G=32"`` (``+concat`` with a mixer), ``"-"`` if left."""
        if self.action == "leave":
            return "-"
        parts = []
        if self.B is not None and self.B > 1:
            parts.append(f"B={self.B}")
        if self.groups is not None and self.groups > 1:
            parts.append(f"G={self.groups}")
        if self.mixer:
            parts.append(f"+{self.mixer}")
        return " ".join(parts) or "-"

    @property
    def channels(self) -> str:
        if self.in_channels is None or self.out_channels is None:
            return "-"
        return f"{self.in_channels}→{self.out_channels}"


@dataclass(frozen=True)
class ReportLatency:
    """Forward latency of the original and the tied model on this machine (milliseconds).

    ``ratio`` is tied / original: for ``"measured"`` the median of per-round ratios (both
    models timed in every round, so a burst of load hits both), for ``"predicted"`` the
    quotient of the two predictions. ``rounds`` is the number of measured rounds (``None``
    when predicted).
    """

    mode: str
    before_ms: float
    after_ms: float
    ratio: float
    threads: int
    machine: str
    rounds: int | None = None

    @property
    def saved_pct(self) -> float:
        return round(100.0 * (1.0 - self.ratio), 2)

    def to_dict(self) -> dict[str, Any]:
        """Every field, and ``saved_pct``."""
        return {**asdict(self), "saved_pct": self.saved_pct}

    def describe(self) -> str:
        how = (
            f"measured side by side in {self.rounds} interleaved rounds (each model's fastest, "
            "the median of the rounds' ratios)"
            if self.mode == "measured"
            else "predicted by tieify.predict_latency (per-layer table + calibrated remainder)"
        )
        return (
            f"Latency: {how}; {self.threads} thread{'s' if self.threads != 1 else ''} on "
            f"{self.machine}; tied / original "
            f"{self.ratio:.3f}."
        )


def _pct(before: int | None, after: int | None) -> float | None:
    if not before or after is None:
        return None
    return round(100.0 * (before - after) / before, 2)


def _sum(values: list[int | None]) -> int:
    return sum(v for v in values if v is not None)


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_pct(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}%"


@dataclass(frozen=True)
class Report:
    """Per-layer and total savings of a tied model against its original.

    Build it with :func:`report`; render with ``str(rep)`` (plain table),
    :meth:`to_markdown`, :meth:`to_json`, :meth:`to_csv` or rich (``rich.print(rep)``).
    """

    rows: tuple[ReportRow, ...]
    before: Counts
    after: Counts
    from_plan: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    title: str = ""
    latency: ReportLatency | None = None

    # -- totals ----------------------------------------------------------------------------

    def totals(self) -> dict[str, Any]:
        """Whole-model totals, savings (%) and the attention (SE/GC/CBAM) groups."""
        b, a = self.before, self.after
        rows = self.rows
        groups: dict[str, dict[str, Any]] = {}
        for att in sorted(
            {r.attention for r in rows if r.attention},
            key=lambda x: (_ATTENTION_ORDER.index(x) if x in _ATTENTION_ORDER else 99, x),
        ):
            members = [r for r in rows if r.attention == att]
            groups[att] = self._group(members)
        listed = self._group(list(rows))
        other = {
            "params_before": b.params - listed["params_before"],
            "params_after": a.params - listed["params_after"],
            "macs_before": b.macs - listed["macs_before"],
            "macs_after": a.macs - listed["macs_after"],
        }
        return {
            "params_before": b.params,
            "params_after": a.params,
            "params_saved_pct": _pct(b.params, a.params),
            "macs_before": b.macs,
            "macs_after": a.macs,
            "macs_saved_pct": _pct(b.macs, a.macs),
            "flops_before": b.flops,
            "flops_after": a.flops,
            "layers": len(rows),
            "layers_changed": sum(r.action != "leave" for r in rows),
            "layers_left": sum(r.action == "leave" for r in rows),
            "attention": groups,
            "other": other,
            "latency": None if self.latency is None else self.latency.to_dict(),
        }

    @staticmethod
    def _group(members: list[ReportRow]) -> dict[str, Any]:
        pb = _sum([r.params_before for r in members])
        pa = _sum([r.params_after for r in members])
        mb = _sum([r.macs_before for r in members])
        ma = _sum([r.macs_after for r in members])
        return {
            "layers": len(members),
            "params_before": pb,
            "params_after": pa,
            "params_saved_pct": _pct(pb, pa),
            "macs_before": mb,
            "macs_after": ma,
            "macs_saved_pct": _pct(mb, ma),
        }

    # -- renderers -------------------------------------------------------------------------

    _HEADERS = (
        "layer",
        "kind",
        "action",
        "B/G",
        "channels",
        "params before",
        "params after",
        "MACs before",
        "MACs after",
        "reason",
    )

    def _cells(self, row: ReportRow) -> list[str]:
        return [
            row.name,
            row.display_kind,
            row.action,
            row.b_g,
            row.channels,
            _fmt(row.params_before),
            _fmt(row.params_after),
            _fmt(row.macs_before),
            _fmt(row.macs_after),
            row.reason if row.action == "leave" else "",
        ]

    def _total_lines(self) -> list[list[str]]:
        """(label, before, after, saved) for params, MACs, FLOPs and each attention group."""
        t = self.totals()
        lines = [
            [
                "params",
                _fmt(t["params_before"]),
                _fmt(t["params_after"]),
                _fmt_pct(t["params_saved_pct"]),
            ],
            [
                "MACs (multiply-adds)",
                _fmt(t["macs_before"]),
                _fmt(t["macs_after"]),
                _fmt_pct(t["macs_saved_pct"]),
            ],
            [
                "FLOPs (= 2·MACs)",
                _fmt(t["flops_before"]),
                _fmt(t["flops_after"]),
                _fmt_pct(t["macs_saved_pct"]),
            ],
        ]
        for att, g in t["attention"].items():
            lines.append(
                [
                    f"{att} branches ({g['layers']} layers): params",
                    _fmt(g["params_before"]),
                    _fmt(g["params_after"]),
                    _fmt_pct(g["params_saved_pct"]),
                ]
            )
            lines.append(
                [
                    f"{att} branches ({g['layers']} layers): MACs",
                    _fmt(g["macs_before"]),
                    _fmt(g["macs_after"]),
                    _fmt_pct(g["macs_saved_pct"]),
                ]
            )
        if self.latency is not None:
            lat = self.latency
            lines.append(
                [
                    f"latency ms ({lat.mode})",
                    f"{lat.before_ms:.3f}",
                    f"{lat.after_ms:.3f}",
                    _fmt_pct(lat.saved_pct),
                ]
            )
        return lines

    def _footer(self) -> list[str]:
        t = self.totals()
        shapes = ", ".join("×".join(str(d) for d in s) for s in self.before.input_shapes)
        counters = self.before.counter
        if self.after.counter != counters:
            counters += f" (before) / {self.after.counter} (after)"
        lines = [
            f"{t['layers']} layers: {t['layers_changed']} changed, {t['layers_left']} left.",
            f"MACs for input {shapes or '?'} (whole batch); counter: {counters}. "
            "Element-wise ops (activations, additions, gates) are not counted.",
        ]
        ops = sorted(set(self.before.unsupported_ops) | set(self.after.unsupported_ops))
        if ops:
            lines.append("Not counted (ops no counter covers): " + ", ".join(ops) + ".")
        if self.latency is not None:
            lines.append(self.latency.describe())
        lines.extend(self.notes)
        lines.extend(n for n in self.before.notes + self.after.notes if n not in self.notes)
        return lines

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        """A plain-text table (what ``str(report)`` prints)."""
        body = [list(self._HEADERS)] + [self._cells(r) for r in self.rows]
        numeric = {5, 6, 7, 8}
        widths = [max(len(r[i]) for r in body) for i in range(len(self._HEADERS))]
        out = []
        if self.title:
            out.append(self.title)
        for k, cells in enumerate(body):
            line = "  ".join(
                c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                for i, c in enumerate(cells)
            )
            out.append(line.rstrip())
            if k == 0:
                out.append("-" * len(line.rstrip()))
        out.append("")
        tot = [["total", "before", "after", "saved"]] + self._total_lines()
        tw = [max(len(r[i]) for r in tot) for i in range(4)]
        for cells in tot:
            out.append(
                "  ".join(c.ljust(tw[0]) if i == 0 else c.rjust(tw[i]) for i, c in enumerate(cells))
            )
        out.append("")
        out.extend(self._footer())
        return "\n".join(out)

    def to_markdown(self) -> str:
        """Two GitHub-flavoured Markdown tables (layers, totals) and the notes."""

        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        out = []
        if self.title:
            out += [f"### {self.title}", ""]
        out.append("| " + " | ".join(self._HEADERS) + " |")
        out.append("|" + "|".join("---:" if i in (5, 6, 7, 8) else "---" for i in range(10)) + "|")
        for r in self.rows:
            out.append("| " + " | ".join(esc(c) for c in self._cells(r)) + " |")
        out += ["", "| total | before | after | saved |", "|---|---:|---:|---:|"]
        for cells in self._total_lines():
            out.append("| " + " | ".join(esc(c) for c in cells) + " |")
        out.append("")
        out.extend(f"- {line}" for line in self._footer())
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``version``, ``units``, ``totals``, ``layers``, counters, notes."""
        layers = []
        for r in self.rows:
            d = asdict(r)
            d["params_saved_pct"] = _pct(r.params_before, r.params_after)
            d["macs_saved_pct"] = _pct(r.macs_before, r.macs_after)
            layers.append(d)
        return {
            "version": REPORT_VERSION,
            "title": self.title,
            "units": dict(UNITS),
            "input_shapes": [list(s) for s in self.before.input_shapes],
            "totals": self.totals(),
            "layers": layers,
            "counter": {"before": self.before.counter, "after": self.after.counter},
            "unsupported_ops": {
                "before": dict(self.before.unsupported_ops),
                "after": dict(self.after.unsupported_ops),
            },
            "from_plan": self.from_plan,
            "latency": None if self.latency is None else self.latency.to_dict(),
            "notes": list(self.notes) + list(self.before.notes) + list(self.after.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON (integers exact; savings in percent)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    _CSV_FIELDS = (
        "name",
        "kind",
        "attention",
        "action",
        "B",
        "groups",
        "in_channels",
        "out_channels",
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "reason",
    )

    def to_csv(self) -> str:
        """One row per layer; MACs are multiply-adds; empty cells mean "not applicable"."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self._CSV_FIELDS)
        for r in self.rows:
            writer.writerow(["" if (v := getattr(r, f)) is None else v for f in self._CSV_FIELDS])
        return buf.getvalue()

    def to_rich(self) -> Any:
        """A ``rich`` renderable: the layer table, the totals table and the notes."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.title or None, show_lines=False, header_style="bold")
        for i, h in enumerate(self._HEADERS):
            table.add_column(h, justify="right" if i in (5, 6, 7, 8) else "left", overflow="fold")
        for r in self.rows:
            style = "dim" if r.action == "leave" else None
            table.add_row(*self._cells(r), style=style)
        totals = Table(header_style="bold")
        for i, h in enumerate(("total", "before", "after", "saved")):
            totals.add_column(h, justify="left" if i == 0 else "right")
        for cells in self._total_lines():
            totals.add_row(*cells)
        return Group(table, totals, Text("\n".join(self._footer())))

    def __rich__(self) -> Any:
        return self.to_rich()


# -- building a report ---------------------------------------------------------------------


def _conv_groups(m: nn.Module | None) -> int | None:
    if m is None:
        return None
    inner = getattr(m, "module", None)
    if isinstance(m, TIED_TYPES) and isinstance(inner, nn.Module):  # TiedBlock
        return _conv_groups(inner)
    g = getattr(m, "groups", None)
    return int(g) if isinstance(g, int) else None


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear" if type(m).forward is nn.Linear.forward else "conv_subclass"
    if isinstance(m, nn.modules.conv._ConvNd):
        bases = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.conv._ConvNd)
        base = next(c for c in bases if isinstance(m, c))
        if type(m).forward is not base.forward:
            return "conv_subclass"
        if m.groups > 1 and m.groups == m.in_channels:
            return "depthwise_conv"
        return "grouped_conv" if m.groups > 1 else "conv"
    return type(m).__name__


def _channels(m: nn.Module | None) -> tuple[int | None, int | None]:
    if m is None:
        return None, None
    cin = getattr(m, "in_channels", getattr(m, "in_features", None))
    cout = getattr(m, "out_channels", getattr(m, "out_features", None))
    return (cin if isinstance(cin, int) else None, cout if isinstance(cout, int) else None)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, *TIED_TYPES))


def _rows_by_diff(
    model: nn.Module, tied: nn.Module, before: Counts, after: Counts
) -> list[ReportRow]:
    """Rows for every conv/linear layer, classified by comparing module types by name."""
    old = dict(model.named_modules())
    new = dict(tied.named_modules())
    names: list[str] = []
    inside_tied: list[str] = []
    for name, m in list(old.items()) + list(new.items()):
        if not name or name in names or not _is_layer(m):
            continue
        if any(name.startswith(p + ".") for p in inside_tied):
            continue
        if isinstance(m, TIED_TYPES):
            inside_tied.append(name)
        names.append(name)
    rows = []
    for name in names:
        a, b = old.get(name), new.get(name)
        ref = a if a is not None else b
        if ref is None:  # pragma: no cover - every name came from one of the two models
            continue
        g_before, g_after = _conv_groups(a), _conv_groups(b)
        tied_layer = b is not None and isinstance(b, TIED_TYPES)
        regrouped = g_before is not None and g_after is not None and g_after != g_before
        if tied_layer and regrouped:
            action = "tie+group"
        elif tied_layer:
            action = "tie"
        elif regrouped:
            action = "group"
        else:
            action = "leave"
        B = int(getattr(b, "B", 1)) if tied_layer else None
        reason = ""
        if action == "leave":
            reason = "not in the tied model" if b is None else "unchanged"
        cin, cout = _channels(ref)
        rows.append(
            ReportRow(
                name=name,
                kind=_kind(a) if a is not None else _kind(ref),
                action=action,
                B=B,
                groups=g_after,
                in_channels=cin,
                out_channels=cout,
                params_before=before.params_by_module.get(name),
                params_after=after.params_by_module.get(name),
                macs_before=before.macs_by_module.get(name) if a is not None else None,
                macs_after=after.macs_by_module.get(name) if b is not None else None,
                reason=reason,
                module_before=type(a).__name__ if a is not None else "",
                module_after=type(b).__name__ if b is not None else "",
            )
        )
    return rows


def _rows_from_plan(
    plan: Any, model: nn.Module, tied: nn.Module, before: Counts, after: Counts
) -> list[ReportRow]:
    old = dict(model.named_modules())
    new = dict(tied.named_modules())
    rows = []
    for lp in plan.layers:
        name = lp.name
        a, b = old.get(name), new.get(name)
        action = str(getattr(lp, "action", "leave"))
        B = getattr(lp, "B", None)
        groups = getattr(lp, "groups", None)
        if groups is None:
            groups = getattr(lp, "orig_groups", None)
        rows.append(
            ReportRow(
                name=name,
                kind=str(getattr(lp, "kind", "") or (_kind(a) if a is not None else "")),
                action=action,
                B=int(B) if isinstance(B, int) and "tie" in action else None,
                groups=int(groups) if isinstance(groups, int) else None,
                in_channels=getattr(lp, "in_channels", None),
                out_channels=getattr(lp, "out_channels", None),
                params_before=before.params_by_module.get(name),
                params_after=after.params_by_module.get(name),
                macs_before=before.macs_by_module.get(name) if a is not None else None,
                macs_after=after.macs_by_module.get(name) if b is not None else None,
                attention=getattr(lp, "attention", None) or None,
                reason=str(getattr(lp, "reason", "") or ""),
                module_before=type(a).__name__ if a is not None else "",
                module_after=type(b).__name__ if b is not None else "",
                stage=getattr(lp, "stage", None),
                role=getattr(lp, "role", None),
                mixer=getattr(lp, "mixer", None),
            )
        )
    return rows


def _example(model: nn.Module) -> torch.Tensor:
    from ._models import default_input_size

    p = next(model.parameters(), None)
    return torch.randn(
        1,
        *default_input_size(model),
        device=None if p is None else p.device,
        dtype=None if p is None else p.dtype,
    )


def report(
    model: nn.Module,
    tied: nn.Module,
    example_inputs: Any = None,
    *,
    plan: Any = None,
    counter: str = "auto",
    title: str = "",
    latency: str | None = None,
    threads: int | None = None,
) -> Report:
    """Compare ``tied`` with ``model``: per-layer and total parameters and multiply-adds, and
    on request the whole model's forward latency.

    Rows come from the plan that built ``tied`` (``tied.tieify_plan``, or ``plan=``): kind,
    action, B/G, attention branch and the reason a layer was left. Without a plan, every
    conv/linear layer is listed and classified by comparing module types by name.

    Args:
        model: the original model (not modified; counted in eval mode).
        tied: the rewritten model.
        example_inputs: a tensor or tuple of inputs; ``None`` uses one random sample of the
            model's default input size (:func:`tieify._models.default_input_size`).
        plan: a :class:`tieify.Plan` to use instead of ``tied.tieify_plan``.
        counter: ``"auto"``, ``"fvcore"`` or ``"flop_counter"`` (see :func:`tieify.count`).
        title: a heading for the rendered tables.
        latency: ``None`` (counts only, the default: exact and quick), ``"measured"`` (both
            models timed side by side on ``example_inputs``, in interleaved rounds spanning
            at least :data:`MEASURE_SECONDS`: each model's fastest round, the median of the
            rounds' ratios) or ``"predicted"``
            (:func:`tieify.predict_latency`, which times only layer configurations its
            on-disk table does not hold yet). Inference in eval mode; both models are left as
            they were. Pass inputs (and models) in the memory layout, dtype and device to
            time, and run :func:`tieify.optimize` on ``tied`` first to time its fastest paths
            (and on ``model`` too: on NCHW inputs it may make its inputs channels-last at
            its entry, so the tied model is not credited with that gain).
        threads: intra-op threads for the latency (default: the current setting).

    Returns:
        A :class:`Report`; print it, or call ``to_markdown()``, ``to_json()``, ``to_csv()``.

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv2d
        >>> dense = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False))
        >>> tied = torch.nn.Sequential(TiedConv2d.from_dense(dense[0], B=4))
        >>> rep = report(dense, tied, torch.randn(1, 64, 8, 8))
        >>> rep.totals()["params_before"], rep.totals()["params_after"]
        (36864, 2304)
    """
    for arg, value in (("model", model), ("tied", tied)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"report(): `{arg}` must be an nn.Module, but got {type(value)}.")
    if latency is not None and latency not in LATENCY_MODES:
        raise ValueError(
            f"report(): latency must be None, 'measured' or 'predicted', but got {latency!r}; "
            "e.g. report(model, tied, x, latency='measured')."
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"report(): threads must be a positive int or None, but got {threads!r}.")
    if example_inputs is None:
        example_inputs = _example(model)
    before = count(model, example_inputs, counter=counter)
    after = count(tied, example_inputs, counter=counter)
    notes: list[str] = []
    if before.counter != after.counter:
        # Compare like with like: recount the side fvcore managed with the fallback too.
        notes.append("fvcore failed on one model; both were counted with torch.utils.flop_counter.")
        if before.counter != "flop_counter":
            before = count(model, example_inputs, counter="flop_counter")
        if after.counter != "flop_counter":
            after = count(tied, example_inputs, counter="flop_counter")
    timed = None if latency is None else _latency(model, tied, example_inputs, latency, threads)
    plan = plan if plan is not None else getattr(tied, "tieify_plan", None)
    if plan is not None and hasattr(plan, "layers"):
        rows = _rows_from_plan(plan, model, tied, before, after)
        from_plan = True
    else:
        rows = _rows_by_diff(model, tied, before, after)
        from_plan = False
        notes.append("no plan attached to the tied model: layers classified by module types.")
    return Report(
        rows=tuple(rows),
        before=before,
        after=after,
        from_plan=from_plan,
        notes=tuple(notes),
        title=title,
        latency=timed,
    )


def _device_of(example_inputs: Any) -> torch.device:
    from .latency._predict import _example_tensor

    t = _example_tensor(example_inputs)
    return torch.device("cpu") if t is None else t.device


def _latency(
    model: nn.Module, tied: nn.Module, example_inputs: Any, mode: str, threads: int | None
) -> ReportLatency:
    """Both models' forward latency (see :func:`report`'s ``latency``)."""
    from .latency import _predict
    from .latency._machine import describe_machine
    from .latency._timing import LATENCY_STATISTIC, num_threads, reduce_samples

    with num_threads(threads):
        n_threads = torch.get_num_threads()
        rounds = None
        if mode == "measured":
            samples = _predict.measure_side_by_side(
                {"before": model, "after": tied}, example_inputs, min_seconds=MEASURE_SECONDS
            )
            before = reduce_samples(samples["before"], LATENCY_STATISTIC)
            after = reduce_samples(samples["after"], LATENCY_STATISTIC)
            ratio = statistics.median(
                a / b for a, b in zip(samples["after"], samples["before"], strict=True)
            )
            rounds = len(samples["before"])
        else:
            before = _predict.predict_latency(model, example_inputs)
            after = _predict.predict_latency(tied, example_inputs)
            ratio = after / before
    return ReportLatency(
        mode=mode,
        before_ms=before * 1e3,
        after_ms=after * 1e3,
        ratio=ratio,
        threads=n_threads,
        machine=describe_machine(_device_of(example_inputs)),
        rounds=rounds,
    )
