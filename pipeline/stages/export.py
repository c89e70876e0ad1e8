"""Export stage: write the quantized model, tokenizer and effective recipe to <run>/model/ atomically."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.errors import StageFailed
from pipeline.recipe.load import recipe_yaml
from pipeline.recipe.schema import Recipe
from pipeline.run.context import RECIPE_FILE, RunContext
from pipeline.run.files import atomic_directory
from pipeline.run.manifest import hash_tree
from pipeline.run.resources import release_accelerator_memory


def save_in_memory_model(ctx: RunContext, out_dir: Path) -> float:
    """Save the quantized model through the backend, in the checkpoint's dtype, then drop it: later stages read
    model/ from disk, and a vLLM child on the same GPU needs the memory free. Returns the backend's save time."""
    model, tokenizer, backend = (ctx.state.pop(key) for key in ("model", "tokenizer", "backend"))
    started = time.perf_counter()
    backend.save(model, tokenizer, out_dir, ctx.state.get("export_dtype"))
    save_s = round(time.perf_counter() - started, 2)
    del model
    release_accelerator_memory()
    return save_s


def move_contents(src: Path, out_dir: Path) -> None:
    """Move every entry of `src` (the folder rank 0 saved) into `out_dir`."""
    for entry in src.iterdir():
        shutil.move(str(entry), str(out_dir / entry.name))


def run_export(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Save through the backend (or take the folder distributed quantize saved) into a temp folder, check it,
    then rename it to model/."""
    save_s = None  # the ranks saved the folder themselves when quantize ran distributed
    with atomic_directory(ctx.model_dir) as tmp:
        if "saved_dir" in ctx.state:
            move_contents(ctx.state["saved_dir"], tmp)
        else:
            save_s = save_in_memory_model(ctx, tmp)
        (tmp / RECIPE_FILE).write_text(recipe_yaml(recipe), encoding="utf-8")
        quant_config = json.loads((tmp / "config.json").read_text()).get("quantization_config")
        if not quant_config:
            raise StageFailed("export: config.json has no quantization_config; the backend did not quantize")
    if "work_dir" in ctx.state:
        shutil.rmtree(ctx.state["work_dir"], ignore_errors=True)
    files = hash_tree(ctx.model_dir)
    return {
        "path": "model",
        "save_s": save_s,
        "format": quant_config.get("quant_method", "unknown"),
        "size_bytes": sum(f["size"] for f in files.values()),
        "files": files,
    }
