"""Recipe schema, extends and overrides: good recipes load, bad ones fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.recipe import list_recipe_files, load_recipe

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
