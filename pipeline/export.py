"""Export stage: write the quantized model, tokenizer and effective recipe to <run>/model/ atomically."""

from __future__ import annotations

import json
from typing import Any

from pipeline.atomic import atomic_directory
from pipeline.errors import StageFailed
from pipeline.manifest import hash_tree
from pipeline.recipe import Recipe, recipe_yaml
from pipeline.run_context import RunContext

RECIPE_FILE = "qpipe_recipe.yaml"


def run_export(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Save through the backend into a temp folder, check it, then rename it to model/."""
    model, tokenizer, backend = ctx.state["model"], ctx.state["tokenizer"], ctx.state["backend"]
    if ctx.state.get("export_dtype") is not None:
        model.to(ctx.state["export_dtype"])
    with atomic_directory(ctx.model_dir) as tmp:
        backend.save(model, tokenizer, tmp)
        (tmp / RECIPE_FILE).write_text(recipe_yaml(recipe), encoding="utf-8")
        quant_config = json.loads((tmp / "config.json").read_text()).get("quantization_config")
        if not quant_config:
            raise StageFailed("export: config.json has no quantization_config; the backend did not quantize")
    files = hash_tree(ctx.model_dir)
    return {
        "path": "model",
        "format": quant_config.get("quant_method", "unknown"),
        "size_bytes": sum(f["size"] for f in files.values()),
        "files": files,
    }
