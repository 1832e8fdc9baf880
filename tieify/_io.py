"""Save and load tied models as "a plan + weights".

:func:`save` writes one file: the weights, and the plan and each module's state-dict version
as JSON in the file's metadata. ``.safetensors`` (default) stores tensors only; ``.pt`` /
``.pth`` store a dict of the plan text, the versions and the tensors with ``torch.save``, read
back with ``torch.load(weights_only=True)``.
:func:`load` replays the plan on a fresh instance of the original architecture and loads the
weights into it; no pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import PlanError
from ._plan import Plan
from ._trace import qualname

__all__ = ["save", "load"]

FORMAT = "tieify-1"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _plan_of(tied: Any) -> Plan:
    if not isinstance(tied, nn.Module):
        raise TypeError(f"save(): `tied` must be an nn.Module, but got {type(tied).__name__}.")
    plan = getattr(tied, "tieify_plan", None)
    if not isinstance(plan, Plan):
        raise PlanError(
            f"save(): the {type(tied).__name__} carries no plan (attribute `tieify_plan`); save "
            "a model returned by tieify.tieify() or Plan.apply()."
        )
    return plan


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone shared storages apart so every entry stands alone; loading writes them back into
    # the (shared) parameters of the rebuilt model.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t.contiguous().cpu()
    return out


def _versions(state: Any) -> dict[str, dict[str, Any]]:
    """The state dict's per-module metadata (``{prefix: {"version": n}}``), JSON values only.

    ``load_state_dict`` hands each module its entry; some modules read their format's version
    from it and refuse a state without one (torchvision's MNASNet), others convert an older
    format (batch norm before ``num_batches_tracked``), so the versions travel with the weights.
    """
    meta = getattr(state, "_metadata", None) or {}
    plain = (bool, int, float, str, type(None))
    return {
        str(prefix): {str(k): v for k, v in entry.items() if isinstance(v, plain)}
        for prefix, entry in meta.items()
        if isinstance(entry, dict)
    }


def save(tied: nn.Module, path: str | Path) -> Path:
    """Write the tied model's plan and weights to ``path``.

    Args:
        tied: a model returned by :func:`tieify.tieify` / :meth:`Plan.apply` (it carries
            ``tieify_plan``).
        path: ``*.safetensors`` (recommended) or ``*.pt`` / ``*.pth``; missing parent
            directories are created, and an existing file is replaced only once the new one
            is written in full.

    Returns:
        The path written.

    Example:
        >>> import torch, torchvision, tieify, tempfile, os
        >>> tied = tieify.tieify(torchvision.models.resnet18(), B=4)
        >>> f = tieify.save(tied, os.path.join(tempfile.mkdtemp(), "r18.safetensors"))
        >>> again = tieify.load(torchvision.models.resnet18(), f)
        >>> torch.equal(again.layer1[0].conv1.weight, tied.layer1[0].conv1.weight)
        True
    """
    plan = _plan_of(tied)
    path = Path(path).expanduser()
    state = tied.state_dict()
    tensors = _tensors(state)
    versions = _versions(state)
    text = plan.to_json(indent=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in _TORCH_SUFFIXES:
        # written beside the target, then renamed over it: an interrupted save leaves an
        # earlier file at `path` whole (safetensors' save_file does the same)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            data = {"format": FORMAT, "plan": text, "state_dict": tensors, "versions": versions}
            torch.save(data, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "plan": text, "versions": json.dumps(versions)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _read(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise PlanError(f"load(): no file {str(path)!r}; pass the path given to tieify.save().")
    if path.suffix in _TORCH_SUFFIXES:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise PlanError(
                f"load(): {str(path)!r} is not a tieify checkpoint readable with "
                f"weights_only=True ({type(err).__name__}: {str(err)[:200]})."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(
                f"load(): {str(path)!r} was not written by tieify.save() (format "
                f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}, "
                f"expected {FORMAT!r})."
            )
        return str(data["plan"]), dict(data["state_dict"]), dict(data.get("versions") or {})
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise PlanError(
            f"load(): {str(path)!r} is not a safetensors file ({type(err).__name__}: "
            f"{str(err)[:200]}); tieify.save() writes .safetensors or .pt files."
        ) from None
    if meta.get("format") != FORMAT or "plan" not in meta:
        raise PlanError(
            f"load(): {str(path)!r} holds no tieify plan (metadata format "
            f"{meta.get('format')!r}, expected {FORMAT!r}); was it written by tieify.save()?"
        )
    try:  # files of tieify 0.x before the versions were saved have none
        versions = json.loads(meta.get("versions", "{}"))
    except ValueError:
        versions = {}
    return meta["plan"], tensors, versions if isinstance(versions, dict) else {}


def load(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Rebuild a tied model: replay the saved plan on ``model``, then load the weights.

    Args:
        model: a fresh instance of the original (untied) architecture; not modified (the plan
            is applied to a copy).
        path: a file written by :func:`save`.
        strict: passed to ``load_state_dict``.

    Returns:
        The tied model with the saved weights (and ``tieify_plan``).

    Raises:
        PlanError: the file is missing, not written by :func:`save`, or the plan does not fit
            ``model`` (another architecture).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load(): `model` must be a fresh instance of the original architecture (an "
            f"nn.Module), but got {type(model).__name__}."
        )
    text, tensors, versions = _read(Path(path).expanduser())
    plan = Plan.from_json(text)
    if plan.model_type != qualname(model):
        raise PlanError(
            f"load(): the file holds a plan for {plan.model_type}, but got a "
            f"{qualname(model)}; pass a fresh instance of {plan.model_type}."
        )
    tied = plan.apply(model, inplace=False)
    state: Any = OrderedDict(tensors)
    # each module's format version as saved; the rebuilt model's own where the file has none
    state._metadata = {**_versions(tied.state_dict()), **versions}
    try:
        tied.load_state_dict(state, strict=strict)
    except Exception as err:  # a module's own loader may raise anything (ValueError, KeyError)
        raise PlanError(
            f"load(): the saved weights do not fit the rebuilt model ({type(err).__name__}: "
            f"{str(err)[:300]}); was the model built with the same configuration?"
        ) from err
    return tied
