"""Run a helper script in another environment: JSON request file in, JSON result file out, bounded in time.

The vLLM environment pins its own torch, so work there (smoke worker, vLLM-backed eval) runs as a child
process. It gets its own session so that a timeout kills every process it spawned (vLLM's engine too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import StageFailed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a child's server: `vllm serve`, rank 0's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_in_session(command: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in its own session (so `kill_process_group` ends everything it spawns) with stdout and
    stderr in `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_bounded(command: list[str], log_file: Path, timeout_s: float, env: dict[str, str] | None = None) -> int | None:
    """Run `command` in its own session with stdout and stderr in `log_file`; its exit code, or None when it
    ran past `timeout_s` (its whole process group is then killed)."""
    proc = start_in_session(command, log_file, env)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        return None


def kill_process_group(proc: subprocess.Popen, grace_s: float = 0) -> None:
    """End a child started with `start_new_session=True` and all it spawned (vLLM's engine core): SIGTERM
    first when `grace_s` > 0 lets it shut down cleanly, SIGKILL if it lingers."""
    signals = ((signal.SIGTERM, grace_s),) if grace_s > 0 else ()
    for sig, wait_s in (*signals, (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_process_groups(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the process groups of several children started with `start_new_session=True`, then reap them:
    their teardowns (a GPU context each, for the ranks of a multi-GPU stage) overlap instead of queueing."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for proc in procs:
        proc.wait()


def run_json_child(
    command: list[str],
    request: dict[str, Any],
    log_file: Path,
    timeout_s: int,
    what: str,
    limit_field: str,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Run `command + [request.json, result.json]`; stdout and stderr go to `log_file`.

    Returns the exit code and the result the child wrote (None if it wrote none). A timeout raises a
    one-line StageFailed naming `what`, the recipe field that set the limit and the log.
    """
    with tempfile.TemporaryDirectory() as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        code = run_bounded([*command, str(request_file), str(result_file)], log_file, timeout_s, env)
        if code is None:
            raise StageFailed(f"{what} did not finish within {limit_field}={timeout_s} s; log: {log_file}")
        try:
            return code, json.loads(result_file.read_text())
        except (OSError, ValueError):
            return code, None
