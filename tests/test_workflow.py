"""Lint of the example GitHub Actions workflow: valid YAML, and every make target, make variable, qpipe
subcommand and step output it uses exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "quantize-publish.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def scripts(steps: list[dict[str, Any]]) -> str:
    return "\n".join(step.get("run", "") for step in steps)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.MULTILINE))


def make_variables() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, re.MULTILINE))


def qpipe_subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_workflow_is_a_manual_matrix_job(workflow: dict[Any, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "workflow_dispatch" in triggers
    for job in workflow["jobs"].values():
        assert job["runs-on"] and job["steps"]
        assert {"model", "recipe"} <= set(job["strategy"]["matrix"])
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), step


def test_make_targets_and_variables_exist(steps: list[dict[str, Any]]) -> None:
    calls = re.findall(r"\bmake\s+([\w-]+)(.*)", scripts(steps))
    assert {target for target, _ in calls} >= {"venv", "quantize", "verify", "publish"}
    assert {target for target, _ in calls} <= make_targets()
    used = {var for _, rest in calls for var in re.findall(r"(?<![\w$])([A-Z_]+)=", rest)}
    assert {"RECIPE", "MODEL", "ARTIFACT", "TO"} <= used
    assert used <= make_variables(), used - make_variables()


def test_qpipe_subcommands_exist(steps: list[dict[str, Any]]) -> None:
    commands = set(re.findall(r"\bqpipe\s+([a-z][\w-]*)", scripts(steps)))
    assert commands <= qpipe_subcommands()
    assert {"run", "verify", "publish", "card"} <= qpipe_subcommands()


def test_publish_only_after_a_passed_gate(steps: list[dict[str, Any]]) -> None:
    ids = [step.get("id") for step in steps]
    for step in steps:
        for ref in re.findall(r"steps\.([\w-]+)\.outputs", str(step)):
            assert ref in ids[: steps.index(step)], f"{step.get('name')} uses steps.{ref} before it runs"
    (publish,) = [s for s in steps if "make publish" in s.get("run", "")]
    (verify,) = [s for s in steps if "make verify" in s.get("run", "")]
    assert steps.index(verify) < steps.index(publish)
    assert "steps.quantize.outputs.rc == '0'" in publish["if"]
    assert "secrets.HF_TOKEN" in publish["env"]["HF_TOKEN"]


def test_reports_are_uploaded_even_on_failure(steps: list[dict[str, Any]]) -> None:
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"].startswith("always()")
    assert "/reports/" in upload["with"]["path"]


def test_recipes_are_linted_before_anything_runs(steps: list[dict[str, Any]]) -> None:
    (lint,) = [s for s in steps if "make validate" in s.get("run", "")]
    (quantize,) = [s for s in steps if s.get("id") == "quantize"]
    assert "RECIPE=recipes/" in lint["run"]
    assert steps.index(lint) < steps.index(quantize)
