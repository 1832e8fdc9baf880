"""Shared pytest setup: every test starts from the same random state."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Latency tables and path choices go to a cache of the test session's own, so the
    user's ``~/.cache/tieify`` neither changes a test's outcome (``latency.mode: auto``
    looks at it) nor is written by the tests."""
    import os

    os.environ["TIEIFY_CACHE_DIR"] = str(tmp_path_factory.mktemp("tieify-cache"))


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch):
    """tieify's compiled-kernel state forgotten before and after the test, with the test's
    environment changes (the monkeypatch it yields) undone before the second reset."""
    from tieify.nn import _kernel

    _kernel.reset()
    yield monkeypatch
    monkeypatch.undo()
    _kernel.reset()


@pytest.fixture
def no_kernel(fresh_kernel: pytest.MonkeyPatch) -> None:
    """tieify's compiled pointwise kernel switched off (``TIEIFY_KERNEL=0``) for one test,
    so the other paths' rules can be tested on any machine."""
    fresh_kernel.setenv("TIEIFY_KERNEL", "0")
