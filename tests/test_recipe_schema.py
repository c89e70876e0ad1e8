"""The recipe's JSON Schema (`qpipe recipes schema`, recipes/recipe.schema.json): generated from the pydantic models,
kept fresh, accepting every bundled recipe and a team's recipe written as documented, rejecting the held-in bad ones
as the loader does."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe.load import RECIPES_DIR, load_recipe, parse_yaml
from pipeline.recipe.schema import recipe_json_schema

SCHEMA_FILE = RECIPES_DIR / "recipe.schema.json"
MODELINE = "# yaml-language-server: $schema=recipe.schema.json"


def test_committed_schema_is_fresh(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == recipe_json_schema()
    assert SCHEMA_FILE.read_text(encoding="utf-8") == printed, (
        "recipes/recipe.schema.json is stale: run `qpipe recipes schema > recipes/recipe.schema.json`"
    )


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_schema_accepts_every_bundled_recipe(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == MODELINE  # editors with the YAML extension complete and check fields
    jsonschema.Draft202012Validator(recipe_json_schema()).validate(parse_yaml(text))


HELD_IN_BAD = {
    "unknown-key": "quantize:\n  colour: red\n",
    "misspelt-section": "quantise:\n  method: gptq\n",
    "unknown-method": "quantize:\n  method: awk\n",
    "unknown-scheme": "quantize:\n  scheme: W3A99\n",
    "boolean-tuning": "quantize:\n  tuning: false\n",
    "zero-samples": "calibrate:\n  num_samples: 0\n",
    "batch-size-word": "eval:\n  batch_size: many\n",
    "extends-list": "extends: [awq]\n",
}


@pytest.mark.parametrize("text", HELD_IN_BAD.values(), ids=HELD_IN_BAD.keys())
def test_schema_and_loader_reject_the_held_in_bad_recipes(text: str, tmp_path: Path) -> None:
    assert list(jsonschema.Draft202012Validator(recipe_json_schema()).iter_errors(parse_yaml(text)))
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PipelineError):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_schema_accepts_a_team_recipe_written_as_documented() -> None:
    team = parse_yaml("extends: awq\nquantize:\n  tuning: off\n  group_size: 64\neval:\n  batch_size: auto\n")
    jsonschema.Draft202012Validator(recipe_json_schema()).validate(team)
