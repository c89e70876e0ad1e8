"""`smoke.serve_check`: start `vllm serve` on the artifact (127.0.0.1, a free port, an API key), then from the
vLLM environment's OpenAI client: one completion, a wrong key refused, and time to first token and tokens/s at
`smoke.serve_concurrency` streamed requests at once; the server is stopped by its process group. Proves the
deployment entry point works, not just the Python API."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.recipe.schema import SmokeSpec
from pipeline.run.processes import free_port, kill_process_group, run_json_child, start_in_session

CLIENT = Path(__file__).with_name("client.py")  # run by file path in the vLLM environment (stdlib + openai)

POLL_S = 1.0


def serve_command(
    python: Path, model_dir: Path, spec: SmokeSpec, port: int, trust_remote_code: bool = False
) -> list[str]:
    """`vllm serve` from the vLLM environment, with the smoke section's engine settings."""
    from pipeline.vllm.launch import gpu_memory_utilization

    utilization = gpu_memory_utilization()
    return [
        str(python.parent / "vllm"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "artifact",
        "--enforce-eager",
        "--max-model-len",
        str(spec.max_model_len),
        "--kv-cache-memory-bytes",
        str(spec.kv_cache_bytes),
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--seed",
        "0",
        *([] if utilization is None else ["--gpu-memory-utilization", str(utilization)]),
        *(["--trust-remote-code"] if trust_remote_code else []),
    ]


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return 0


def wait_ready(proc: subprocess.Popen, base: str, deadline: float) -> str | None:
    """None once `/health` answers 200; else why not (the server exited, or the deadline passed)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"vllm serve exited with code {proc.returncode} before it was ready"
        if _get(f"{base}/health", timeout=2) == 200:
            return None
        time.sleep(POLL_S)
    return "vllm serve was not ready before smoke.timeout_s"


def client_requests(python: Path, base: str, key: str, spec: SmokeSpec, log_file: Path) -> dict[str, Any]:
    """pipeline/vllm/client.py in the vLLM environment (the key travels in its environment, not its argv)."""
    request = {
        "base_url": base,
        "model": "artifact",
        "prompt": spec.prompts[0],
        "max_tokens": spec.max_tokens,
        "concurrency": spec.serve_concurrency,
    }
    env = {**os.environ, "OPENAI_API_KEY": key}
    command = [str(python), str(CLIENT)]
    _, result = run_json_child(
        command, request, log_file, spec.timeout_s, "smoke: OpenAI client", "smoke.timeout_s", env
    )
    return result or {"error": f"the client wrote no result; log: {log_file}"}


def serve_check(
    python: Path, model_dir: Path, spec: SmokeSpec, log_file: Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Start, query through the OpenAI client, stop; returns status (passed/failed), timings, the completion and
    the per-concurrency figures, or the error."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_API_KEY": key}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = start_in_session(serve_command(python, model_dir, spec, port, trust_remote_code), log_file, env)
    try:
        problem = wait_ready(proc, base, started + spec.timeout_s)
        if problem:
            return {"status": "failed", "error": problem, "log": str(log_file)}
        ready_s = time.monotonic() - started
        reply = client_requests(python, base, key, spec, log_file.with_name(log_file.stem + "-client.log"))
    finally:
        kill_process_group(proc, grace_s=30)
    return {
        **reply,
        "status": "failed" if (error := client_problem(reply)) else "passed",
        "error": error,
        "port": port,
        "ready_s": round(ready_s, 2),
    }


def client_problem(reply: dict[str, Any]) -> str | None:
    """What is wrong with the client's result, if anything."""
    if "error" in reply:
        return f"OpenAI client: {reply['error']}"
    if not reply["completion"].strip():
        return "empty completion"
    if reply["unauthenticated_status"] != 401:
        return f"a request with a wrong API key got HTTP {reply['unauthenticated_status']}, not 401"
    return None
