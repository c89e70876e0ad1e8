"""Smoke stage: load the exported artifact in vLLM (own environment, subprocess) and generate."""

from __future__ import annotations

from typing import Any

from pipeline.recipe import Recipe
from pipeline.run_context import RunContext


def run_smoke(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    ctx.log.info("smoke: not implemented yet, skipped")
    return {"_status": "disabled", "_note": "not implemented yet"}
