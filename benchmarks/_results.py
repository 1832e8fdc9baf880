"""Where a benchmark's results go: ``<out>/<stem>.json`` and ``<out>/<stem>.md``."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, stem: str, res: dict, markdown: str) -> None:
    """Write ``res`` as JSON and ``markdown`` beside it under ``out``, and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
