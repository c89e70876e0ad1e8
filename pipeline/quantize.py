"""Quantize stage: load the model and run the recipe's backend over the calibration set (in memory)."""

from __future__ import annotations

from typing import Any

from pipeline.backends import get_backend
from pipeline.recipe import Recipe
from pipeline.run_context import RunContext
from pipeline.schemes import SCHEMES, needs_calibration

DTYPES = {"auto": "auto", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def recipe_needs_calibration(recipe: Recipe) -> bool:
    spec = recipe.quantize
    return needs_calibration(spec.method, SCHEMES[spec.scheme], spec.smoothquant_strength is not None)


def load_model(recipe: Recipe, ctx: RunContext) -> tuple[Any, Any]:
    """The model and tokenizer from the resolved model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = recipe.model.trust_remote_code
    dtype = DTYPES[recipe.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(ctx.source.path, dtype=dtype, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(ctx.source.path, trust_remote_code=trust)
    return model, tokenizer


def run_quantize(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Quantize with the registered backend; the model is handed to export through `ctx.state`."""
    from pipeline.calibrate import load_calibration

    spec = recipe.quantize
    backend = get_backend(spec.backend)
    model, tokenizer = load_model(recipe, ctx)
    calibration = load_calibration(ctx) if recipe_needs_calibration(recipe) else None
    ctx.log.info("quantize: %s %s via %s", spec.method, spec.scheme, spec.backend)
    quantized = backend.quantize(model, tokenizer, calibration, spec, seed=recipe.calibrate.seed)
    ctx.state.update(model=quantized, tokenizer=tokenizer, backend=backend)
    return {
        "backend": spec.backend,
        "method": spec.method,
        "scheme": spec.scheme,
        **backend.describe(spec),
        "calibration_samples": len(calibration) if calibration is not None else 0,
        "dtype": str(getattr(model, "dtype", "")),
    }
