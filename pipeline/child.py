"""Run a helper script in another environment: JSON request file in, JSON result file out, bounded in time.

The vLLM environment pins its own torch, so work there (smoke worker, vLLM-backed eval) runs as a child
process. It gets its own session so that a timeout kills every process it spawned (vLLM's engine too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import StageFailed


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

    Returns the exit code and the result the child wrote (None if it wrote none). A timeout kills the
    process group and raises a one-line StageFailed naming `what`, the recipe field that set the limit
    and the log.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, log_file.open("w") as log:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        proc = subprocess.Popen(
            [*command, str(request_file), str(result_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StageFailed(f"{what} did not finish within {limit_field}={timeout_s} s; log: {log_file}") from None
        if not result_file.is_file():
            return proc.returncode, None
        try:
            return proc.returncode, json.loads(result_file.read_text())
        except ValueError:
            return proc.returncode, None
