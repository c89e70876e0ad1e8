"""Quantize stage: load the model and run the recipe's backend over the calibration set (in memory)."""

from __future__ import annotations

from typing import Any

from pipeline.backends import get_backend
from pipeline.recipe import Recipe
from pipeline.run_context import RunContext
from pipeline.schemes import SCHEMES, needs_calibration


def recipe_needs_calibration(recipe: Recipe) -> bool:
    spec = recipe.quantize
    return needs_calibration(spec.method, SCHEMES[spec.scheme], spec.smoothquant_strength is not None)


def compute_dtype(requested: str) -> str:
    """`auto` is the checkpoint's dtype on GPU and float32 on CPU: CPUs without native bf16 (AVX2) run
    bf16 matmuls several times slower (AWQ on the demo model: 458 s in bf16, 63 s in float32)."""
    import torch

    if requested != "auto" or torch.cuda.is_available():
        return requested
    return "float32"


def load_model(recipe: Recipe, ctx: RunContext) -> tuple[Any, Any]:
    """The model and tokenizer from the resolved model folder; `ctx.state["export_dtype"]` keeps the
    checkpoint's own dtype so the artifact is saved in it whatever dtype calibration ran in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(ctx.source.path, trust_remote_code=trust)
    ctx.state["export_dtype"] = recipe.model.dtype if recipe.model.dtype != "auto" else config.dtype
    dtype = compute_dtype(recipe.model.dtype)
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
        "compute_dtype": str(model.dtype),
        "export_dtype": str(ctx.state["export_dtype"]),
    }
