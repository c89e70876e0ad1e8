"""Checks a recipe can run here without loading a model: schema, paths, combinations, backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.backends import check_backend
from pipeline.errors import PipelineError
from pipeline.model_source import check_model_reference, linear_in_features
from pipeline.quantize import recipe_needs_calibration
from pipeline.recipe import Recipe, resolve_data_path
from pipeline.schemes import SCHEMES
from pipeline.text_data import dataset_identity


def _model_config_path(recipe: Recipe) -> Path | None:
    if recipe.model.id is None:
        from pipeline.demo_model import demo_model_dir

        path = demo_model_dir() / "config.json"
        return path if path.is_file() else None
    path = Path(recipe.model.id).expanduser() / "config.json"
    return path if path.is_file() else None


def check_group_size(recipe: Recipe) -> None:
    """group_size must divide every Linear's in_features (when the model's config is at hand)."""
    spec = recipe.quantize
    info = SCHEMES[spec.scheme]
    config = _model_config_path(recipe)
    if not info.grouped or config is None:
        return
    group = spec.group_size or 128
    features = linear_in_features(config) or set()
    bad = sorted(f for f in features if f % group)
    if bad:
        raise PipelineError(
            f"quantize.group_size: {group} does not divide in_features {bad} of the model; "
            f"use a divisor of {min(features)}"
        )


def check_output_dir(path: Path) -> None:
    """The output root must be creatable and writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise PipelineError(
            f"export.output_dir: {path} is not writable ({exc.strerror or exc}); pass --output DIR"
        ) from None


def validate_recipe(recipe: Recipe, output: Path | None = None) -> list[str]:
    """Raise PipelineError on the first problem; return a few facts for the user."""
    info = check_backend(recipe.quantize)
    check_model_reference(recipe.model)
    check_group_size(recipe)
    facts = [f"backend {info.name} writes {info.output_format(recipe.quantize.method)}"]
    if recipe_needs_calibration(recipe):
        identity = dataset_identity(recipe.calibrate)
        facts.append(
            f"calibration: {len(identity.get('files', [])) or 'hub'} source(s), "
            f"{recipe.calibrate.num_samples} x {recipe.calibrate.max_seq_length} tokens"
        )
    else:
        facts.append(f"calibration: not needed for {recipe.quantize.method} {recipe.quantize.scheme}")
    if recipe.eval.enabled and recipe.eval.mmlu_dir:
        mmlu = resolve_data_path(recipe.eval.mmlu_dir)
        if not (mmlu / "test").is_dir():
            raise PipelineError(f"eval.mmlu_dir: {mmlu} has no test/ folder; point at a Hendrycks-layout MMLU copy")
    check_output_dir(output or Path(recipe.export.output_dir))
    if os.environ.get("HF_HUB_OFFLINE") == "1" and recipe.model.id and not Path(recipe.model.id).exists():
        facts.append("HF_HUB_OFFLINE=1: the model must already be in the hub cache")
    return facts
