"""On-disk JSON caches under the user's cache directory.

Location: ``$TIEIFY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tieify``, else
``~/.cache/tieify``. Each cache is one JSON file ``{"version": N, "entries": {key: value}}``
written atomically (temporary file + rename). A file that cannot be read, is not valid JSON or
has another version is rebuilt from scratch with a warning; nothing else is lost.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
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
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                    raise ValueError(f"expected version {CACHE_VERSION}")
                if not isinstance(data.get("entries"), dict):
                    raise ValueError("no 'entries' mapping")
                entries = data["entries"]
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
