"""Starting the vLLM worker: one JSON request in, one JSON result out, with this process's GPU share freed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import StageFailed
from pipeline.recipe.schema import SmokeSpec
from pipeline.run.processes import run_json_child

WORKER = Path(__file__).with_name("worker.py")  # run by file path in the vLLM environment (stdlib + vllm only)


def has_chat_template(model_dir: Path) -> bool:
    """Whether the checkpoint's tokenizer ships a chat template."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def gpu_memory_utilization() -> float | None:
    """vLLM's `gpu_memory_utilization` for a child on this process's GPU, after freeing what this process cached.

    vLLM refuses to start when less than that share of the GPU is free; this process keeps its CUDA context (and
    whatever a stage still holds), so the child asks for the free share less a margin, at most vLLM's default 0.9.
    None without a CUDA GPU."""
    from pipeline.run.resources import free_gpu_fraction, release_accelerator_memory

    release_accelerator_memory()
    free = free_gpu_fraction()
    return None if free is None else round(min(0.9, free - 0.03), 3)


def run_worker(
    python: Path, model_dir: Path, spec: SmokeSpec, log_file: Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Run the worker on `model_dir`; a crash or timeout becomes a one-line StageFailed (log kept)."""
    request = {
        "trust_remote_code": trust_remote_code,
        "gpu_memory_utilization": gpu_memory_utilization(),
        "model": str(model_dir),
        "prompts": spec.prompts,
        "max_tokens": spec.max_tokens,
        "chat_template": has_chat_template(model_dir) if spec.chat_template is None else spec.chat_template,
        "kv_cache_gib": spec.kv_cache_gib,
        "max_model_len": spec.max_model_len,
        "tensor_parallel_size": spec.tensor_parallel_size,
    }
    _, result = run_json_child(
        [str(python), str(WORKER)], request, log_file, spec.timeout_s, f"smoke: vLLM on {model_dir}", "smoke.timeout_s"
    )
    if result is None:
        raise StageFailed(f"smoke: the vLLM worker died without a result on {model_dir}; log: {log_file}")
    return result
