"""State shared by the stages of one run: recipe, model, run directory, manifest and logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from pipeline.model_source import ModelSource
from pipeline.recipe import Recipe

LOGGER_NAME = "qpipe"


@dataclass
class RunContext:
    """Handed to every `run_<stage>(recipe, ctx)`; `state` carries in-memory hand-offs (the quantized model)."""

    recipe: Recipe
    source: ModelSource
    model_fingerprint: str
    run_dir: Path
    manifest: Manifest
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(LOGGER_NAME)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def reports_dir(self) -> Path:
        return self.run_dir / "reports"

    @property
    def calibration_dir(self) -> Path:
        return self.run_dir / "calibration"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    def save_manifest(self) -> None:
        self.manifest.save(self.run_dir / "manifest.json")
