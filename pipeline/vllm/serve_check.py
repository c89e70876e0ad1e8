"""`smoke.serve_check`: start `vllm serve` on the artifact (127.0.0.1, a free port), send one OpenAI-style
`/v1/completions` request, stop the server by its process group. Proves the deployment entry point works,
not just the Python API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.recipe.schema import SmokeSpec
from pipeline.run.processes import kill_process_group

POLL_S = 1.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(python: Path, model_dir: Path, spec: SmokeSpec, port: int) -> list[str]:
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


def complete(base: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One greedy `/v1/completions` request."""
    body = json.dumps({"model": "artifact", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serve_check(python: Path, model_dir: Path, spec: SmokeSpec, log_file: Path) -> dict[str, Any]:
    """Start, query once, stop; returns status (passed/failed), timings and the completion, or the error."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            serve_command(python, model_dir, spec, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            problem = wait_ready(proc, base, started + spec.timeout_s)
            if problem:
                return {"status": "failed", "error": problem, "log": str(log_file)}
            ready_s = time.monotonic() - started
            reply = complete(base, spec.prompts[0], spec.max_tokens)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"status": "failed", "error": f"/v1/completions: {exc}", "log": str(log_file)}
        finally:
            kill_process_group(proc, grace_s=30)
    text = reply["choices"][0]["text"]
    return {
        "status": "passed" if text.strip() else "failed",
        "error": None if text.strip() else "empty completion",
        "port": port,
        "ready_s": round(ready_s, 2),
        "completion": text,
        "usage": reply.get("usage"),
    }
