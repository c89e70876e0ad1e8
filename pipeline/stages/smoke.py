"""Smoke stage: load the exported artifact in vLLM (own environment, subprocess) and generate.

vLLM pins its own torch and compressed-tensors, so it runs from `.venv-vllm` through
`pipeline/vllm/worker.py`, one JSON request in and one JSON result out, bounded by a timeout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, StageFailed
from pipeline.formats import SCHEMES, backend_info
from pipeline.paths import default_cache_root
from pipeline.recipe.schema import Recipe, SmokeSpec
from pipeline.run.context import RunContext
from pipeline.run.files import write_json_atomic
from pipeline.run.manifest import fingerprint
from pipeline.vllm.environment import installed_versions, vllm_env_path, vllm_python
from pipeline.vllm.launch import gpu_memory_utilization, run_worker
from pipeline.vllm.preflight import Target, Verdict, detected_gpu, preflight


def baseline_result(python: Path, ctx: RunContext, spec: SmokeSpec) -> dict[str, Any]:
    """The unquantized model through vLLM, cached by model (identity, revision, content) and smoke settings."""
    settings = spec.model_dump(exclude={"compare_baseline"})
    key = fingerprint("smoke-baseline/v2", ctx.source.identity, ctx.source.revision, ctx.model_fingerprint, settings)
    path = default_cache_root() / "smoke-baselines" / f"{key[:24]}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    trust = ctx.recipe.model.trust_remote_code
    result = run_worker(python, ctx.source.path, spec, ctx.logs_dir / "smoke-baseline.log", trust)
    if result.get("status") == "ok":
        write_json_atomic(path, result)
    return {**result, "cached": False}


def token_agreement(quant: dict[str, Any], base: dict[str, Any], k: int) -> float:
    """Share of the first `k` greedy tokens (per prompt) equal between quantized and baseline."""
    same = total = 0
    for q, b in zip(quant["generations"], base["generations"], strict=True):
        for qt, bt in zip(q["token_ids"][:k], b["token_ids"][:k], strict=False):
            same += qt == bt
            total += 1
    return same / total if total else 0.0


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Expected:
    """What vLLM must report for an artifact: one of `methods`, and for compressed-tensors a layer scheme
    whose class name contains `scheme` (e.g. WNA16)."""

    methods: frozenset[str]
    scheme: str | None


def expected_for(recipe: Recipe) -> Expected:
    fmt = backend_info(recipe.quantize.backend).output_format(recipe.quantize.method)
    scheme = None if fmt.native else SCHEMES[recipe.quantize.scheme].vllm_scheme
    return Expected(fmt.vllm_methods, scheme)


def method_problems(result: dict[str, Any], expected: Expected | None) -> list[str]:
    """Wrong or no quantization method, or no layer with the expected scheme (None: any quantization)."""
    quant = result.get("quantization") or {}
    method = quant.get("method")
    if expected is None:
        return [] if method else ["vLLM loaded it unquantized (no quantization method detected)"]
    if method not in expected.methods:
        return [f"vLLM loaded it as {method!r}, not {' / '.join(sorted(expected.methods))}"]
    schemes = quant.get("layer_schemes", {})
    if expected.scheme is not None and not any(expected.scheme in n for n in schemes):
        return [f"no layer uses a {expected.scheme} scheme (got {sorted(schemes)})"]
    return []


def check_result(result: dict[str, Any], expected: Expected | None) -> list[str]:
    """Problems with a loaded quantized model: wrong or no method, unquantized layers, empty or NaN output."""
    problems = method_problems(result, expected)
    if any(not g["text"].strip() and not g["token_ids"] for g in result.get("generations", [])):
        problems.append("a prompt produced no output")
    if result.get("nonfinite_logprobs"):
        problems.append("NaN/inf logprobs in the output")
    return problems


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def figures(result: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    timings = result.get("timings", {})
    return {
        "load_s": timings.get("load_s"),
        "ttft_s": timings.get("ttft_s"),
        "tokens_per_s": (result.get("throughput") or {}).get("tokens_per_s"),
        "peak_rss_mb": round(result.get("peak_rss_bytes", 0) / 2**20, 1),
        "size_bytes": dir_size(model_dir),
    }


def unsupported(recipe: Recipe, ctx: RunContext, report: dict[str, Any], expected: Expected) -> dict[str, Any]:
    """vLLM here has no kernel for the scheme: not passed, but when the model got as far as loading, the
    detected method must still be the expected one."""
    quant = report["runs"]["quantized"]
    loaded = quant.get("quantization") is not None
    problems = method_problems(quant, expected) if loaded else []
    report.update(vllm_method=(quant.get("quantization") or {}).get("method"), problems=problems)
    write_json_atomic(ctx.reports_dir / "smoke.json", report)
    if problems:
        raise StageFailed(f"smoke: {'; '.join(problems)} (reports/smoke.json)")
    ctx.log.warning("smoke: vLLM cannot run %s on this platform: %s", recipe.quantize.scheme, quant["error"])
    outputs = {"path": "reports/smoke.json", "vllm_method": report["vllm_method"]}
    return {"_status": "unsupported", "_note": quant["error"], **outputs}


def gpu_preflight(model_dir: Path, spec: SmokeSpec) -> list[Verdict]:
    """`qpipe preflight`'s rules for the smoke settings on this machine's GPU ([] without one: the rules are
    about GPUs), with the share of it the vLLM child will be given and the installed vLLM's versions."""
    utilization = gpu_memory_utilization()
    gpu = detected_gpu()
    if utilization is None or gpu is None:
        return []
    target = Target(gpu, spec.max_model_len, utilization, None, spec.tensor_parallel_size, spec.kv_cache_bytes)
    return preflight(model_dir, target, installed_versions(vllm_env_path()))


def preflight_failed(ctx: RunContext, verdicts: list[Verdict]) -> dict[str, Any]:
    """A preflight rule says vLLM cannot serve the artifact on this GPU: a platform limit, reported without
    starting vLLM."""
    failed = [v.line() for v in verdicts if v.status == "fail"]
    report = {"status": "unsupported-on-this-platform", "preflight": [v.line() for v in verdicts], "problems": []}
    write_json_atomic(ctx.reports_dir / "smoke.json", report)
    ctx.log.warning("smoke: preflight: %s", "; ".join(failed))
    return {"_status": "unsupported", "_note": "; ".join(failed), "path": "reports/smoke.json"}


def run_smoke(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Preflight on a GPU, then load quantized (and baseline) in vLLM, check method and outputs, write
    reports/smoke.json."""
    spec = recipe.smoke
    if not spec.enabled:
        return {"_status": "disabled", "_note": "smoke.enabled is false"}
    python = vllm_python(spec)
    checks = gpu_preflight(ctx.model_dir, spec)
    if any(v.status == "fail" for v in checks):
        return preflight_failed(ctx, checks)
    for verdict in checks:
        ctx.log.info("smoke: preflight: %s", verdict.line())
    quant = run_worker(
        python, ctx.model_dir, spec, ctx.logs_dir / "smoke-quantized.log", recipe.model.trust_remote_code
    )
    report: dict[str, Any] = {"status": quant["status"], "runs": {"quantized": quant}}
    if checks:
        report["preflight"] = [v.line() for v in checks]
    expected = expected_for(recipe)
    if quant["status"] == "unsupported-on-this-platform":
        return unsupported(recipe, ctx, report, expected)
    if quant["status"] != "ok":
        raise StageFailed(f"smoke: vLLM failed on the artifact: {quant.get('error')}; log: {ctx.logs_dir}")
    problems = check_result(quant, expected)
    ours = figures(quant, ctx.model_dir)
    summary: dict[str, Any] = {"vllm_method": quant["quantization"]["method"], "quantized": ours}
    if spec.compare_baseline:
        base = baseline_result(python, ctx, spec)
        report["runs"]["baseline"] = base
        if base.get("status") == "ok":
            theirs = figures(base, ctx.source.path)
            summary["baseline"] = theirs
            summary["ratios"] = {k: _ratio(ours[k], theirs[k]) for k in ours}
            summary["token_agreement"] = round(token_agreement(quant, base, spec.agreement_tokens), 4)
    if spec.serve_check:
        from pipeline.vllm.serve_check import serve_check

        log_file = ctx.logs_dir / "smoke-serve.log"
        summary["serve"] = serve_check(python, ctx.model_dir, spec, log_file, recipe.model.trust_remote_code)
        if summary["serve"]["status"] != "passed":
            problems.append(f"vllm serve: {summary['serve']['error']}")
    report.update(summary, problems=problems, status="passed" if not problems else "failed")
    write_json_atomic(ctx.reports_dir / "smoke.json", report)
    if problems:
        raise StageFailed(f"smoke: {'; '.join(problems)} (reports/smoke.json)")
    ctx.log.info(
        "smoke: vLLM loaded %s in %.1f s, %.1f tok/s, token agreement %s",
        summary["vllm_method"],
        ours["load_s"],
        ours["tokens_per_s"] or 0,
        summary.get("token_agreement"),
    )
    return {"path": "reports/smoke.json", **summary}


def smoke_directory(model_dir: Path, spec: SmokeSpec, log_file: Path) -> dict[str, Any]:
    """`qpipe smoke DIR`: load any exported directory in vLLM (no baseline), check it is quantized and generates."""
    if not (model_dir / "config.json").is_file():
        raise PipelineError(f"{model_dir}: no config.json; pass an exported model directory (artifact's model/)")
    result = run_worker(vllm_python(spec), model_dir, spec, log_file)
    if result["status"] != "ok":
        return {"status": result["status"], "error": result.get("error"), "runs": {"quantized": result}}
    problems = check_result(result, None)
    return {
        "status": "passed" if not problems else "failed",
        "problems": problems,
        "vllm_method": result["quantization"]["method"],
        "layer_schemes": result["quantization"]["layer_schemes"],
        "quantized": figures(result, model_dir),
        "runs": {"quantized": result},
    }
