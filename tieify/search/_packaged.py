"""The YAML files shipped as package data (``tieify.recipes``, ``tieify.search_spaces``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]


def folders(package: str) -> list[Any]:
    """Where ``package``'s YAML files are: the installed package, then the repository folder
    (``tieify.recipes`` -> ``recipes/``) for a source checkout."""
    out: list[Any] = []
    try:
        out.append(resources.files(package))
    except ModuleNotFoundError:  # pragma: no cover - running from a source tree
        pass
    repo = _REPO / package.rsplit(".", 1)[-1]
    if repo.is_dir():
        out.append(repo)
    return out


def names(package: str) -> list[str]:
    """Names (without ``.yaml``) of the files shipped in ``package``."""
    found: set[str] = set()
    for folder in folders(package):
        found.update(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(found)


def read(package: str, name: str) -> str | None:
    """Text of ``name``.yaml in ``package``, or None when no such file is shipped."""
    for folder in folders(package):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return str(candidate.read_text())
    return None
