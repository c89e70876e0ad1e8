"""`qpipe diff A B`: two recipes (the effective settings that differ) or two artifacts (those settings, and the
gate, recovery, KL, size and serving figures side by side), so a team sees what a change bought."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifact.card import (
    SERVING_REPORT,
    base_model,
    eval_section,
    fmt_number,
    fmt_percent,
    fmt_size,
    size_section,
    smoke_section,
)
from pipeline.artifact.verify import load_saved_recipe, open_artifact
from pipeline.errors import PipelineError
from pipeline.recipe.effective import MISSING, differences, settings, table
from pipeline.recipe.load import load_recipe
from pipeline.run.context import RECIPE_FILE


def diff(a: str, b: str) -> str:
    """Two folders are artifacts (run directories or published folders); anything else names a recipe."""
    kinds = {Path(a).is_dir(), Path(b).is_dir()}
    if kinds == {True, False}:
        raise PipelineError(f"diff: {a} and {b} are a recipe and an artifact; compare two recipes or two artifacts")
    return diff_artifacts(Path(a), Path(b)) if kinds == {True} else diff_recipes(a, b)


def diff_recipes(a: str, b: str) -> str:
    """The effective settings (after `extends:` and the data defaults) in which two recipes differ."""
    changed = differences(settings(load_recipe(a)[0]), settings(load_recipe(b)[0]))
    return table(["setting", a, b], changed) if changed else f"{a} and {b} have the same effective settings\n"


def diff_artifacts(a: Path, b: Path) -> str:
    """The settings the two artifacts' effective recipes differ in, then their figures side by side."""
    recipes = [load_saved_recipe(open_artifact(p).model_dir / RECIPE_FILE) for p in (a, b)]
    changed = differences(settings(recipes[0]), settings(recipes[1]))
    first, second = figures(a), figures(b)
    rows = [[name, first.get(name, MISSING), second.get(name, MISSING)] for name in dict.fromkeys([*first, *second])]
    head = ["setting", str(a), str(b)]
    same = "" if changed else "(the effective recipes are the same)\n"
    return table(head, changed) + same + "\n" + table(["figure", str(a), str(b)], rows)


def figures(path: Path) -> dict[str, str]:
    """Gate, recovery, KL, size, smoke and serving figures of one artifact, as the model card shows them."""
    artifact = open_artifact(path)
    manifest = artifact.manifest
    found = {"gate": manifest.gate}
    evaluation = eval_section(artifact.root, manifest)
    if evaluation["ran"]:
        for paired in evaluation["paired"]:
            interval = f"{fmt_percent(paired['ci_low'])} – {fmt_percent(paired['ci_high'])}"
            found[f"recovery {paired['task']}"] = f"{fmt_percent(paired['recovery'])} ({interval})"
        for check in evaluation["checks"]:
            found[f"recovery {check['task']} {check['metric']}"] = fmt_percent(check["recovery"])
        fidelity = evaluation["fidelity"] or {}
        found["KL vs base (nats/token)"] = fmt_number(fidelity.get("kl_mean"))
        found["top-1 agreement"] = fmt_percent(fidelity.get("top1_agreement"))
    size = size_section(manifest, base_model(manifest))
    found["size on disk"] = fmt_size(size["quantized"])
    smoke = smoke_section(artifact.root, manifest)
    for row in smoke["rows"] if smoke["ran"] else []:
        found[f"smoke {row['figure']}"] = fmt_size(row["quantized"]) if row["bytes"] else fmt_number(row["quantized"])
    found.update(serving_figures(artifact.root / SERVING_REPORT))
    return found


def serving_figures(path: Path) -> dict[str, str]:
    """The quantized model's run of `qpipe bench serve` (reports/serving.json), when it was measured."""
    if not path.is_file():
        return {}
    runs: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["runs"]
    run = next((r for r in runs if r["label"] != "base" and not r["disabled_kernels"] and r["status"] == "ok"), None)
    if run is None:
        return {}
    found = {
        "serving TTFT (ms)": fmt_number(run["ttft_s"] * 1000),
        "serving decode tok/s (batch 1)": fmt_number(run["decode_tokens_per_s"]),
        "serving weights (GiB)": fmt_number(run["weights_gib"]),
    }
    for level in run["sweep"]:
        found[f"serving out tok/s @{level['requests']}"] = fmt_number(level["output_tokens_per_s"])
    return found
