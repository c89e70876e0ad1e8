"""Checks a recipe can run here without loading a model: schema, paths, combinations, backend."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pipeline.backends import check_backend
from pipeline.errors import PipelineError
from pipeline.formats import DEFAULT_GROUP_SIZE, SCHEMES, FormatInfo
from pipeline.paths import bundled
from pipeline.recipe.load import resolve_data_path
from pipeline.recipe.schema import DEMO_CALIBRATION, DEMO_MMLU, REAL_MODEL_DATA, Recipe
from pipeline.run.context import LOGGER_NAME
from pipeline.run.model_source import check_model_reference, linear_in_features
from pipeline.run.text_data import dataset_identity

log = logging.getLogger(LOGGER_NAME)
DEMO_DATA_DIR = bundled(DEMO_CALIBRATION).parent
FIXTURE_MMLU = bundled(DEMO_MMLU)


def _model_config_path(recipe: Recipe) -> Path | None:
    if recipe.model.id is None:
        from pipeline.demo.model import demo_model_dir

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
    group = spec.group_size or DEFAULT_GROUP_SIZE
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


def calibration_fact(recipe: Recipe) -> str:
    """Which calibration data the run will use, so a wrong source shows before a long run."""
    spec = recipe.calibrate
    if not recipe.quantize.calibrates:
        return f"calibration: not needed for {recipe.quantize.method} {recipe.quantize.scheme}"
    files = dataset_identity(spec).get("files")
    if files:
        source = str(resolve_data_path(spec.dataset)) + (f" ({len(files)} files)" if len(files) > 1 else "")
    else:
        subset = f" {spec.subset}" if spec.subset else ""
        source = f"hub dataset {spec.dataset}{subset} split {spec.split}"
    field = f"messages field {spec.messages_field!r}" if spec.messages_field else f"text field {spec.text_field!r}"
    chat = " with the chat template" if spec.uses_chat_template else ""
    return f"calibration: {source}, {field}{chat}, {spec.num_samples} x {spec.max_seq_length} tokens"


def eval_fact(recipe: Recipe) -> str:
    """Which MMLU the gate scores on: a local Hendrycks copy (checked) or lm-eval's stock task on the hub."""
    spec = recipe.eval
    if not spec.enabled:
        return "eval: disabled"
    if spec.mmlu_dir:
        mmlu = resolve_data_path(spec.mmlu_dir)
        if not (mmlu / "test").is_dir():
            raise PipelineError(f"eval.mmlu_dir: {mmlu} has no test/ folder; point at a Hendrycks-layout MMLU copy")
        source = f"local MMLU {mmlu} ({len(list((mmlu / 'test').glob('*_test.csv')))} subjects)"
    else:
        source = "MMLU from the hub (cais/mmlu)"
    limit = f", limit {spec.limit} per subject" if spec.limit else ""
    return f"eval: {source}, tasks {', '.join(spec.tasks)}{limit}"


def _is_demo_corpus(dataset: str) -> bool:
    path = resolve_data_path(dataset).resolve()
    return DEMO_DATA_DIR in (path, path.parent)


def _is_mmlu_fixture(mmlu_dir: str | None) -> bool:
    return mmlu_dir is not None and resolve_data_path(mmlu_dir).resolve() == FIXTURE_MMLU


def demo_data_warnings(recipe: Recipe) -> list[str]:
    """The bundled demo corpus and MMLU fixture are allowed with a real model, but say little about it."""
    model, warnings = recipe.model.id, []
    if model is None:
        return warnings
    if recipe.quantize.calibrates and _is_demo_corpus(recipe.calibrate.dataset):
        warnings.append(
            f"calibrate.dataset: {recipe.calibrate.dataset} is the demo model's small corpus, not data for {model}; "
            f"remove it to calibrate on {REAL_MODEL_DATA['calibrate']['dataset']} or set your own data"
        )
    if recipe.eval.enabled and _is_mmlu_fixture(recipe.eval.mmlu_dir):
        warnings.append(
            f"eval.mmlu_dir: {recipe.eval.mmlu_dir} is the project's tiny MMLU fixture, so the gate says little about "
            f"{model}; remove it for all of MMLU from the hub or point at a full local copy"
        )
    return warnings


def check_parallel_eval(recipe: Recipe, fmt: FormatInfo) -> None:
    """lm-eval's hf backend splits a model over GPUs with accelerate's dispatch hooks, and compressed-tensors 0.19
    removes the model's own hook while decompressing a checkpoint on load: the first forward then fails
    (`'...ForCausalLM' object has no attribute '_hf_hook'`; seen on two H200s, reproduced on CPU by
    tests/test_multi_gpu.py). Stopping here saves the run that would fail after the baseline's eval."""
    spec = recipe.eval
    if spec.enabled and spec.backend == "hf" and spec.tensor_parallel_size > 1 and not fmt.native:
        raise PipelineError(
            "eval.tensor_parallel_size: the hf backend cannot split a compressed-tensors checkpoint over GPUs "
            "(decompressing it on load removes accelerate's dispatch hook); set eval.backend: vllm or "
            "eval.tensor_parallel_size: 1"
        )


def validate_recipe(recipe: Recipe, output: Path | None = None) -> list[str]:
    """Raise PipelineError on the first problem; log demo-data warnings; return facts for the user."""
    info = check_backend(recipe.quantize)
    check_model_reference(recipe.model)
    check_group_size(recipe)
    fmt = info.output_format(recipe.quantize.method)
    check_parallel_eval(recipe, fmt)
    facts = [
        f"backend {info.name} writes {fmt.name}",
        calibration_fact(recipe),
        eval_fact(recipe),
    ]
    check_output_dir(output or Path(recipe.export.output_dir))
    hf_hub = recipe.model.id and not recipe.model.modelscope and not Path(recipe.model.id).exists()
    if os.environ.get("HF_HUB_OFFLINE") == "1" and hf_hub:
        facts.append("HF_HUB_OFFLINE=1: the model must already be in the hub cache")
    for warning in demo_data_warnings(recipe):
        log.warning(warning)
    return facts
