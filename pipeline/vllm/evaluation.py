"""`eval.backend: vllm`: lm-eval's `vllm` model type, run by the vLLM environment's python.

The request is the one the hf backend runs in-process; `pipeline/eval/lm_eval_runner.py` runs it there and
writes the same summary, so eval.json has one structure whatever the backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import StageFailed
from pipeline.paths import import_root
from pipeline.recipe.schema import Recipe
from pipeline.run.model_source import kv_bytes_per_token, text_config
from pipeline.run.processes import run_json_child


def engine_args(recipe: Recipe, model_dir: Path) -> dict[str, Any]:
    """`vllm.LLM` settings: the model's own context length (`max_position_embeddings`: 5-shot prompts run to a few
    thousand tokens and must not be cut to the smoke test's short `max_model_len`), a KV cache of at least the
    smoke section's size that holds one such sequence (sized explicitly: on CPU vLLM would otherwise reserve
    most of the RAM), no compilation at start-up."""
    from pipeline.vllm.launch import gpu_memory_utilization

    config = text_config(model_dir / "config.json")
    max_len = int(config["max_position_embeddings"])
    args: dict[str, Any] = {
        "kv_cache_memory_bytes": max(recipe.smoke.kv_cache_bytes, kv_bytes_per_token(config) * max_len),
        "max_model_len": max_len,
        "enforce_eager": True,
        "seed": recipe.calibrate.seed,
    }
    utilization = gpu_memory_utilization()
    if utilization is not None:
        args["gpu_memory_utilization"] = utilization
    return args


def run_in_vllm_env(request: dict[str, Any], recipe: Recipe, log_file: Path) -> dict[str, Any]:
    """Run lm-eval on `request["model_path"]` in the vLLM environment; its errors become StageFailed."""
    from pipeline.vllm.environment import EVAL_PACKAGE, vllm_python

    python = vllm_python(recipe.smoke)
    include = request["include_path"]
    child_request = {
        **request,
        "include_path": str(include) if include else None,
        "engine_args": engine_args(recipe, Path(request["model_path"])),
    }
    env = {**os.environ, "PYTHONPATH": str(import_root()), "TOKENIZERS_PARALLELISM": "false"}
    what = f"eval: lm-eval (vllm) on {request['model_path']}"
    code, result = run_json_child(
        [str(python), "-m", "pipeline.eval.lm_eval_runner"],
        child_request,
        log_file,
        recipe.eval.timeout_s,
        what,
        "eval.timeout_s",
        env,
    )
    if result is not None and result.get("missing") == "lm_eval":
        raise StageFailed(
            f"eval.backend: vllm runs lm-eval in the vLLM environment, and {python} has no lm-eval; install "
            f"{EVAL_PACKAGE} there (for a linked site directory: pip install --target SITE {EVAL_PACKAGE}) "
            "or set eval.backend: hf"
        )
    if result is None or "error" in result:
        reason = result["error"] if result else f"exit {code} without a result"
        raise StageFailed(f"{what} failed: {reason}; log: {log_file}")
    return result
