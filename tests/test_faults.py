"""Fault injection: `kill -9` inside every stage, then a re-run; a file-size limit (a full disk) during export.

Whatever the moment of the kill, nothing may look finished, the re-run must skip what was done and resume, and the
finished artifact must verify; a full disk must end in one line and exit 1, with nothing half-written.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from demo_runs import SMALL

from pipeline.artifact.verify import file_problems, open_artifact, verify_artifact

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e

EVAL = ["--set", "eval.limit=4", "--set", "eval.num_fewshot=1", "--set", "eval.fidelity_samples=16"]
# seconds between a stage's "running" line and the kill: inside the stage's work on the demo model
KILL_AFTER = {"calibrate": 0.2, "quantize": 2.0, "export": 0.5, "eval": 4.0, "smoke": 15.0}


def qpipe_run(output: Path, steps: str, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "pipeline.cli", "run", "gptq", "--output", str(output), "--steps", steps]
    return [*command, *SMALL, *EVAL, *extra]


def run_and_kill(command: list[str], stage: str) -> tuple[str, list[psutil.Process]]:
    """Start `command`; SIGKILL it (it alone, as the OOM killer would) `KILL_AFTER[stage]` s after it logs
    `<stage>: running`. Returns its log and the children it had at that moment."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if f"INFO {stage}: running" in line:
            time.sleep(KILL_AFTER[stage])
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            break
    log = "".join(lines)
    assert proc.wait(timeout=60) == -9, f"{stage}: the run ended before the kill\n{log[-3000:]}"
    return log, children


def resumable(done: list[str]) -> list[str]:
    """Stages a re-run skips: quantize hands its model to export in memory, so it is redone unless export is done."""
    return [name for name in done if name != "quantize" or "export" in done]


def test_kill_9_in_every_stage_then_resume(tmp_path: Path, vllm_ready: Path) -> None:
    output, steps = tmp_path / "out", "calibrate,quantize,export,eval,smoke"
    done_before: list[str] = []
    for stage in ("calibrate", "quantize", "export", "eval", "smoke"):
        log, children = run_and_kill(qpipe_run(output, steps), stage)
        for finished in resumable(done_before):  # the re-run resumed: what the last kill left done was skipped
            assert f"INFO {finished}: up to date" in log, (stage, finished)
        (partial,) = (output / "qpipe-demo").glob("gptq-*.partial")
        assert not list((output / "qpipe-demo").glob("gptq-????????")), f"looks finished after a kill in {stage}"
        manifest = json.loads((partial / "manifest.json").read_text())
        assert manifest["status"] == "running"
        gone, alive = psutil.wait_procs(children, timeout=60)  # children die with the run (the vLLM worker too)
        assert not alive, f"{stage}: {[p.cmdline() for p in alive]}"
        done_before = [name for name, record in manifest["stages"].items() if record["status"] == "done"]
    assert {"calibrate", "quantize", "export", "eval"} <= set(done_before)  # each kill landed one stage later

    final = subprocess.run(qpipe_run(output, steps), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert final.returncode in (3, 4), final.stderr[-3000:]  # finished; the demo's gate never passes (n < 100)
    assert "INFO smoke: running" in final.stderr and "INFO eval: up to date" in final.stderr
    (artifact,) = (output / "qpipe-demo").glob("gptq-????????")
    assert verify_artifact(artifact).problems == []
    assert not [p for p in artifact.rglob(".*.tmp")], "an interrupted write was left in the artifact"


def limit_file_size(limit: int) -> None:
    """preexec_fn: files larger than `limit` bytes cannot be written (EFBIG), as on a disk that is full."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path: Path, demo_model_dir: Path) -> None:
    output = tmp_path / "out"
    command = qpipe_run(output, "calibrate,quantize,export")
    limited = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: limit_file_size(2 * 2**20),  # the demo's 5.6 MiB model file does not fit
    )
    assert limited.returncode == 1, limited.stderr[-3000:]
    last = limited.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of disk space: ") and "File too large" in last
    assert "Traceback" not in limited.stderr
    (partial,) = (output / "qpipe-demo").glob("gptq-*.partial")
    assert not (partial / "model").exists() and not list(partial.glob(".*.tmp"))  # nothing half-written
    assert json.loads((partial / "manifest.json").read_text())["stages"]["export"]["status"] == "failed"

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "INFO calibrate: up to date" in rerun.stderr
    (artifact,) = (output / "qpipe-demo").glob("gptq-????????")
    assert file_problems(open_artifact(artifact))[0] == []  # every file as the manifest records it
