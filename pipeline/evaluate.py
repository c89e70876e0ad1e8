"""Eval stage: lm-eval MMLU baseline vs quantized, next-token fidelity and the quality gate."""

from __future__ import annotations

from typing import Any

from pipeline.recipe import Recipe
from pipeline.run_context import RunContext


def run_eval(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    ctx.log.info("eval: not implemented yet, skipped")
    return {"_status": "disabled", "_note": "not implemented yet"}
