"""Where qpipe finds its project files and keeps what it reuses between runs; light (no torch import).

A source checkout (editable install) reads recipes/, calibration/ and tests/fixtures/mmlu/ where the project keeps
them; an installed wheel carries copies in `pipeline/_bundled/` (pyproject's package-dir mapping).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_DATA = PACKAGE_DIR / "_bundled"
SOURCE_CHECKOUT = not PACKAGE_DATA.is_dir()
PROJECT_ROOT = PACKAGE_DIR.parent  # in a source checkout: recipes/, calibration/, tests/fixtures/
BUNDLED_FOLDERS = {"recipes": "recipes", "calibration": "calibration", "tests/fixtures/mmlu": "mmlu"}


def bundled(relative: str | Path) -> Path:
    """A project file or folder named by its path in the source tree (`recipes/awq.yaml`,
    `tests/fixtures/mmlu`), from the checkout or from the installed package's copy."""
    name = Path(relative).as_posix()
    if not SOURCE_CHECKOUT:
        for folder, packaged in BUNDLED_FOLDERS.items():
            if name == folder or name.startswith(folder + "/"):
                return PACKAGE_DATA / packaged / name[len(folder) :].lstrip("/")
    return PROJECT_ROOT / name


def default_cache_root() -> Path:
    """``$QPIPE_CACHE`` if set, else ``~/.cache/qpipe``."""
    return Path(os.environ.get("QPIPE_CACHE") or Path.home() / ".cache" / "qpipe")


def default_vllm_env() -> Path:
    """`.venv-vllm` beside the source tree, or in the cache for an installed wheel."""
    return PROJECT_ROOT / ".venv-vllm" if SOURCE_CHECKOUT else default_cache_root() / "venv-vllm"


def import_root() -> Path:
    """A folder holding only a link to this package, for the PYTHONPATH of a child that runs another
    environment's Python: the package's own parent may be a site-packages whose torch would shadow that
    environment's."""
    root = default_cache_root() / "import-root" / hashlib.sha256(str(PACKAGE_DIR).encode()).hexdigest()[:12]
    link = root / "pipeline"
    if not link.is_symlink() or link.resolve() != PACKAGE_DIR:
        root.mkdir(parents=True, exist_ok=True)
        staged = root / f".pipeline.{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(PACKAGE_DIR, target_is_directory=True)
        staged.replace(link)  # atomic: a concurrent run sees the old link or the new one
    return root
