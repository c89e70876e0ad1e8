"""Quantize stage: load the model and run the recipe's backend over the calibration set (in memory)."""

from __future__ import annotations

import time
from typing import Any

from pipeline.backends import QuantizeBackend, get_backend
from pipeline.recipe.schema import Recipe
from pipeline.run.context import RunContext


def compute_dtype(requested: str) -> str:
    """`auto` is the checkpoint's dtype on GPU and float32 on CPU: CPUs without native bf16 (AVX2) run
    bf16 matmuls several times slower (AWQ on the demo model: 458 s in bf16, 63 s in float32)."""
    import torch

    if requested != "auto" or torch.cuda.is_available():
        return requested
    return "float32"


def checkpoint_dtype(recipe: Recipe, ctx: RunContext) -> Any:
    """The dtype the artifact is saved in: `model.dtype`, or the checkpoint's own for `auto`."""
    from transformers import AutoConfig

    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return AutoConfig.from_pretrained(ctx.source.path, trust_remote_code=recipe.model.trust_remote_code).dtype


def load_model(recipe: Recipe, ctx: RunContext, backend: QuantizeBackend) -> tuple[Any, Any]:
    """The model and tokenizer, loaded by the backend; `ctx.state["export_dtype"]` keeps the checkpoint's
    own dtype so the artifact is saved in it whatever dtype calibration ran in."""
    ctx.state["export_dtype"] = checkpoint_dtype(recipe, ctx)
    dtype = compute_dtype(recipe.model.dtype)
    return backend.load(ctx.source.path, recipe.quantize, dtype, recipe.model.trust_remote_code, ctx.tokenizer())


def run_quantize(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Quantize with the registered backend; the model is handed to export through `ctx.state` (in memory, or
    as the folder the ranks saved when `quantize.num_gpus` > 1)."""
    from pipeline.run.context import load_calibration

    spec = recipe.quantize
    if spec.num_gpus > 1:
        from pipeline.backends.distributed import quantize_distributed

        return quantize_distributed(recipe, ctx, compute_dtype(recipe.model.dtype), checkpoint_dtype(recipe, ctx))
    backend = get_backend(spec.backend)
    started = time.perf_counter()
    model, tokenizer = load_model(recipe, ctx, backend)
    load_s = time.perf_counter() - started
    calibration = load_calibration(ctx) if spec.calibrates else None
    ctx.log.info("quantize: %s %s via %s", spec.method, spec.scheme, spec.backend)
    started = time.perf_counter()
    log_dir = ctx.run_dir / "logs"
    quantized = backend.quantize(model, tokenizer, calibration, spec, seed=recipe.calibrate.seed, log_dir=log_dir)
    engine_s = time.perf_counter() - started
    ctx.state.update(model=quantized, tokenizer=tokenizer, backend=backend)
    return {
        "backend": spec.backend,
        "method": spec.method,
        "scheme": spec.scheme,
        **backend.describe(spec),
        "calibration_samples": len(calibration) if calibration is not None else 0,
        "compute_dtype": str(model.dtype),
        "export_dtype": str(ctx.state["export_dtype"]),
        "load_s": round(load_s, 2),  # the engine's own calls, to tell them from the stage's overhead
        "engine_s": round(engine_s, 2),
    }
