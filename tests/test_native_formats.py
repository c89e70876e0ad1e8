"""Native GPTQ/AWQ checkpoints via GPTQModel: quantize, reload, verify, vLLM's method, KL vs compressed-tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from demo_runs import artifact_dir, run_recipe

from pipeline.artifact.verify import quantization_problems
from pipeline.errors import PipelineError
from pipeline.formats import FORMATS
from pipeline.recipe.load import load_recipe
from pipeline.run.manifest import Manifest
from pipeline.validate import validate_recipe

# recipe -> (checkpoint format, the compressed-tensors recipe with the same method and scheme)
NATIVE = {"gptq-native": ("gptq", "gptq"), "awq-native": ("awq", "awq")}


@pytest.fixture(scope="session")
def native_artifacts(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    output = tmp_path_factory.mktemp("native")
    for name in NATIVE:
        assert run_recipe(name, output) == 0, name
    return {name: artifact_dir(output, name) for name in NATIVE}


@pytest.mark.e2e
@pytest.mark.parametrize("name", NATIVE)
def test_native_artifact_is_complete_and_reloads(native_artifacts: dict[str, Path], name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, fmt = native_artifacts[name], NATIVE[name][0]
    manifest = Manifest.load(run_dir / "manifest.json")
    assert manifest.status == "complete"
    assert manifest.stages["quantize"].outputs["engine"].startswith("gptqmodel ")
    assert manifest.stages["export"].outputs["format"] == fmt
    assert json.loads((run_dir / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    assert quantization_problems(run_dir / "model") == []
    assert list((run_dir / "logs").glob(f"{fmt}_log_*.log")), "GPTQModel's log files belong in the run's logs/"
    assert "format that vLLM" in (run_dir / "model" / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    with torch.inference_mode():
        logits = model(**tokenizer("The river town keeps", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.e2e
def test_native_kl_is_in_the_range_of_compressed_tensors(
    native_artifacts: dict[str, Path], demo_artifacts: dict[str, Path], demo_model_dir: Path
) -> None:
    """Same method and scheme, other engine and format: the error vs the base model is comparable, and
    still below plain round-to-nearest."""
    from pipeline.demo.corpus import heldout_records
    from pipeline.eval.fidelity import next_token_fidelity

    texts = [r["text"] for r in heldout_records()][:24]
    dirs = {**native_artifacts, **{n: demo_artifacts[n] for n in ("rtn", "gptq", "awq")}}
    kl = {n: next_token_fidelity(demo_model_dir, d / "model", texts, 256, 8)["kl_mean"] for n, d in dirs.items()}
    for name, (_, twin) in NATIVE.items():
        assert kl[name] < kl["rtn"], kl
        assert kl[name] < 2 * kl[twin], kl


@pytest.mark.e2e
def test_verify_names_a_native_config_that_disagrees_with_the_recipe(
    native_artifacts: dict[str, Path], tmp_path: Path
) -> None:
    model = shutil.copytree(native_artifacts["gptq-native"] / "model", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (model / "config.json").write_text(json.dumps(config))
    assert quantization_problems(model) == ["config.json: quantization_config.group_size: 64, recipe promised 128"]


@pytest.mark.e2e
@pytest.mark.vllm
@pytest.mark.parametrize("name", NATIVE)
def test_vllm_detects_the_native_method(vllm_ready: Path, native_artifacts: dict[str, Path], name: str) -> None:
    run_dir, fmt = native_artifacts[name], NATIVE[name][0]
    assert run_recipe(name, run_dir.parent.parent, steps="smoke") == 0
    report = json.loads((run_dir / "reports" / "smoke.json").read_text())
    assert report["vllm_method"] in FORMATS[fmt].vllm_methods, report.get("vllm_method")
    assert report["problems"] == []
    record = Manifest.load(run_dir / "manifest.json").stages["smoke"]
    if report["status"] == "unsupported-on-this-platform":  # int4 needs AVX-512 or a GPU in vLLM: docs/VLLM.md
        assert record.status == "unsupported" and record.outputs["vllm_method"] == report["vllm_method"]
    else:
        assert report["status"] == "passed" and record.status == "done"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quantize.actorder=group"], "quantize.actorder: backend gptqmodel has no equivalent; remove it"),
        (["quantize.ignore=[lm_head, mlp.down_proj]"], "quantize.targets/ignore: backend gptqmodel quantizes every"),
        (["quantize.method=rtn"], "quantize.method: backend gptqmodel has no method 'rtn'"),
        (["quantize.scheme=FP8_DYNAMIC"], "does not support FP8_DYNAMIC"),
    ],
)
def test_native_recipes_reject_what_gptqmodel_cannot_do(overrides: list[str], expected: str) -> None:
    with pytest.raises(PipelineError, match=expected.replace("[", r"\[")):
        recipe, _ = load_recipe("gptq-native", overrides)
        validate_recipe(recipe)


def test_awq_format_is_four_bit_only() -> None:
    recipe, _ = load_recipe("awq-native", ["quantize.scheme=W8A16"])
    with pytest.raises(PipelineError, match="the AWQ checkpoint format is 4-bit only"):
        validate_recipe(recipe)
