"""Runs a recipe's stages in order, skipping those whose inputs' fingerprint matches a finished record."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.artifact.card import write_model_card
from pipeline.backends.distributed import RankLaunch, check_parallel_resources
from pipeline.errors import GateFailed, GateInconclusive
from pipeline.recipe.load import recipe_yaml
from pipeline.recipe.schema import Recipe
from pipeline.run.context import LOGGER_NAME, RunContext
from pipeline.run.files import exclusive_lock, remove_stale_temps, write_text_atomic
from pipeline.run.manifest import Manifest, StageRecord, fingerprint, library_versions, now_iso
from pipeline.run.model_source import ModelSource, model_fingerprint, resolve_model
from pipeline.run.resources import ResourceMonitor

STAGE_NAMES = ("calibrate", "quantize", "export", "eval", "smoke")
log = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class Stage:
    """A stage: its runner and the run-dir path whose presence lets a finished record be trusted."""

    name: str
    run: Callable[[Recipe, RunContext], dict[str, Any]]
    output: str | None


def _stages() -> dict[str, Stage]:
    from pipeline.stages.calibrate import run_calibrate
    from pipeline.stages.evaluate import run_eval
    from pipeline.stages.export import run_export
    from pipeline.stages.quantize import run_quantize
    from pipeline.stages.smoke import run_smoke

    return {
        "calibrate": Stage("calibrate", run_calibrate, "calibration"),
        "quantize": Stage("quantize", run_quantize, None),
        "export": Stage("export", run_export, "model/config.json"),
        "eval": Stage("eval", run_eval, "reports/eval.json"),
        "smoke": Stage("smoke", run_smoke, "reports/smoke.json"),
    }


def parse_steps(steps: str | None) -> list[str]:
    from pipeline.errors import PipelineError

    if not steps:
        return list(STAGE_NAMES)
    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGE_NAMES]
    if unknown:
        raise PipelineError(f"--steps: unknown stage {unknown[0]!r}; use a comma list of {','.join(STAGE_NAMES)}")
    return [s for s in STAGE_NAMES if s in chosen]


def run_directory(recipe: Recipe, source: ModelSource, output: Path | None) -> Path:
    root = output or Path(recipe.export.output_dir)
    return root / source.slug / f"{recipe.name}-{recipe.artifact_hash()}"


def stage_fingerprints(recipe: Recipe, ctx: RunContext) -> dict[str, str | None]:
    """Each stage's fingerprint chains its upstream's, so a changed input re-runs everything after it."""
    from pipeline.stages.calibrate import calibration_fingerprint
    from pipeline.stages.evaluate import gate_limits

    versions = library_versions()
    calib = None
    if recipe.quantize.calibrates:
        calib = calibration_fingerprint(recipe, ctx.source)
    engine = {k: versions.get(k) for k in ("torch", "transformers", "llmcompressor", "compressed-tensors", "gptqmodel")}
    quant = fingerprint("quantize/v1", ctx.model_fingerprint, calib, recipe.model.dtype, recipe.quantize, engine)
    export = fingerprint("export/v1", quant, recipe.export)
    return {
        "calibrate": calib,
        "quantize": quant,
        "export": export,
        "eval": fingerprint("eval/v2", export, recipe.eval, gate_limits(recipe)),
        "smoke": fingerprint("smoke/v1", export, recipe.smoke),
    }


def _is_fresh(ctx: RunContext, stage: Stage, fp: str | None) -> bool:
    record = ctx.manifest.stages.get(stage.name)
    if record is None or record.status != "done" or record.fingerprint != fp:
        return False
    return stage.output is None or (ctx.run_dir / stage.output).exists()


def _execute(stage: Stage, recipe: Recipe, ctx: RunContext, fp: str | None) -> StageRecord:
    log.info("%s: running", stage.name)
    started = now_iso()
    with ResourceMonitor() as monitor:
        outputs = stage.run(recipe, ctx)
    note = outputs.pop("_note", None)
    status = outputs.pop("_status", "done")
    return StageRecord(
        status=status,
        fingerprint=fp,
        started=started,
        wall_s=round(monitor.wall_s, 3),
        peak_rss_mb=round(monitor.peak_rss_mb, 1),
        peak_gpu_mb=_mb(monitor.peak_gpu_mb),
        peak_gpu_device_mb=_mb(monitor.peak_gpu_device_mb),
        inputs={"model": ctx.source.identity, "model_fingerprint": ctx.model_fingerprint},
        outputs=outputs,
        versions=library_versions(),
        note=note,
    )


def _mb(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


UPSTREAM = {"calibrate": None, "quantize": "calibrate", "export": "quantize", "eval": "export", "smoke": "export"}


def _plan(steps: list[str], ctx: RunContext, fps: dict[str, str | None], force: bool) -> list[str]:
    """Requested stages that are stale (or forced), plus any stale upstream stage they need.

    Quantize hands its model to export in memory, so it is fresh exactly when export is; a stage that
    re-runs also re-runs its requested downstream stages (their fingerprints chain to it anyway)."""
    stages = _stages()

    def fresh(name: str) -> bool:
        if name == "quantize":
            return fresh("export")
        return fps[name] is None or _is_fresh(ctx, stages[name], fps[name])

    todo = {s for s in steps if (force and fps[s] is not None) or not fresh(s)}
    for name in STAGE_NAMES[::-1]:
        upstream = UPSTREAM[name]
        if name in todo and upstream and fps[upstream] is not None and not fresh(upstream):
            todo.add(upstream)
    if "export" in todo:
        todo.add("quantize")
    if "quantize" in todo:
        todo |= {s for s in ("export", "eval", "smoke") if s in steps}
    return [s for s in STAGE_NAMES if s in todo]


def _open_context(recipe: Recipe, recipe_source: Path, source: ModelSource, final: Path) -> RunContext:
    run_dir = final if final.exists() else final.with_name(final.name + ".partial")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(run_dir):
        log.info("removed %s, left by an interrupted run", stale)
    manifest = Manifest.load(run_dir / "manifest.json") or Manifest(
        qpipe_version=__version__,
        recipe=recipe.name,
        recipe_hash=recipe.artifact_hash(),
        recipe_source=str(recipe_source),
    )
    manifest.status = "running"
    manifest.command = Manifest.model_fields["command"].default_factory()
    ctx = RunContext(recipe, source, model_fingerprint(source), run_dir, manifest)
    manifest.model = {
        "identity": source.identity,
        "kind": source.kind,
        "path": str(source.path),
        "revision": source.revision,
        "fingerprint": ctx.model_fingerprint,
    }
    write_text_atomic(run_dir / "recipe.yaml", recipe_yaml(recipe))
    ctx.save_manifest()
    return ctx


def _attach_log_file(run_dir: Path) -> logging.Handler:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _finalize(ctx: RunContext) -> None:
    """Mark complete and move <name>.partial to <name> so only finished runs look finished."""
    ctx.manifest.status = "complete"
    ctx.save_manifest()
    if ctx.run_dir.name.endswith(".partial"):
        final = ctx.run_dir.with_name(ctx.run_dir.name.removesuffix(".partial"))
        os.replace(ctx.run_dir, final)
        ctx.run_dir = final


def _run_stages(recipe: Recipe, ctx: RunContext, steps: list[str], force: bool, ranks: RankLaunch | None) -> None:
    """The planned stages in order, each recorded in the manifest; then the card and the final directory name.
    Prestarted `ranks` go to the quantize stage, or are stopped at once when it does not run."""
    handler = _attach_log_file(ctx.run_dir)
    try:
        fps = stage_fingerprints(recipe, ctx)
        todo = _plan(steps, ctx, fps, force)
        check_parallel_resources(recipe, todo)
        if ranks is not None and "quantize" in todo:
            ctx.state["ranks"] = ranks
        elif ranks is not None:
            ranks.stop()
        stages = _stages()
        if fps["calibrate"] is None and "calibrate" in steps:
            ctx.manifest.stages["calibrate"] = StageRecord(status="not-needed", note="scheme needs no calibration")
        for name in steps:
            if name not in todo and fps[name] is not None:
                log.info("%s: up to date (fingerprint %s), skipped", name, fps[name][:12])
        for name in todo:
            try:
                record = _execute(stages[name], recipe, ctx, fps[name])
            except BaseException:
                ctx.manifest.stages[name] = StageRecord(status="failed", fingerprint=fps[name], started=now_iso())
                ctx.manifest.status = "failed"
                ctx.save_manifest()
                raise
            ctx.manifest.stages[name] = record
            if name == "eval" and "gate" in record.outputs:
                ctx.manifest.gate = record.outputs["gate"]
            ctx.save_manifest()
        write_model_card(ctx)
        _finalize(ctx)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_pipeline(
    recipe: Recipe,
    recipe_source: Path,
    steps: list[str],
    force: bool = False,
    output: Path | None = None,
    ranks: RankLaunch | None = None,
) -> RunContext:
    """Run (or resume) the recipe; returns the context whose manifest records every stage. `ranks`: the ranks
    already started for a quantize stage on several GPUs (`prestarted_ranks`).

    A failed or inconclusive quality gate is recorded (manifest `gate`, artifact kept) and raised after the
    remaining stages ran, so the exit code says so (3 failed, 4 inconclusive)."""
    source = resolve_model(recipe.model)
    final = run_directory(recipe, source, output)
    with exclusive_lock(final.with_name(f".{final.name}.lock"), str(final)):
        ctx = _open_context(recipe, recipe_source, source, final)
        _run_stages(recipe, ctx, steps, force, ranks)
    if ctx.manifest.gate == "failed":
        raise GateFailed(f"eval: quality gate failed; artifact kept at {ctx.run_dir} (manifest gate: failed)")
    if ctx.manifest.gate == "inconclusive":
        raise GateInconclusive(
            f"eval: quality gate inconclusive (see reports/eval.json: evaluate more questions, e.g. raise or remove "
            f"eval.limit); artifact kept at {ctx.run_dir} (manifest gate: inconclusive)"
        )
    return ctx
