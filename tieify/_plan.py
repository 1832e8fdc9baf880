"""Plans: what tieify will do to each layer of a model, as plain, versioned data.

A :class:`Plan` is produced by :func:`tieify.plan` (nothing is changed) and applied with
:meth:`Plan.apply` (a rewritten copy). It round-trips through JSON (``to_json`` /
``from_json``) with a ``version`` field, so a search result, a checkpoint or a recipe is
"a plan + weights".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import PlanError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["PLAN_VERSION", "LayerPlan", "Plan", "ACTIONS", "TIEABLE_KINDS"]

PLAN_VERSION = 1

ACTIONS = ("tie", "group", "tie+group", "leave")

# Layer kinds the apply pass knows how to tie (given a valid B).
TIEABLE_KINDS = (
    "conv",
    "grouped_conv",
    "linear",
    "conv_subclass",
    "linear_subclass",
    "functional_conv",
    "functional_linear",
)

# Kinds that can be turned into G-group convolutions (Deep Roots).
GROUPABLE_KINDS = ("conv", "grouped_conv")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer.

    Attributes:
        name: qualified module name (``"layer1.0.conv2"``); functional calls are
            ``"fx:<node name>"``.
        kind: ``"conv"``, ``"grouped_conv"``, ``"depthwise_conv"``, ``"linear"``,
            ``"conv_subclass"``, ``"linear_subclass"``, ``"transposed_conv"``,
            ``"functional_conv"``, ``"functional_linear"``.
        action: ``"tie"``, ``"group"``, ``"tie+group"`` or ``"leave"``.
        B: tied blocks (per group); 1 when not tied.
        groups: target groups; the layer's own groups when unchanged.
        orig_groups: the layer's groups before the rewrite.
        in_channels: input channels (features for linear layers).
        out_channels: output channels (features).
        kernel_size: the kernel, ``()`` for linear layers.
        module_type: fully qualified class name (``"torch.nn.modules.conv.Conv2d"``).
        attention: ``"SE"``, ``"GC"`` or ``"CBAM"`` when the layer sits in such a branch.
        branch: qualified name of the attention branch module, if known.
        stage: the stage the layer belongs to (``"layer3"``, ``"stages.2"``), if known.
        depth: order among the tieable layers in the forward pass (0-based).
        mixer: ``"concat"`` / ``"sum"`` when a mixer follows the tied layer.
        reason: why the layer is left (or a note); ``""`` otherwise.
        role: ``"stem"`` (reads the image channels), ``"head"`` (final classifier) or None.
        tieable: whether the rewrite supports this layer kind at all (B aside).
        weight_target: functional layers: the qualified weight parameter they read.
        bias_target: functional layers: the qualified bias parameter, if any.
    """

    name: str
    kind: str
    action: str
    B: int
    groups: int
    orig_groups: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    module_type: str
    attention: str | None = None
    branch: str | None = None
    stage: str | None = None
    depth: int = -1
    mixer: str | None = None
    reason: str = ""
    role: str | None = None
    tieable: bool = True
    weight_target: str | None = None
    bias_target: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PlanError(
                f"LayerPlan {self.name!r}: `action` must be one of {ACTIONS}, but got "
                f"{self.action!r}."
            )
        for attr in ("B", "groups", "orig_groups", "in_channels", "out_channels"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanError(
                    f"LayerPlan {self.name!r}: `{attr}` must be a positive int, but got {v!r}."
                )
        if self.mixer not in (None, "concat", "sum"):
            raise PlanError(
                f"LayerPlan {self.name!r}: `mixer` must be None, 'concat' or 'sum', but got "
                f"{self.mixer!r}."
            )

    # -- candidates for search --------------------------------------------------------------

    def valid_B(self, groups: int | None = None) -> list[int]:
        """Sorted B values that divide the input and output channels per group.

        Args:
            groups: the groups to tie inside; default the plan's target ``groups``.

        Returns:
            ``[]`` when the layer kind cannot be tied at all (depthwise, transposed, ...),
            otherwise the common divisors of ``in/groups`` and ``out/groups`` (always
            containing 1).

        Example:
            >>> lp = LayerPlan("c", "conv", "leave", 1, 1, 1, 64, 96, (3, 3), "Conv2d")
            >>> lp.valid_B()
            [1, 2, 4, 8, 16, 32]
        """
        if not self.tieable or self.kind not in TIEABLE_KINDS:
            return []
        g = self.groups if groups is None else groups
        if g < 1 or self.in_channels % g or self.out_channels % g:
            return []
        cin, cout = self.in_channels // g, self.out_channels // g
        return sorted(set(_divisors(cin)) & set(_divisors(cout)))

    def valid_groups(self) -> list[int]:
        """Sorted group counts this layer can be turned into (Deep Roots); ``[]`` if none.

        Only dense convolutions (``orig_groups == 1``) are grouped; the result holds the
        common divisors of the channel counts.
        """
        if not self.tieable or self.kind != "conv" or self.orig_groups != 1:
            return []
        return sorted(set(_divisors(self.in_channels)) & set(_divisors(self.out_channels)))

    @property
    def is_tied(self) -> bool:
        return self.action != "leave"

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernel_size"] = list(self.kernel_size)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> LayerPlan:
        if not isinstance(d, dict):
            raise PlanError(f"a plan layer must be a JSON object, but got {type(d).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise PlanError(
                f"plan layer {d.get('name', '?')!r} lacks the keys {missing}; the JSON was not "
                "written by tieify or was edited by hand."
            )
        unknown = sorted(set(d) - names)
        if unknown:
            raise PlanError(
                f"plan layer {d.get('name', '?')!r} has unknown keys {unknown}; known keys: "
                f"{sorted(names)}."
            )
        kw = dict(d)
        ks = kw["kernel_size"]
        if not isinstance(ks, (list, tuple)) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in ks
        ):
            raise PlanError(
                f"plan layer {d['name']!r}: `kernel_size` must be a list of ints, but got {ks!r}."
            )
        kw["kernel_size"] = tuple(ks)
        for attr in ("name", "kind", "module_type", "reason"):
            if not isinstance(kw.get(attr, ""), str):
                raise PlanError(
                    f"plan layer {d['name']!r}: `{attr}` must be a string, but got {kw[attr]!r}."
                )
        return cls(**kw)


def _fmt_channels(lp: LayerPlan) -> str:
    return f"{lp.in_channels}->{lp.out_channels}"


@dataclass(frozen=True)
class Plan:
    """A per-layer rewrite plan for one model architecture.

    Attributes:
        layers: one :class:`LayerPlan` per tieable-looking layer, in forward order when the
            model was traced (module order otherwise).
        model_type: fully qualified class name of the planned model.
        transfer: weight transfer used when applying (``"mean"`` or None).
        traced: False when torch.fx failed and a module walk was used (no attention
            detection, no functional calls).
        notes: free-text remarks (why tracing failed, ...).
        version: the plan format version (:data:`PLAN_VERSION`).

    Example:
        >>> import torch, tieify
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 4, 1))
        >>> p = tieify.plan(model, B=2)
        >>> [(lp.action, lp.role) for lp in p.layers]
        [('leave', 'stem'), ('tie', None), ('leave', 'head')]
        >>> p == tieify.Plan.from_json(p.to_json())
        True
    """

    layers: tuple[LayerPlan, ...]
    model_type: str
    transfer: str | None = "mean"
    traced: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.transfer not in ("mean", None):
            raise PlanError(f"Plan: `transfer` must be 'mean' or None, but got {self.transfer!r}.")
        seen: set[str] = set()
        for lp in self.layers:
            if not isinstance(lp, LayerPlan):
                raise PlanError(f"Plan.layers must hold LayerPlan, but got {type(lp).__name__}.")
            if lp.name in seen:
                raise PlanError(f"Plan: layer {lp.name!r} appears twice.")
            seen.add(lp.name)

    # -- queries ------------------------------------------------------------------------------

    def tied(self) -> list[LayerPlan]:
        """The layers whose action is not ``"leave"``."""
        return [lp for lp in self.layers if lp.action != "leave"]

    def left(self) -> list[LayerPlan]:
        """The layers left unchanged (each with a reason)."""
        return [lp for lp in self.layers if lp.action == "leave"]

    def candidates(self, include_stem_head: bool = False) -> list[LayerPlan]:
        """Every layer that could be tied with some B > 1 (see :meth:`LayerPlan.valid_B`).

        Args:
            include_stem_head: also list the stem conv and the final classifier (left dense
                by default).
        """
        out = []
        for lp in self.layers:
            if not include_stem_head and lp.role in ("stem", "head"):
                continue
            if len(lp.valid_B(lp.orig_groups)) > 1:
                out.append(lp)
        return out

    def layer(self, name: str) -> LayerPlan:
        """The :class:`LayerPlan` named ``name``; raises KeyError naming close matches."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan; it has {len(self.layers)} layers.")

    def summary(self) -> dict[str, int]:
        """Layer counts per action, e.g. ``{"tie": 16, "leave": 4}``."""
        out: dict[str, int] = {}
        for lp in self.layers:
            out[lp.action] = out.get(lp.action, 0) + 1
        return out

    def replace(self, **changes: Any) -> Plan:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # -- applying -----------------------------------------------------------------------------

    def apply(self, model: nn.Module, inplace: bool = False) -> nn.Module:
        """Rewrite ``model`` (a copy unless ``inplace``) according to this plan.

        The returned model carries the plan as the attribute ``tieify_plan``.

        Raises:
            PlanError: the plan does not fit the model (a named layer is missing or has other
                channel counts).
        """
        from ._apply import apply_plan

        return apply_plan(self, model, inplace=inplace)

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_type": self.model_type,
            "transfer": self.transfer,
            "traced": self.traced,
            "notes": list(self.notes),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    def to_json(self, path: str | Path | None = None, indent: int | None = 1) -> str:
        """The plan as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).expanduser().write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Validate and build a plan from :meth:`to_dict`'s output.

        Raises:
            PlanError: wrong version, missing or unknown keys, wrong types.
        """
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a JSON object, but got {type(d).__name__}.")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise PlanError(
                f"plan `version` must be {PLAN_VERSION}, but got {version!r}; this plan was "
                "written by another tieify version; re-create it with tieify.plan()."
            )
        required = ("model_type", "layers")
        missing = [k for k in required if k not in d]
        if missing:
            raise PlanError(f"plan lacks the keys {missing}; expected the output of to_dict().")
        known = {"version", "model_type", "transfer", "traced", "notes", "layers"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"plan has unknown keys {unknown}; known keys: {sorted(known)}.")
        if not isinstance(d["layers"], list):
            raise PlanError(f"plan `layers` must be a list, but got {type(d['layers']).__name__}.")
        notes = d.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise PlanError(f"plan `notes` must be a list of strings, but got {notes!r}.")
        return cls(
            layers=tuple(LayerPlan.from_dict(x) for x in d["layers"]),
            model_type=str(d["model_type"]),
            transfer=d.get("transfer", "mean"),
            traced=bool(d.get("traced", True)),
            notes=tuple(notes),
            version=version,
        )

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Read a plan from JSON text or from a file path.

        Raises:
            PlanError: the text is not valid JSON, the file is missing, or the plan is invalid.
        """
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise PlanError(
                    f"plan: {text[:80]!r} is neither JSON text nor an existing file; pass the "
                    "output of Plan.to_json() or its path."
                )
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan JSON is malformed: {err}.") from None
        return cls.from_dict(data)

    # -- display ------------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows: name, kind, action, B/G, channels, attention, reason."""
        out: list[tuple[str, ...]] = []
        for lp in self.layers:
            bg = f"{lp.B}/{lp.groups}"
            kind = lp.kind if lp.attention is None else f"{lp.kind} [{lp.attention}]"
            out.append((lp.name, kind, lp.action, bg, _fmt_channels(lp), lp.reason))
        return out

    def __str__(self) -> str:
        header = ("layer", "kind", "action", "B/G", "channels", "reason")
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = []
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
        s = self.summary()
        head = (
            f"Plan for {self.model_type}: {len(self.layers)} layers, "
            + ", ".join(f"{k} {v}" for k, v in sorted(s.items()))
            + ("" if self.traced else " (not traced: module walk)")
        )
        tail = [f"note: {n}" for n in self.notes]
        return "\n".join([head, *lines, *tail])

    def __rich__(self) -> Any:
        from rich.table import Table

        t = Table(title=f"Plan for {self.model_type}")
        for col in ("layer", "kind", "action", "B/G", "channels", "reason"):
            t.add_column(col)
        for r in self.rows():
            t.add_row(*r)
        return t
