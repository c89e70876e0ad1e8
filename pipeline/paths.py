"""Where qpipe keeps what it reuses between runs; a light module (no torch import) so any stage can ask."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """``$QPIPE_CACHE`` if set, else ``~/.cache/qpipe``."""
    return Path(os.environ.get("QPIPE_CACHE") or Path.home() / ".cache" / "qpipe")
