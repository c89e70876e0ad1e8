"""Helpers for end-to-end tests: run a bundled recipe on the demo model and find its artifact."""

from __future__ import annotations

from pathlib import Path

CORE_STEPS = "calibrate,quantize,export"
SMALL = ["--set", "calibrate.num_samples=32", "--set", "calibrate.max_seq_length=256"]
RECIPES = ["awq", "gptq", "rtn", "fp8", "fp8-static", "w8a8"]


def run_recipe(name: str, output: Path, *extra: str, steps: str = CORE_STEPS) -> int:
    """`qpipe run` in-process on the demo model with the small calibration used by the tests."""
    from pipeline.cli import main

    return main(["run", name, "--output", str(output), "--steps", steps, *SMALL, *extra])


def artifact_dir(output: Path, name: str) -> Path:
    found = [p for p in (output / "qpipe-demo").glob(f"{name}-????????") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]
