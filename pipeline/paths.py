"""Where qpipe finds its project files and keeps what it reuses between runs; light (no torch import)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # recipes/, calibration/, tests/fixtures/


def default_cache_root() -> Path:
    """``$QPIPE_CACHE`` if set, else ``~/.cache/qpipe``."""
    return Path(os.environ.get("QPIPE_CACHE") or Path.home() / ".cache" / "qpipe")
