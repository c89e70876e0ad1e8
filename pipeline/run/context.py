"""State shared by the stages of one run: recipe, model, run directory, manifest and logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.recipe.schema import Recipe
from pipeline.run.manifest import Manifest
from pipeline.run.model_source import ModelSource

LOGGER_NAME = "qpipe"
RECIPE_FILE = "qpipe_recipe.yaml"  # the effective recipe, saved in model/ beside the weights


@dataclass
class RunContext:
    """Handed to every `run_<stage>(recipe, ctx)`; `state` carries in-memory hand-offs (the quantized model)."""

    recipe: Recipe
    source: ModelSource
    model_fingerprint: str
    run_dir: Path
    manifest: Manifest
    state: dict[str, Any] = field(default_factory=dict)
    _tokenizer: Any = field(default=None, init=False, repr=False)

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

    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded once per run and only when a stage runs: calibrate and quantize each need
        it, and a Qwen-sized one (151 k tokens, a 14 MB tokenizer.json) took 1.3-1.5 s to load on a 2-core CPU."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.source.path, trust_remote_code=self.recipe.model.trust_remote_code
            )
        return self._tokenizer

    def save_manifest(self) -> None:
        self.manifest.save(self.run_dir / "manifest.json")


def load_calibration(ctx: RunContext) -> Any:
    """The tokenized set saved by `run_calibrate`."""
    from datasets import load_from_disk

    return load_from_disk(str(ctx.calibration_dir))
