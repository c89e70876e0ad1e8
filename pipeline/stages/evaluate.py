"""Eval stage: lm-eval (MMLU by default) on baseline and quantized, next-token fidelity, recovery gate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.eval.gate import MetricCheck, TokenCheck, check_recovery, gate, paired_checks, scores, token_check
from pipeline.formats import SCHEMES
from pipeline.paths import default_cache_root
from pipeline.recipe.load import resolve_data_path
from pipeline.recipe.schema import EvalSpec, Recipe
from pipeline.run.context import RunContext
from pipeline.run.files import write_json_atomic
from pipeline.run.manifest import fingerprint, library_versions
from pipeline.run.resources import default_device, release_accelerator_memory


def _local_tasks(spec: EvalSpec) -> tuple[Path | None, dict[str, Any]]:
    """Include path and provenance for a local MMLU copy (converted once), else the hub."""
    if not spec.mmlu_dir:
        return None, {"source": "hub"}
    from pipeline.eval.mmlu_local import prepare_local_mmlu

    local = prepare_local_mmlu(resolve_data_path(spec.mmlu_dir), default_cache_root() / "mmlu")
    return local.include_path, {
        "source": "local",
        "mmlu_dir": str(spec.mmlu_dir),
        "fingerprint": local.fingerprint,
        "subjects": len(local.subjects),
    }


def _evaluate(model_path: Path, recipe: Recipe, include: Path | None, log_file: Path) -> dict[str, Any]:
    """lm-eval on one model: in this process (hf), or in the vLLM environment (vllm, `log_file` keeps its log)."""
    from pipeline.eval.lm_eval_runner import run_lm_eval

    spec = recipe.eval
    request: dict[str, Any] = {
        "model_path": str(model_path),
        "tasks": spec.tasks,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
        "batch_size": spec.batch_size,
        "device": default_device(),
        "include_path": include,
        "backend": spec.backend,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "trust_remote_code": recipe.model.trust_remote_code,
    }
    start = time.perf_counter()
    if spec.backend == "vllm":
        from pipeline.vllm.evaluation import run_in_vllm_env

        summary = run_in_vllm_env(request, recipe, log_file)
    else:
        summary = run_lm_eval(**request)
        release_accelerator_memory()  # lm-eval's model is garbage now; free it before the next model loads
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    return summary


def baseline_summary(ctx: RunContext, recipe: Recipe, include: Path | None, data: dict[str, Any]) -> dict[str, Any]:
    """The unquantized model's scores, cached by model (identity, revision, content), tasks, shots, limit,
    backend and lm-eval."""
    import json

    spec = recipe.eval
    key = fingerprint(
        "baseline/v3",  # v3: per-question results for the paired gate
        ctx.source.identity,
        ctx.source.revision,
        ctx.model_fingerprint,
        spec.tasks,
        spec.num_fewshot,
        spec.limit,
        spec.backend,
        data.get("fingerprint", "hub"),
        library_versions().get("lm_eval"),
    )
    path = default_cache_root() / "baselines" / f"{key[:24]}.json"
    if path.is_file():
        ctx.log.info("eval: baseline from cache %s", path)
        return {**json.loads(path.read_text()), "cached": True}
    ctx.log.info("eval: baseline %s on %s", ctx.source.identity, ",".join(spec.tasks))
    summary = _evaluate(ctx.source.path, recipe, include, ctx.logs_dir / "eval-baseline.log")
    write_json_atomic(path, summary)
    return {**summary, "cached": False}


def fidelity(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Next-token KL(baseline || quantized) and top-1 agreement on the held-out text set."""
    from pipeline.eval.fidelity import held_out_fidelity

    result = held_out_fidelity(recipe.eval, ctx.source.path, ctx.model_dir, recipe.model.trust_remote_code)
    return {**result, "dataset": recipe.eval.fidelity_dataset}


def gate_limits(recipe: Recipe) -> dict[str, float]:
    """The gate's limits: the recipe's, else the scheme's defaults (part of the eval stage's fingerprint, so
    changed defaults re-run it)."""
    spec, scheme = recipe.eval, SCHEMES[recipe.quantize.scheme]
    return {
        "min_recovery": spec.min_recovery or scheme.default_min_recovery,
        "max_kl": spec.max_kl or scheme.default_max_kl,
        "min_top1": spec.min_top1 or scheme.default_min_top1,
    }


def token_gate(recipe: Recipe, fid: dict[str, Any], limits: dict[str, float]) -> TokenCheck | None:
    """The token-level verdict on the fidelity set, unless `eval.token_gate` is off."""
    if not recipe.eval.token_gate:
        return None
    per_text = fid["per_text"]
    return token_check(
        per_text["kl"], per_text["top1"], per_text["tokens"], max_kl=limits["max_kl"], min_top1=limits["min_top1"]
    )


def print_table(
    checks: list[MetricCheck], paired: list[dict], fid: dict[str, Any], token: TokenCheck | None, verdict: str
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="eval: baseline vs quantized", title_justify="left")
    for column in ("task", "metric", "baseline", "quantized", "recovery", "min", "pass"):
        table.add_column(column)
    for c in checks:
        stderr = f" ±{c.quantized_stderr:.3f}" if c.quantized_stderr else ""
        table.add_row(
            c.task,
            c.metric,
            f"{c.baseline:.4f}",
            f"{c.quantized:.4f}{stderr}",
            f"{c.recovery:.1%}",
            f"{c.min_recovery:.0%}",
            "yes" if c.passed else "NO",
        )
    console = Console(stderr=True)
    console.print(table)
    for p in paired:
        console.print(
            f"{p['task']}: recovery {p['recovery']:.1%} over {p['questions']} paired questions "
            f"({p['gained']} gained, {p['lost']} lost): {p['verdict']}, {p['reason']}"
        )
    console.print(
        f"fidelity: KL(base||quant) {fid['kl_mean']:.5f} nats/token, top-1 agreement {fid['top1_agreement']:.1%} "
        f"over {fid['tokens']} tokens of {fid['texts']} texts"
        + (f": {token.verdict}, {token.reason}" if token else " (eval.token_gate is off)")
    )
    console.print(f"gate: {verdict}")


def run_eval(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Evaluate baseline (cached) and the exported model, write reports/eval.json, return the verdict."""
    spec = recipe.eval
    if not spec.enabled:
        return {"_status": "disabled", "_note": "eval.enabled is false"}
    include, data = _local_tasks(spec)
    baseline = baseline_summary(ctx, recipe, include, data)
    ctx.log.info("eval: quantized model on %s", ",".join(spec.tasks))
    quantized = _evaluate(ctx.model_dir, recipe, include, ctx.logs_dir / "eval-quantized.log")
    fid = fidelity(recipe, ctx)
    limits = gate_limits(recipe)
    checks = check_recovery(scores(baseline), scores(quantized), spec.tasks, limits["min_recovery"], spec.min_scores)
    paired = paired_checks(baseline, quantized, spec.tasks, limits["min_recovery"], spec.min_questions)
    token = token_gate(recipe, fid, limits)
    verdict = gate(paired, checks, token)
    report = {
        "gate": verdict,
        "min_recovery": limits["min_recovery"],
        "min_scores": spec.min_scores,
        "paired": paired,
        "token": token.model_dump() if token else None,
        "checks": [c.model_dump() for c in checks],
        "fidelity": fid,
        "data": data,
        "settings": spec.model_dump(mode="json"),
        "baseline": baseline,
        "quantized": quantized,
    }
    write_json_atomic(ctx.reports_dir / "eval.json", report)
    print_table(checks, paired, fid, token, verdict)
    return {
        "gate": verdict,
        "paired": {p["task"]: [round(p["ci_low"], 4), round(p["ci_high"], 4), p["questions"]] for p in paired},
        "path": "reports/eval.json",
        "recovery": {f"{c.task}/{c.metric}": round(c.recovery, 4) for c in checks},
        "kl_mean": fid["kl_mean"],
        "top1_agreement": fid["top1_agreement"],
        "token_gate": token.verdict if token else "off",
        "baseline_wall_s": baseline["wall_s"],
        "baseline_cached": baseline["cached"],
        "quantized_wall_s": quantized["wall_s"],
        "fidelity_wall_s": fid["wall_s"],
    }
