"""Resolve a MODEL string (as the CLI takes it) to a freshly built ``nn.Module``.

Forms:

- ``resnet50``: a torchvision model name (``torchvision.models.list_models()``), built with
  ``weights=None`` (no download);
- ``timm:NAME``: a timm model (``pretrained=False``); timm is imported only here;
- ``package.module:factory``: a callable (function or class) in an importable module;
- ``path/to/file.py:factory``: a callable in a Python file.

:func:`default_input_size` gives the input size ``(C, H, W)`` (``(C, T, H, W)`` for video
models) a model expects by default.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ._errors import ModelResolveError

__all__ = ["resolve_model", "default_input_size", "torchvision_model_names"]

# torchvision models whose default input differs from 3×224×224.
_TORCHVISION_SIZES: dict[str, tuple[int, ...]] = {"inception_v3": (3, 299, 299)}
_VIDEO_SIZE = (3, 16, 112, 112)


def torchvision_model_names(module: Any = None) -> list[str]:
    """Names ``torchvision.models.list_models`` knows (all tasks, or one ``module``)."""
    import torchvision

    if module is None:
        return list(torchvision.models.list_models())
    return list(torchvision.models.list_models(module=module))


def _close(name: str, names: list[str]) -> str:
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(matches)}?" if matches else ""


def _check_module(obj: Any, spec: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise ModelResolveError(
            f"MODEL {spec!r} must build an nn.Module, but its factory returned "
            f"{type(obj).__name__}; return the model from the factory."
        )
    return obj


def _call(factory: Any, spec: str, kw: dict[str, Any]) -> nn.Module:
    if isinstance(factory, nn.Module):
        if kw:
            raise ModelResolveError(
                f"MODEL {spec!r} names a model instance, which takes no arguments, but got "
                f"{sorted(kw)}; name a factory function or class instead."
            )
        return factory
    if not callable(factory):
        raise ModelResolveError(
            f"MODEL {spec!r} must name a callable that builds an nn.Module, but it is a "
            f"{type(factory).__name__}."
        )
    return _check_module(_build(factory, spec, kw), spec)


def _build(factory: Callable[..., Any], spec: str, kw: dict[str, Any]) -> Any:
    """Call a model factory; its failure becomes a one-line :class:`ModelResolveError`."""
    try:
        return factory(**kw)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        raise ModelResolveError(
            f"MODEL {spec!r}: building it with ({args}) failed with {type(err).__name__}: "
            f"{first}; check the factory's arguments."
        ) from err


def _torchvision(name: str, spec: str, kw: dict[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision_model_names()
    if name not in names:
        if _timm_has(name):
            hint = f" timm has it: use 'timm:{name}'."
        else:
            hint = _close(name, names)
        raise ModelResolveError(
            f"unknown model {spec!r}: not a torchvision model name.{hint} Give a name from "
            "torchvision.models.list_models(), 'timm:NAME', 'package.module:factory' or "
            "'path/to/file.py:factory'."
        )
    kw = {"weights": None, **kw}
    if name in ("inception_v3", "googlenet") and "init_weights" not in kw:
        kw["init_weights"] = True  # silences torchvision's warning; the default when unset
    return _check_module(
        _build(lambda **k: torchvision.models.get_model(name, **k), spec, kw), spec
    )


def _import_timm(spec: str) -> Any:
    try:
        import timm
    except ImportError as err:
        raise ModelResolveError(
            f'MODEL {spec!r} needs timm, which is not installed; run: pip install "tieify[timm]"'
        ) from err
    return timm


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def _timm(name: str, spec: str, kw: dict[str, Any]) -> nn.Module:
    timm = _import_timm(spec)
    if not name or not timm.is_model(name):
        hint = _close(name, list(timm.list_models()))
        raise ModelResolveError(
            f"unknown model {spec!r}: timm has no model {name!r}.{hint} See "
            "timm.list_models() for the names."
        )
    return _check_module(
        _build(lambda **k: timm.create_model(name, **k), spec, {"pretrained": False, **kw}), spec
    )


def _from_file(path: str, attr: str, spec: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelResolveError(
            f"MODEL {spec!r}: file {str(file)!r} does not exist; give an existing "
            "'path/to/file.py:factory'."
        )
    mod_name = f"_tieify_user_{abs(hash(str(file.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelResolveError(f"MODEL {spec!r}: cannot load {str(file)!r} as Python.")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its siblings
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        raise ModelResolveError(
            f"MODEL {spec!r}: importing {str(file)!r} failed with {type(err).__name__}: {err}"
        ) from err
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return _get_attr(module, attr, spec, str(file))


def _from_module(mod_name: str, attr: str, spec: str) -> Any:
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise ModelResolveError(
            f"MODEL {spec!r}: cannot import module {mod_name!r} ({err}); check the name and "
            "that its package is installed (or give 'path/to/file.py:factory')."
        ) from err
    return _get_attr(module, attr, spec, mod_name)


def _get_attr(module: Any, attr: str, spec: str, where: str) -> Any:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ModelResolveError(
                f"MODEL {spec!r}: {where!r} has no attribute {attr!r}.{_close(attr, names)}"
            )
        obj = getattr(obj, part)
    return obj


def resolve_model(spec: str, **kw: Any) -> nn.Module:
    """Build the model a MODEL string names; ``kw`` go to its factory.

    Args:
        spec: ``"resnet50"`` (torchvision, ``weights=None``), ``"timm:NAME"``
            (``pretrained=False``), ``"package.module:factory"`` or
            ``"path/to/file.py:factory"``.
        **kw: keyword arguments for the factory (e.g. ``num_classes=10``).

    Returns:
        A new ``nn.Module`` with freshly initialized weights (nothing is downloaded).

    Raises:
        ModelResolveError: an unknown name (with close matches), a missing file, module or
            factory, a factory that does not return an ``nn.Module``, or timm not installed.

    Example:
        >>> model = resolve_model("resnet18", num_classes=10)
        >>> model.fc.out_features
        10
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelResolveError(
            f"MODEL must be a non-empty string, but got {spec!r}; e.g. 'resnet50', "
            "'timm:resnet50d', 'mypkg.models:make_net' or 'net.py:make_net'."
        )
    spec = spec.strip()
    if spec.startswith("timm:"):
        return _timm(spec[len("timm:") :], spec, kw)
    if ":" not in spec:
        return _torchvision(spec, spec, kw)
    left, attr = spec.rsplit(":", 1)
    if not left or not attr:
        raise ModelResolveError(
            f"MODEL {spec!r} must be 'module:factory' or 'file.py:factory' with both parts "
            "non-empty."
        )
    is_file = left.endswith(".py") or "/" in left or os.sep in left
    factory = _from_file(left, attr, spec) if is_file else _from_module(left, attr, spec)
    return _call(factory, spec, kw)


def _first_conv(model: nn.Module) -> nn.modules.conv._ConvNd | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m
    return None


def default_input_size(model: nn.Module, spec: str | None = None) -> tuple[int, ...]:
    """The per-sample input size a model expects: ``(C, H, W)``, or ``(C, T, H, W)`` for 3-D.

    Order of sources: a ``default_input_size`` attribute on the model; timm's
    ``pretrained_cfg["input_size"]``; torchvision's known sizes (``inception_v3``: 299; video
    models: 16×112×112); a torchvision ViT's own ``image_size`` (its position embeddings fix
    it: ``vit_b_16(image_size=128)`` takes 128×128 only); otherwise 224×224 with the
    channels of the first convolution (3 when there is none).

    Example:
        >>> import torchvision
        >>> default_input_size(torchvision.models.inception_v3(init_weights=False))
        (3, 299, 299)
    """
    own = getattr(model, "default_input_size", None)
    if isinstance(own, (tuple, list)) and all(isinstance(v, int) for v in own):
        return tuple(own)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return tuple(int(v) for v in cfg["input_size"])
    name = spec if spec is not None and ":" not in spec else None
    if name in _TORCHVISION_SIZES:
        return _TORCHVISION_SIZES[name]
    if type(model).__name__ == "Inception3":
        return _TORCHVISION_SIZES["inception_v3"]
    image_size = getattr(model, "image_size", None)
    if type(model).__name__ == "VisionTransformer" and isinstance(image_size, int):
        return (3, image_size, image_size)
    conv = _first_conv(model)
    if isinstance(conv, nn.Conv3d):
        return (int(conv.in_channels), *_VIDEO_SIZE[1:])
    if isinstance(conv, nn.Conv1d):
        return (int(conv.in_channels), 224)
    return (int(conv.in_channels) if conv is not None else 3, 224, 224)
