"""On-disk JSON caches under the user's cache directory.

Location: ``$TIEIFY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tieify``, else
``~/.cache/tieify``. Each cache is one JSON file ``{"version": N, "entries": {key: value}}``
written atomically (temporary file + rename). A file that cannot be read, is not valid JSON or
has another version is rebuilt from scratch with a warning; nothing else is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_VERSION = 1


def cache_dir() -> Path:
    """The directory tieify caches measurements in (not created here)."""
    env = os.environ.get("TIEIFY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tieify"


class JsonCache:
    """A small persistent ``str -> JSON value`` mapping stored in ``cache_dir()/name``.

    Loaded lazily on first access; :meth:`set` writes through to disk (``persist=False`` keeps
    it in memory only).
    """

    def __init__(self, name: str, persist: bool = True) -> None:
        self.name = name
        self.persist = persist
        self._entries: dict[str, Any] | None = None
        self._loaded_from: Path | None = None
        _LIVE.add(self)

    @property
    def path(self) -> Path:
        return cache_dir() / self.name

    def _load(self) -> dict[str, Any]:
        path = self.path
        if self._entries is not None and self._loaded_from == path:
            return self._entries
        entries: dict[str, Any] = {}
        if self.persist and path.exists():
            try:
                entries = _read_entries(path)
            except (OSError, ValueError) as err:
                warnings.warn(
                    f"tieify: the cache file {path} is unreadable or corrupted ({err}); "
                    "rebuilding it (measurements will be taken again).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                entries = {}
                self._entries, self._loaded_from = entries, path
                self._write()
        self._entries, self._loaded_from = entries, path
        return entries

    def get(self, key: str) -> Any:
        return self._load().get(key)

    def set(self, key: str, value: Any) -> None:
        self._load()[key] = value
        self._write()

    def __len__(self) -> int:
        return len(self._load())

    def clear(self) -> None:
        """Forget every entry (and the file)."""
        self._entries, self._loaded_from = {}, self.path
        if self.persist and self.path.exists():
            self.path.unlink()

    def _write(self) -> None:
        if not self.persist or self._entries is None:
            return
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{self.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, f)
            os.replace(tmp, path)
        except OSError as err:  # a read-only home must not break inference
            warnings.warn(
                f"tieify: cannot write the cache file {path} ({err}); keeping it in memory. "
                "Set TIEIFY_CACHE_DIR to a writable directory.",
                RuntimeWarning,
                stacklevel=3,
            )


#: Every :class:`JsonCache` alive in this process (:func:`clear_cache` empties them too).
_LIVE: weakref.WeakSet[JsonCache] = weakref.WeakSet()


def _read_entries(path: Path) -> dict[str, Any]:
    """The entries of the cache file ``path``; ``OSError`` / ``ValueError`` where it cannot
    be read, is not JSON or has another version."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        raise ValueError(f"expected version {CACHE_VERSION}")
    if not isinstance(data.get("entries"), dict):
        raise ValueError("no 'entries' mapping")
    return data["entries"]


#: What tieify keeps under :func:`cache_dir`: name -> (file or folder, what it holds).
CACHES: dict[str, tuple[str, str]] = {
    "latency": (
        "latency.json",
        "latency table: layer times and model remainders (predict_latency, search)",
    ),
    "paths": ("paths.json", "forward paths and fused chains timed by optimize / fuse"),
    "kernels": ("kernels", "compiled builds of tieify's CPU kernel"),
}


@dataclass(frozen=True)
class CacheInfo:
    """One of tieify's on-disk caches (see :data:`CACHES`)."""

    name: str
    path: Path
    description: str
    exists: bool
    size: int  # bytes on disk
    entries: int | None  # JSON entries or kernel builds; None where the file is unreadable
    remainders: int = 0  # of the latency table's entries, the model remainders


def cache_info(name: str) -> CacheInfo:
    """What the cache ``name`` (a key of :data:`CACHES`) holds now; never raises on a
    corrupted file (its ``entries`` is ``None``: it is rebuilt on its next use)."""
    filename, description = _cache_entry(name)
    path = cache_dir() / filename
    if path.is_dir():
        files = [f for f in path.iterdir() if f.is_file()]
        builds = sum(1 for f in files if f.suffix == ".so")
        size = sum(f.stat().st_size for f in files)
        return CacheInfo(name, path, description, True, size, builds)
    if not path.is_file():
        return CacheInfo(name, path, description, False, 0, 0)
    size = path.stat().st_size
    try:
        entries = _read_entries(path)
    except (OSError, ValueError):
        return CacheInfo(name, path, description, True, size, None)
    remainders = sum(1 for key in entries if _is_remainder_key(key))
    return CacheInfo(name, path, description, True, size, len(entries), remainders)


def clear_cache(*names: str) -> list[CacheInfo]:
    """Delete the named caches (all of :data:`CACHES` when none is named) and forget their
    entries in this process too; returns what each held before.

    Raises:
        ValueError: a name that is not one of :data:`CACHES`.
    """
    for name in names:
        _cache_entry(name)
    removed = []
    for name in names or tuple(CACHES):
        info = cache_info(name)
        removed.append(info)
        for cache in list(_LIVE):  # the process's tables and path choices, not written back
            if cache.persist and cache.name == info.path.name:
                cache.clear()
        if info.path.is_dir():
            shutil.rmtree(info.path)
        elif info.path.exists():
            info.path.unlink()
    return removed


def _cache_entry(name: str) -> tuple[str, str]:
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}: choose from {', '.join(CACHES)}")
    return CACHES[name]


def _is_remainder_key(key: str) -> bool:
    try:
        return "remainder" in json.loads(key)
    except (ValueError, TypeError):
        return False
