"""Where benchmark scripts put their results: ``<stem>.json`` + ``<stem>.md`` side by side.

Both files are written to a temporary name and renamed, so a run killed half-way (a
time-boxed GPU job, Ctrl-C) leaves the previous report or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from fastjepa.checkpoint import atomic_write_text  # the scripts put the checkout on sys.path first


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(out_dir: str | os.PathLike, stem: str, result: Any, markdown: str, *, indent: int = 2) -> Path:
    """Write ``out_dir/stem.json`` (``result``) and ``out_dir/stem.md`` (``markdown``); return the .md path."""
    out = Path(out_dir)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=indent) + "\n")
    md = out / f"{stem}.md"
    atomic_write_text(md, markdown.rstrip("\n") + "\n")
    return md
