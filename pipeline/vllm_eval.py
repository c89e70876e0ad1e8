"""`eval.backend: vllm`: lm-eval's `vllm` model type, run by the vLLM environment's python.

The request is the one the hf backend runs in-process; `pipeline/lm_eval_runner.py` runs it there and
writes the same summary, so eval.json has one structure whatever the backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.child import run_json_child
from pipeline.errors import StageFailed
from pipeline.recipe import PROJECT_ROOT, Recipe


def engine_args(recipe: Recipe) -> dict[str, Any]:
    """`vllm.LLM` settings from the smoke section: the KV cache is sized explicitly (on CPU vLLM would
    otherwise reserve most of the RAM), no compilation at start-up, the same context length."""
    smoke = recipe.smoke
    return {
        "kv_cache_memory_bytes": smoke.kv_cache_bytes,
        "max_model_len": smoke.max_model_len,
        "enforce_eager": True,
        "seed": recipe.calibrate.seed,
    }


def run_in_vllm_env(request: dict[str, Any], recipe: Recipe, log_file: Path) -> dict[str, Any]:
    """Run lm-eval on `request["model_path"]` in the vLLM environment; its errors become StageFailed."""
    from pipeline.smoke import vllm_python

    python = vllm_python(recipe.smoke)
    include = request["include_path"]
    child_request = {**request, "include_path": str(include) if include else None, "engine_args": engine_args(recipe)}
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    what = f"eval: lm-eval (vllm) on {request['model_path']}"
    code, result = run_json_child(
        [str(python), "-m", "pipeline.lm_eval_runner"],
        child_request,
        log_file,
        recipe.eval.timeout_s,
        what,
        "eval.timeout_s",
        env,
    )
    if result is None or "error" in result:
        reason = result["error"] if result else f"exit {code} without a result"
        raise StageFailed(f"{what} failed: {reason}; log: {log_file}")
    return result
