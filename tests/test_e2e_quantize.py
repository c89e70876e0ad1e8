"""End-to-end on the demo model: every recipe calibrates, quantizes, exports and reloads with transformers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from demo_runs import CORE_STEPS, RECIPES, artifact_dir, run_recipe

from pipeline.cli import main
from pipeline.demo.corpus import heldout_records
from pipeline.run.files import sha256_file
from pipeline.run.manifest import Manifest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", RECIPES)
def test_artifact_is_complete_and_reloads(demo_artifacts: dict[str, Path], name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = demo_artifacts[name]
    assert not run_dir.name.endswith(".partial")
    manifest = Manifest.load(run_dir / "manifest.json")
    assert manifest is not None and manifest.status == "complete"
    export = manifest.stages["export"]
    assert export.status == "done" and export.wall_s is not None and export.peak_rss_mb
    for rel, meta in export.outputs["files"].items():
        assert sha256_file(run_dir / "model" / rel) == meta["sha256"]
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (run_dir / "model" / "qpipe_recipe.yaml").is_file()

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tokenizer("The river town keeps", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_fp8_dynamic_needs_no_calibration(demo_artifacts: dict[str, Path]) -> None:
    manifest = Manifest.load(demo_artifacts["fp8"] / "manifest.json")
    assert manifest.stages["calibrate"].status == "not-needed"
    assert not (demo_artifacts["fp8"] / "calibration").exists()


def test_gptq_and_awq_beat_round_to_nearest(demo_artifacts: dict[str, Path], demo_model_dir: Path) -> None:
    """Quantization error means something on the demo model: calibrated methods beat plain RTN."""
    from pipeline.eval.fidelity import next_token_fidelity

    texts = [r["text"] for r in heldout_records()][:24]
    kl = {
        name: next_token_fidelity(demo_model_dir, demo_artifacts[name] / "model", texts, 256, 8)["kl_mean"]
        for name in ("rtn", "gptq", "awq", "w8a8", "fp8")
    }
    assert kl["gptq"] < kl["rtn"], kl
    assert kl["awq"] < kl["rtn"], kl
    assert kl["w8a8"] < kl["rtn"] and kl["fp8"] < kl["rtn"], kl


def test_rerun_skips_finished_stages(demo_artifacts: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qpipe")
    run_dir = demo_artifacts["gptq"]
    before = (run_dir / "manifest.json").read_text()
    assert run_recipe("gptq", run_dir.parent.parent) == 0
    after = Manifest.model_validate_json((run_dir / "manifest.json").read_text())
    old = Manifest.model_validate_json(before)
    for stage in ("calibrate", "quantize", "export"):
        assert after.stages[stage].started == old.stages[stage].started, stage
    assert "export: up to date" in caplog.text


def test_same_recipe_and_seed_give_identical_weights(demo_artifacts: dict[str, Path], tmp_path: Path) -> None:
    assert run_recipe("gptq", tmp_path) == 0
    again = artifact_dir(tmp_path, "gptq") / "model" / "model.safetensors"
    assert sha256_file(again) == sha256_file(demo_artifacts["gptq"] / "model" / "model.safetensors")


def test_failed_export_leaves_no_finished_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.backends import llmcompressor_backend

    def broken_save(self, model, tokenizer, out_dir, dtype=None):  # noqa: ANN001
        (Path(out_dir) / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(llmcompressor_backend.Backend, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["run", "fp8", "--output", str(tmp_path), "--steps", CORE_STEPS])
    runs = list((tmp_path / "qpipe-demo").glob("fp8-*"))
    assert len(runs) == 1 and runs[0].name.endswith(".partial")
    assert not (runs[0] / "model").exists()
    manifest = Manifest.load(runs[0] / "manifest.json")
    assert manifest.status == "failed" and manifest.stages["export"].status == "failed"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["validate", "gptq", "--set", "quantize.group_size=100"], "quantize.group_size: must be a power of two"),
        (["validate", "gptq", "--set", "quantize.group_size=512"], "quantize.group_size: 512 does not divide"),
        (["validate", "nope"], "nope: no such recipe"),
        (["validate", "gptq", "--model", "/no/such/model"], "model.id: /no/such/model does not exist"),
        (["validate", "gptq", "--set", "calibrate.dataset=/no/data.jsonl"], "calibrate.dataset: /no/data.jsonl does"),
        (["run", "gptq", "--output", "/proc/qpipe-out"], "export.output_dir: /proc/qpipe-out is not writable"),
        (["run", "gptq", "--steps", "calibrate,bake"], "--steps: unknown stage 'bake'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], expected: str, demo_model_dir: Path) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr
    assert "Traceback" not in result.stderr


def test_validate_ok_and_recipes_listing() -> None:
    ok = cli("validate", "awq")
    assert ok.returncode == 0 and "OK (awq W4A16_ASYM" in ok.stdout
    listing = cli("recipes")
    names = {line.split()[0] for line in listing.stdout.splitlines()}
    assert {"awq", "gptq", "fp8", "fp8-static", "w8a8"} <= names
