"""Shared pytest setup: every test starts from the same random state."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _stream_from_one_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel streams outputs from 1 MiB, as on a host with a small last-level cache
    (:func:`tieify.nn._kernel.stream_min_bytes`), so that the tests' outputs of 1-2 MiB
    exercise the non-temporal stores on every host."""
    from tieify.nn import _kernel

    monkeypatch.setattr(_kernel, "STREAM_MIN_BYTES", 1 << 20)


@pytest.fixture(autouse=True)
def _blas_as_fast_as_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path rule as on a CPU whose BLAS keeps up with oneDNN (every host but an AMD one
    with full-width AVX-512: :func:`tieify.nn._paths.blas_behind_onednn`) and with tieify's
    kernel on large banks (every host but AMD's Zen and Zen+:
    :func:`tieify.nn._paths.kernel_outruns_blas`), so that the rule's tests expect the same
    paths on every host; ``test_paths.py`` tests the other branches by setting them."""
    from tieify.nn import _paths

    monkeypatch.setattr(_paths, "_BLAS_BEHIND_ONEDNN", False)
    monkeypatch.setattr(_paths, "_KERNEL_OUTRUNS_BLAS", False)


@pytest.fixture(autouse=True)
def _short_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The latency model calibrates a model's remainder over 2 s of rounds instead of the
    package's :data:`~tieify.latency._predict.CALIBRATION_SECONDS` (tens of seconds, for a
    shared machine's slow phases), so that the tests' predictions of toy models stay quick;
    the span itself is tested on a fake clock (``test_latency.py``)."""
    from tieify.latency import _predict

    monkeypatch.setattr(_predict, "CALIBRATION_SECONDS", 2.0)


def pytest_configure(config: pytest.Config) -> None:
    """Latency tables, path choices and the kernel's build go to a cache of the test
    session's own, so the user's ``~/.cache/tieify`` neither changes a test's outcome
    (``latency.mode: auto`` looks at it) nor is written by the tests. Set before collection:
    the kernel tests' ``skipif(not kernel_available())`` builds the kernel while collecting,
    and the session then finds that build instead of compiling it a second time."""
    import os
    import tempfile

    os.environ["TIEIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="tieify-test-cache-")
    config._tieify_cache_dir = os.environ["TIEIFY_CACHE_DIR"]  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    path = getattr(config, "_tieify_cache_dir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


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
