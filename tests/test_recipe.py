"""Recipe schema, extends and overrides: good recipes load, bad ones fail with one clear line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.recipe.load import list_recipe_files, load_recipe, recipe_yaml
from pipeline.validate import validate_recipe

BUNDLED = [p.stem for p in list_recipe_files()]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipes_load(name: str) -> None:
    recipe, path = load_recipe(name)
    assert recipe.name == name
    assert path.name == f"{name}.yaml"
    assert recipe.description


def test_expected_recipes_are_bundled() -> None:
    assert {"awq", "gptq", "fp8", "fp8-static", "w8a8"} <= set(BUNDLED)


def test_extends_merges_base_and_override(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("calibrate: {num_samples: 7, seed: 3}\nquantize: {method: gptq}\n")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nname: r\ncalibrate: {num_samples: 9}\n")
    recipe, _ = load_recipe(str(tmp_path / "r.yaml"))
    assert recipe.calibrate.num_samples == 9
    assert recipe.calibrate.seed == 3


def test_set_overrides_parse_yaml_values() -> None:
    recipe, _ = load_recipe(
        "gptq", ["quantize.group_size=64", "calibrate.num_samples=32", "quantize.ignore=[lm_head, x]"]
    )
    assert recipe.quantize.group_size == 64
    assert recipe.calibrate.num_samples == 32
    assert recipe.quantize.ignore == ["lm_head", "x"]


def test_model_flag_sets_model_id() -> None:
    recipe, _ = load_recipe("awq", model="Qwen/Qwen3-8B")
    assert recipe.model.id == "Qwen/Qwen3-8B"


def test_artifact_hash_ignores_eval_and_smoke_settings() -> None:
    base, _ = load_recipe("gptq")
    evald, _ = load_recipe("gptq", ["eval.limit=3", "smoke.max_tokens=4"])
    changed, _ = load_recipe("gptq", ["quantize.group_size=64"])
    assert base.artifact_hash() == evald.artifact_hash()
    assert base.artifact_hash() != changed.artifact_hash()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quantize.group_size=100"], "quantize.group_size: must be a power of two"),
        (["quantize.colour=red"], "quantize.colour: unknown key"),
        (["calibrate.num_samples=abc"], "calibrate.num_samples: Input should be a valid integer"),
        (["quantize.scheme=W3A99"], "quantize.scheme: unknown scheme 'W3A99'"),
        (["quantize.method=awq", "quantize.scheme=FP8_DYNAMIC"], "quantize.method: awq needs an integer weight-only"),
        (["quantize.scheme=FP8_DYNAMIC", "quantize.group_size=64"], "quantize.group_size: scheme FP8_DYNAMIC has no"),
        (["quantize.method=rtn", "quantize.actorder=group"], "quantize.actorder: only applies to method gptq"),
        (["quantize.smoothquant_strength=0.5"], "quantize.smoothquant_strength: SmoothQuant needs"),
        (["calibrate.num_samples=0"], "calibrate.num_samples: Input should be greater than 0"),
        (["oops"], "--set 'oops': expected key.path=value"),
    ],
)
def test_bad_recipes_fail_with_field_path(overrides: list[str], expected: str) -> None:
    with pytest.raises(PipelineError) as err:
        load_recipe("gptq", overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message
    assert err.value.exit_code == 2


def test_missing_recipe_names_the_choices() -> None:
    with pytest.raises(PipelineError, match="no such recipe; choose one of: .*awq"):
        load_recipe("does-not-exist")


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nquantize: {method: gptq\n")
    with pytest.raises(PipelineError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_recipe(str(bad))


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(PipelineError, match="extends: cycle"):
        load_recipe(str(tmp_path / "a.yaml"))


DEMO_CORPUS = "calibration/demo-calibration.jsonl"
ULTRACHAT = "HuggingFaceH4/ultrachat_200k"


@pytest.fixture()
def real_model(tmp_path: Path) -> str:
    """A local 'real' model directory: enough config.json for validate and a (never read) weights file."""
    model = tmp_path / "my-model"
    model.mkdir()
    config = '{"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}'
    (model / "config.json").write_text(config)
    (model / "model.safetensors").write_bytes(b"")
    return str(model)


def test_demo_model_defaults_to_demo_corpus_and_fixture() -> None:
    recipe, _ = load_recipe("gptq")
    assert recipe.calibrate.dataset == DEMO_CORPUS
    assert (recipe.calibrate.split, recipe.calibrate.messages_field) == ("train", None)
    assert recipe.eval.mmlu_dir == "tests/fixtures/mmlu"


@pytest.mark.parametrize("model", ["local", "Qwen/Qwen3-8B"])
def test_real_model_defaults_to_ultrachat_and_hub_mmlu(model: str, real_model: str) -> None:
    recipe, _ = load_recipe("awq", model=real_model if model == "local" else model)
    assert recipe.calibrate.dataset == ULTRACHAT
    assert (recipe.calibrate.split, recipe.calibrate.messages_field) == ("train_sft", "messages")
    assert recipe.calibrate.uses_chat_template
    assert recipe.eval.mmlu_dir is None
    saved = yaml.safe_load(recipe_yaml(recipe))
    assert saved["calibrate"]["dataset"] == ULTRACHAT and saved["eval"]["mmlu_dir"] is None


def test_model_id_from_set_or_recipe_file_also_selects_real_data(tmp_path: Path) -> None:
    via_set, _ = load_recipe("gptq", ["model.id=Qwen/Qwen3-8B"])
    (tmp_path / "r.yaml").write_text("model: {id: Qwen/Qwen3-8B}\n")
    via_file, _ = load_recipe(str(tmp_path / "r.yaml"))
    assert via_set.calibrate.dataset == via_file.calibrate.dataset == ULTRACHAT


def test_data_defaults_enter_the_artifact_hash() -> None:
    default, _ = load_recipe("gptq", model="Qwen/Qwen3-8B")
    other_split, _ = load_recipe("gptq", ["calibrate.split=test_sft"], model="Qwen/Qwen3-8B")
    assert other_split.calibrate.dataset == ULTRACHAT  # the split alone does not replace the default dataset
    assert default.artifact_hash() != other_split.artifact_hash()


def test_explicit_data_wins_over_real_model_defaults(tmp_path: Path, real_model: str) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "r.yaml").write_text(f"calibrate: {{dataset: {tmp_path / 'data.jsonl'}}}\neval: {{mmlu_dir: mmlu}}\n")
    from_file, _ = load_recipe(str(tmp_path / "r.yaml"), model=real_model)
    assert from_file.calibrate.dataset == str(tmp_path / "data.jsonl")
    assert (from_file.calibrate.split, from_file.calibrate.messages_field) == ("train", None)
    assert from_file.eval.mmlu_dir == "mmlu"
    from_set, _ = load_recipe("gptq", ["calibrate.dataset=my/data", "eval.mmlu_dir=/data/mmlu"], model=real_model)
    assert (from_set.calibrate.dataset, from_set.calibrate.messages_field) == ("my/data", None)
    assert from_set.eval.mmlu_dir == "/data/mmlu"


def test_explicit_null_mmlu_dir_wins_for_the_demo_model() -> None:
    recipe, _ = load_recipe("gptq", ["eval.mmlu_dir=null"])
    assert recipe.eval.mmlu_dir is None


def test_messages_need_the_chat_template() -> None:
    with pytest.raises(PipelineError, match="calibrate.chat_template: messages_field is rendered with the chat"):
        load_recipe("gptq", ["calibrate.chat_template=false"], model="Qwen/Qwen3-8B")


def test_demo_data_with_real_model_warns(real_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    explicit = [f"calibrate.dataset={DEMO_CORPUS}", "eval.mmlu_dir=tests/fixtures/mmlu"]
    recipe, _ = load_recipe("gptq", explicit, model=real_model)
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        validate_recipe(recipe, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.name == "qpipe" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"calibrate.dataset: {DEMO_CORPUS} is the demo model's small corpus")
    assert warnings[1].startswith("eval.mmlu_dir: tests/fixtures/mmlu is the project's tiny MMLU fixture")
    assert all("\n" not in w for w in warnings)


def test_demo_data_with_demo_model_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe, _ = load_recipe("gptq")
    with caplog.at_level(logging.WARNING, logger="qpipe"):
        validate_recipe(recipe, tmp_path / "out")
    assert not [r for r in caplog.records if r.name == "qpipe" and r.levelno >= logging.WARNING]


def test_validate_facts_name_the_data(real_model: str, tmp_path: Path) -> None:
    demo, _ = load_recipe("gptq", ["eval.limit=5"])
    facts = validate_recipe(demo, tmp_path / "out")
    assert any(
        f.startswith("calibration: ") and f.endswith(f"{DEMO_CORPUS}, text field 'text', 128 x 512 tokens")
        for f in facts
    ), facts
    assert any(
        f.startswith("eval: local MMLU ") and "(3 subjects)" in f and f.endswith("limit 5 per subject") for f in facts
    ), facts
    real, _ = load_recipe("gptq", model=real_model)
    facts = validate_recipe(real, tmp_path / "out")
    assert (
        f"calibration: hub dataset {ULTRACHAT} split train_sft, messages field 'messages' with the chat template, "
        "128 x 512 tokens"
    ) in facts
    assert "eval: MMLU from the hub (cais/mmlu), tasks mmlu" in facts
    fp8, _ = load_recipe("fp8", ["eval.enabled=false"], model=real_model)
    assert {"calibration: not needed for rtn FP8_DYNAMIC", "eval: disabled"} <= set(validate_recipe(fp8, tmp_path))


def test_cli_validate_prints_facts_and_warning(
    real_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.cli import main

    args = ["validate", "gptq", "--model", real_model, "--set", f"calibrate.dataset={DEMO_CORPUS}"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(": OK (gptq W4A16)")
    assert any(line.startswith("  calibration: ") and DEMO_CORPUS in line for line in out)
    assert "  eval: MMLU from the hub (cais/mmlu), tasks mmlu" in out
    assert "is the demo model's small corpus" in caplog.text


def test_messages_without_chat_template_name_the_plain_text_fix(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from pipeline.recipe.schema import CalibrateSpec
    from pipeline.run.text_data import select_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = None  # a base model's tokenizer
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}\n')
    with pytest.raises(PipelineError, match="calibrate.messages_field: .* no chat template .*text_field"):
        select_texts(CalibrateSpec(dataset=str(data), messages_field="messages"), tokenizer)
