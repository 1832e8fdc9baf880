"""``tieify report MODEL``: tie a model and print what it saves, layer by layer.

Examples::

    tieify report resnet50 --B 4
    tieify report resnet50 --B "layer4.*=8,*=4" --format markdown -o report.md
    tieify report timm:seresnext26d_32x4d --B 4 --input-size 3,256,256 --format json
    tieify report mynet.py:make_net --groups 2 --input-size 3,32,32
    tieify report resnet50 --B 4 --latency measured --channels-last --optimize --batch 8

SPEC (``--B``, ``--groups``): an int; comma-separated ``pattern=value`` pairs over qualified
module names (glob patterns; ``none`` leaves the layer); or a YAML/JSON file holding an int
or such a mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .._errors import SpecError
from .._modes import eval_mode

__all__ = ["add_parser", "parse_spec", "parse_input_size", "run"]

FORMATS = ("table", "markdown", "json", "csv")
_NONE = {"none", "null", "leave", "-"}
_SPEC_FILE = (".yaml", ".yml", ".json")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tieify report`` on ``subparsers``."""
    p = subparsers.add_parser(
        "report",
        help="tie a model and report parameters and multiply-adds per layer (and latency)",
        description=(
            "Tie MODEL with the given B/groups and print per-layer and total parameters and "
            "multiply-adds (MACs; FLOPs = 2·MACs), before and after; with --latency, the "
            "whole model's forward latency on this machine too."
        ),
        epilog=(
            "MODEL: a torchvision name (resnet50), timm:NAME, package.module:factory or "
            "path/to/file.py:factory. SPEC: an int, 'pattern=value' pairs ('layer4.*=8,*=4'; "
            "value 'none' leaves a layer) or a YAML/JSON file."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model to tie (see below)")
    p.add_argument("--B", dest="B", metavar="SPEC", help="tied blocks per layer")
    p.add_argument("--groups", metavar="SPEC", help="filter groups per conv (Deep Roots)")
    p.add_argument("--preset", metavar="NAME", help="a named schedule (e.g. root-8)")
    p.add_argument(
        "--input-size",
        metavar="C,H,W",
        help=(
            "per-sample input size (default: the model's: 3,299,299 for inception_v3, "
            "3,16,112,112 for video models, a torchvision ViT's own image_size, timm's "
            "pretrained_cfg; else 224x224 with the first convolution's channels)"
        ),
    )
    p.add_argument("--batch", default="1", metavar="N", help="batch size of the input (1)")
    p.add_argument(
        "--counter",
        default="auto",
        choices=("auto", "fvcore", "flop_counter"),
        help="MAC counter (auto: fvcore, torch.utils.flop_counter when its trace fails)",
    )
    p.add_argument(
        "--latency",
        choices=("measured", "predicted"),
        help="also report forward latency (eval, inference): 'measured' times both models "
        "side by side; 'predicted' uses tieify.predict_latency's on-disk table",
    )
    p.add_argument(
        "--threads", metavar="N", help="intra-op threads for --latency (default: torch's)"
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="time both models and the input in channels-last memory format (--latency)",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="run tieify.optimize on both models before timing them: the tied layers' "
        "fastest paths and, on an NCHW input, the tied layers in channels-last where faster, "
        "and each model's input made channels-last at its entry where faster (--latency)",
    )
    p.add_argument("--format", default="table", choices=FORMATS, help="output format (table)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    p.set_defaults(func=run)
    return p  # type: ignore[no-any-return]


# -- parsing -------------------------------------------------------------------------------


def _spec_value(value: Any, flag: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _NONE:
            return None
        try:
            value = int(text)
        except ValueError:
            raise SpecError(
                f"{flag}: {where} must be a positive int or 'none', but got {text!r}; e.g. "
                f"{flag} 'layer4.*=8,*=4'."
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(
            f"{flag}: {where} must be a positive int or 'none', but got {value!r}; e.g. "
            f"{flag} 'layer4.*=8,*=4'."
        )
    return value


def _load_spec_file(path: Path, flag: str) -> Any:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"{flag}: {str(path)!r} is not valid JSON ({err}).") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SpecError(f"{flag}: {str(path)!r} is not valid YAML ({first}).") from None


def parse_spec(text: str | None, flag: str = "--B") -> int | dict[str, int | None] | None:
    """Parse a CLI SPEC: an int, ``pattern=value`` pairs, or a YAML/JSON file.

    Args:
        text: the argument as given (``None``: not given).
        flag: the option name, for error messages.

    Returns:
        ``None``, an int, or a mapping from glob patterns to ints (``None`` = leave).

    Raises:
        SpecError: empty or malformed pairs, values that are not positive ints, a missing or
            malformed file.

    Example:
        >>> parse_spec("layer4.*=8,*=4")
        {'layer4.*': 8, '*': 4}
        >>> parse_spec("4")
        4
    """
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise SpecError(f"{flag} must not be empty; give an int, 'pattern=value' pairs or a file.")
    path = Path(text).expanduser()
    if text.lower().endswith(_SPEC_FILE) or (os.sep in text and path.exists()):
        if not path.is_file():
            raise SpecError(f"{flag}: spec file {text!r} does not exist.")
        data = _load_spec_file(path, flag)
        if isinstance(data, dict):
            return {str(k): _spec_value(v, flag, f"the value of {k!r}") for k, v in data.items()}
        value = _spec_value(data, flag, f"the content of {text!r}")
        if value is None:
            raise SpecError(f"{flag}: spec file {text!r} holds no B; give an int or a mapping.")
        return value
    if "=" not in text:
        value = _spec_value(text, flag, "SPEC")
        if value is None:
            raise SpecError(f"{flag} 'none' leaves every layer; give an int such as {flag} 4.")
        return value
    spec: dict[str, int | None] = {}
    for part in text.split(","):
        pattern, sep, value_text = part.partition("=")
        pattern = pattern.strip()
        if not sep or not pattern:
            raise SpecError(
                f"{flag}: every comma-separated item must be 'pattern=value', but got "
                f"{part.strip()!r} in {text!r}; e.g. {flag} 'layer4.*=8,*=4'."
            )
        if pattern in spec:
            raise SpecError(f"{flag}: pattern {pattern!r} is given twice in {text!r}.")
        spec[pattern] = _spec_value(value_text, flag, f"the value of {pattern!r}")
    return spec


def parse_input_size(text: str) -> tuple[int, ...]:
    """Parse ``--input-size``: ``C,H,W`` (or ``C,L`` / ``C,T,H,W``), positive ints.

    Example:
        >>> parse_input_size("3,224,224")
        (3, 224, 224)
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if not size or len(size) < 2 or len(size) > 4 or any(v < 1 for v in size):
        raise SpecError(
            f"--input-size must be 2 to 4 positive comma-separated ints (C,H,W), but got "
            f"{text!r}; e.g. --input-size 3,224,224."
        )
    return size


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SpecError(f"{flag} must be a positive int, but got {text!r}; e.g. {flag} 1.")
    return value


# -- running -------------------------------------------------------------------------------


def _preset_kwargs(name: str, model: Any) -> dict[str, Any]:
    try:
        from .._presets import get_preset
    except ImportError:
        raise SpecError("--preset: presets are not available in this build.") from None
    try:
        preset = get_preset(name, model)
    except KeyError as err:
        message = str(err.args[0]) if err.args else f"unknown preset {name!r}"
        raise SpecError(f"--preset: {message}") from None
    if isinstance(preset, dict):
        return dict(preset)
    if hasattr(preset, "apply"):
        return {"plan": preset}
    raise SpecError(f"--preset {name!r} gave {type(preset).__name__}, which tieify cannot use.")


def _probe(model: Any, x: Any, size: tuple[int, ...], given: bool) -> None:
    """Run the model once so that a wrong input size fails with one readable line."""
    import torch

    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        origin = "--input-size" if given else "the default input size"
        raise SpecError(
            f"{origin} {','.join(map(str, size))} does not fit the model: its forward "
            f"failed with {type(err).__name__}: {first[:300]}; give the size it expects with "
            "--input-size C,H,W."
        ) from None


def _describe(args: argparse.Namespace) -> str:
    parts = [f"--{k} {v}" for k, v in (("B", args.B), ("groups", args.groups)) if v]
    if args.preset:
        parts.append(f"--preset {args.preset}")
    return " ".join(parts)


def _render(rep: Any, fmt: str, to_terminal: bool) -> str | None:
    if fmt == "markdown":
        return str(rep.to_markdown())
    if fmt == "json":
        return str(rep.to_json()) + "\n"
    if fmt == "csv":
        return str(rep.to_csv())
    if to_terminal:
        return None  # printed with rich
    return str(rep.to_text()) + "\n"


def run(args: argparse.Namespace) -> int:
    """Handler of ``tieify report``; returns the exit code."""
    import torch

    from .._models import default_input_size, resolve_model
    from .._report import report

    B = parse_spec(args.B, "--B")
    groups = parse_spec(args.groups, "--groups")
    size_given = args.input_size is not None
    size = parse_input_size(args.input_size) if size_given else None
    batch = _positive_int(args.batch, "--batch")
    threads = None if args.threads is None else _positive_int(args.threads, "--threads")
    timing_flags = [
        flag
        for flag, given in (
            ("--threads", threads is not None),
            ("--channels-last", args.channels_last),
            ("--optimize", args.optimize),
        )
        if given
    ]
    if timing_flags and args.latency is None:
        raise SpecError(
            f"{', '.join(timing_flags)} only {'changes' if len(timing_flags) == 1 else 'change'} "
            "how latency is timed; add --latency measured or --latency predicted."
        )
    if B is None and groups is None and not args.preset:
        raise SpecError(
            "nothing to tie: give --B SPEC, --groups SPEC or --preset NAME; e.g. "
            f"tieify report {args.model} --B 4."
        )
    model = resolve_model(args.model)
    if size is None:
        size = default_input_size(model, args.model)
    x = torch.randn(batch, *size)
    _probe(model, x, size, size_given)

    kwargs: dict[str, Any] = _preset_kwargs(args.preset, model) if args.preset else {}
    plan = kwargs.pop("plan", None)
    if plan is not None and (B is not None or groups is not None):
        raise SpecError(
            f"--preset {args.preset!r} is a complete plan; it cannot be combined with --B or "
            "--groups."
        )
    if B is not None:
        kwargs["B"] = B
    elif "B" not in kwargs:
        kwargs["B"] = None  # only what was asked for: --groups alone groups, ties nothing
    if groups is not None:
        kwargs["groups"] = groups
    if plan is not None:
        tied = plan.apply(model)
    else:
        from .._api import tieify

        tied = tieify(model, example_inputs=x, **kwargs)
    shape = "×".join(str(v) for v in (batch, *size))
    layout = ", channels-last" if args.channels_last else ""
    title = f"tieify report {args.model} {_describe(args)} (input {shape}{layout})"
    if args.channels_last:
        if x.dim() != 4:
            raise SpecError(
                f"--channels-last needs a 4-D input (N,C,H,W), but the input is "
                f"{x.dim()}-D ({shape}); drop --channels-last."
            )
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        tied = tied.to(memory_format=torch.channels_last)
    if args.optimize:  # both: the original keeps its own gain from channels-last inputs
        from ..latency import optimize

        for m in (model, tied):
            optimize(m, x, threads=threads)
    rep = report(
        model, tied, x, counter=args.counter, title=title, latency=args.latency, threads=threads
    )

    to_terminal = args.output is None and args.format == "table" and sys.stdout.isatty()
    text = _render(rep, args.format, to_terminal)
    if args.output is not None:
        out = Path(args.output).expanduser()
        try:
            out.write_text(text or "")
        except OSError as err:
            raise SpecError(f"-o: cannot write {str(out)!r}: {err.strerror}.") from None
        print(f"tieify report: wrote {out}", file=sys.stderr)
    elif text is None:
        from rich.console import Console

        Console().print(rep)
    else:
        sys.stdout.write(text)
    return 0
