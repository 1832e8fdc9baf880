"""``tieify cache``: what each on-disk cache holds, clearing some or all, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tieify.cli import main
from tieify.latency import cache_info, clear_cache
from tieify.latency._cache import JsonCache
from tieify.latency._table import TABLE


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory of the test's own (never the session's kernel build)."""
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    return tmp_path


def _fill(cache: Path) -> None:
    latency = JsonCache("latency.json")
    latency.set(json.dumps({"op": {"type": "Conv2d"}, "threads": 2}), 1e-3)
    latency.set(json.dumps({"op": {"type": "TiedConv2d"}, "threads": 2}), 4e-4)
    latency.set(json.dumps({"remainder": "abc", "threads": 2}), {"nonlayer": 1e-3, "scale": 1.2})
    JsonCache("paths.json").set("layer", "kernel")
    (cache / "kernels").mkdir()
    (cache / "kernels" / "kernel-0123.so").write_bytes(b"\0" * 2048)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["cache", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_counts_what_each_cache_holds(cache: Path, capsys) -> None:
    code, out, _ = _run(capsys)
    assert code == 0 and str(cache) in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["latency", "paths", "kernels"]
    assert out.count(" empty ") == 3
    _fill(cache)
    info = cache_info("latency")
    assert (info.entries, info.remainders) == (3, 1)
    assert info.size == (cache / "latency.json").stat().st_size
    assert (cache_info("paths").entries, cache_info("kernels").entries) == (1, 1)
    assert cache_info("kernels").size == 2048
    code, out, _ = _run(capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "3 entries, 1 of them model remainders" in lines["latency"]
    assert "1 entry " in lines["paths"]
    assert "2.0 KiB" in lines["kernels"] and "1 build " in lines["kernels"]


def test_clear_one_cache_keeps_the_others(cache: Path, capsys) -> None:
    _fill(cache)
    key = json.dumps({"op": {"type": "Linear"}, "threads": 1})
    TABLE.store.set(key, 2e-3)  # the process-wide table, loaded from this directory
    code, out, _ = _run(capsys, "clear", "latency")
    assert code == 0 and "4 entries" in out and "paths" not in out
    assert not (cache / "latency.json").exists()
    assert TABLE.store.get(key) is None  # forgotten in this process too, not written back
    assert (cache / "paths.json").exists() and (cache / "kernels" / "kernel-0123.so").exists()


def test_clear_all(cache: Path, capsys) -> None:
    _fill(cache)
    removed = clear_cache()
    assert [info.name for info in removed] == ["latency", "paths", "kernels"]
    assert [info.entries for info in removed] == [3, 1, 1]
    assert sorted(p.name for p in cache.iterdir()) == []
    code, out, _ = _run(capsys, "clear")  # nothing left: still fine
    assert code == 0 and out.count(" empty ") == 3


def test_corrupted_file_is_reported_not_raised(cache: Path, capsys) -> None:
    (cache / "latency.json").write_text("{not json")
    (cache / "paths.json").write_text(json.dumps({"version": 999, "entries": {}}))
    code, out, _ = _run(capsys)
    assert code == 0 and out.count("unreadable (rebuilt on its next use)") == 2
    assert cache_info("latency").entries is None
    code, _, _ = _run(capsys, "clear", "latency", "paths")
    assert code == 0 and not (cache / "latency.json").exists()
    assert not (cache / "paths.json").exists()


def test_bad_names_name_the_choices(cache: Path, capsys) -> None:
    _fill(cache)
    code, _, err = _run(capsys, "clear", "latency", "tables")
    assert code == 2 and "'tables'" in err and "latency, paths, kernels" in err
    assert (cache / "latency.json").exists()  # nothing cleared on a bad request
    code, _, err = _run(capsys, "show", "latency")
    assert code == 2 and "tieify cache clear latency" in err
    with pytest.raises(ValueError, match="unknown cache 'tables'"):
        clear_cache("latency", "tables")
    assert (cache / "latency.json").exists()
