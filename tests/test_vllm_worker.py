"""vLLM child processes: the worker never outlives the qpipe process that started it; the serve command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.vllm.launch import WORKER


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_worker_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A qpipe killed by SIGKILL cannot stop its child; the worker must notice (its engine would hold the GPU)."""
    pid_file = tmp_path / "worker.pid"
    parent = (
        "import subprocess, sys, time; "
        f"w = subprocess.Popen([sys.executable, {str(WORKER)!r}], stdout=subprocess.DEVNULL, stderr=2); "
        f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(120)"
    )
    read_end, write_end = os.pipe()  # the worker waits for its request on this stdin, which the test keeps open
    proc = subprocess.Popen([sys.executable, "-c", parent], stdin=read_end)
    os.close(read_end)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the worker did not start"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        time.sleep(1.0)  # let it reach its stdin read
        assert _alive(worker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        os.close(write_end)


def test_serve_command_passes_trust_remote_code_only_when_the_recipe_does(tmp_path: Path) -> None:
    from pipeline.recipe.schema import SmokeSpec
    from pipeline.vllm.serve_check import serve_command

    python = tmp_path / "bin" / "python"
    plain = serve_command(python, tmp_path, SmokeSpec(), 8000)
    trusted = serve_command(python, tmp_path, SmokeSpec(), 8000, trust_remote_code=True)
    assert plain[:2] == [str(tmp_path / "bin" / "vllm"), "serve"] and "--trust-remote-code" not in plain
    assert trusted == [*plain, "--trust-remote-code"]
    assert not any("key" in arg for arg in plain)  # the API key travels in the environment, never in argv


def test_serve_check_fails_unless_a_wrong_api_key_is_refused() -> None:
    """The serve check's verdict proves the key is enforced: a server that answers a wrong key fails it."""
    from pipeline.vllm.serve_check import client_problem

    reply = {"completion": "Paris", "usage": None, "levels": []}
    assert client_problem({**reply, "unauthenticated_status": 401}) is None
    assert client_problem({**reply, "unauthenticated_status": 200}) == (
        "a request with a wrong API key got HTTP 200, not 401"
    )


PREFIX = "(EngineCore pid=41) ERROR 11-30 04:10:01 [core.py:1510] "
ENGINE_TRACEBACK = [  # as vLLM's engine process logs a start-up failure (prefix on every line)
    "EngineCore failed to start.",
    "Traceback (most recent call last):",
    '  File "/env/vllm/v1/engine/core.py", line 90, in __init__',
    '  File "/env/vllm/model_executor/layers/fused_moe/layer.py", line 7, in f',
    '  File "/env/vllm/model_executor/layers/fused_moe/oracle/{module}.py", line 362, in g',
    "{error}",
]


@pytest.mark.parametrize(
    ("module", "error"),
    [
        ("int_wna16", "NotImplementedError: No WNA16 MoE backend supports the deployment configuration."),
        ("fp8", "ValueError: Unsupported FP8 MoE backend: NONE"),
    ],
    ids=["awq-moe", "fp8-moe"],
)
def test_no_moe_kernel_here_is_a_platform_limit(module: str, error: str) -> None:
    """vLLM's MoE kernel oracle finding no kernel for the scheme on this platform (a tiny Qwen3-MoE on a CPU):
    `unsupported-on-this-platform` with vLLM's reason, not a failed artifact."""
    from pipeline.vllm.worker import error_result

    captured = "\n".join(PREFIX + line for line in ENGINE_TRACEBACK).format(module=module, error=error)
    result = error_result(RuntimeError("Engine core initialization failed"), captured, {"timings": {}})
    assert result["status"] == "unsupported-on-this-platform"
    assert result["error"] == error
    loaded = error_result(RuntimeError("x"), captured, {"timings": {"load_s": 3.0}})
    assert loaded["status"] == "error"  # after loading, a ValueError there is a failure, not a missing kernel


def test_vllm_eval_without_lm_eval_names_the_environment_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vLLM environment without lm-eval (a linked site directory holds only vLLM) is one line with the fix,
    not the child's bare ModuleNotFoundError."""
    import json
    import venv

    from pipeline.errors import StageFailed
    from pipeline.recipe.load import load_recipe
    from pipeline.vllm import environment, evaluation

    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # an interpreter with no packages at all
    monkeypatch.setattr(environment, "vllm_python", lambda spec: bare / "bin" / "python")
    model = tmp_path / "model"
    model.mkdir()
    config = {"max_position_embeddings": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
    (model / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2, "hidden_size": 128}))
    recipe, _ = load_recipe("gptq", ["eval.backend=vllm"])
    request = {
        "model_path": str(model), "tasks": ["mmlu"], "num_fewshot": 0, "limit": 1, "batch_size": 1,
        "device": "cpu", "include_path": None, "backend": "vllm",
    }  # fmt: skip
    with pytest.raises(StageFailed) as failed:
        evaluation.run_in_vllm_env(request, recipe, tmp_path / "eval.log")
    message = str(failed.value)
    assert "has no lm-eval" in message and str(bare) in message and "eval.backend: hf" in message
    assert "\n" not in message
