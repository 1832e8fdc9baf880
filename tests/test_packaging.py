"""Packaging: every subpackage ships, data folders ship, and `import tieify` stays cheap."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "tieify").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = on_disk - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert {"tieify.recipes", "tieify.search_spaces"} <= listed


def test_recipes_and_search_spaces_are_package_data():
    for package, folder in (
        ("tieify.recipes", "recipes"),
        ("tieify.search_spaces", "search_spaces"),
    ):
        shipped = {p.name for p in resources.files(package).iterdir() if p.name.endswith(".yaml")}
        in_repo = {p.name for p in (ROOT / folder).glob("*.yaml")}
        assert shipped == in_repo


def test_the_kernel_source_is_package_data():
    """The kernel is compiled from its source on the user's machine, so the source
    must be in the installed package (and match the repository's)."""
    shipped = resources.files("tieify.nn").joinpath("_kernel.cpp")
    assert shipped.read_text() == (ROOT / "tieify" / "nn" / "_kernel.cpp").read_text()


def test_import_is_cheap():
    code = (
        "import sys, tieify, tieify.nn; "
        "heavy = ('optuna', 'ray', 'timm', 'matplotlib', 'fvcore'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve():
    import tieify

    for name in tieify.__all__:
        assert getattr(tieify, name) is not None, name
