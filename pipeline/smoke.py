"""Smoke stage: load the exported artifact in vLLM (own environment, subprocess) and generate.

vLLM pins its own torch and compressed-tensors, so it runs from `.venv-vllm` through
`pipeline/vllm_worker.py`, one JSON request in and one JSON result out, bounded by a timeout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.child import run_json_child
from pipeline.errors import PipelineError, StageFailed
from pipeline.formats import SCHEMES, backend_info
from pipeline.manifest import fingerprint
from pipeline.recipe import PROJECT_ROOT, Recipe, SmokeSpec
from pipeline.run_context import RunContext

WORKER = Path(__file__).with_name("vllm_worker.py")


def vllm_env_path() -> Path:
    """`$QPIPE_VLLM_ENV`, else `.venv-vllm` at the project root."""
    return Path(os.environ.get("QPIPE_VLLM_ENV") or PROJECT_ROOT / ".venv-vllm")


def vllm_python(spec: SmokeSpec) -> Path:
    from pipeline.vllm_env import VllmEnvError, ensure_vllm_env

    try:
        return ensure_vllm_env(vllm_env_path(), spec.vllm)
    except VllmEnvError as exc:
        raise PipelineError(f"smoke.vllm: cannot set up the vLLM environment ({exc}); see `make vllm-env`") from None


def has_chat_template(model_dir: Path) -> bool:
    """Whether the checkpoint's tokenizer ships a chat template."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def gpu_memory_utilization() -> float | None:
    """vLLM's `gpu_memory_utilization` for a child on this process's GPU, after freeing what this process cached.

    vLLM refuses to start when less than that share of the GPU is free; this process keeps its CUDA context (and
    whatever a stage still holds), so the child asks for the free share less a margin, at most vLLM's default 0.9.
    None without a CUDA GPU."""
    from pipeline.resources import free_gpu_fraction, release_accelerator_memory

    release_accelerator_memory()
    free = free_gpu_fraction()
    return None if free is None else round(min(0.9, free - 0.03), 3)


def run_worker(python: Path, model_dir: Path, spec: SmokeSpec, log_file: Path) -> dict[str, Any]:
    """Run the worker on `model_dir`; a crash or timeout becomes a one-line StageFailed (log kept)."""
    request = {
        "gpu_memory_utilization": gpu_memory_utilization(),
        "model": str(model_dir),
        "prompts": spec.prompts,
        "max_tokens": spec.max_tokens,
        "chat_template": has_chat_template(model_dir) if spec.chat_template is None else spec.chat_template,
        "kv_cache_gib": spec.kv_cache_gib,
        "max_model_len": spec.max_model_len,
        "tensor_parallel_size": spec.tensor_parallel_size,
    }
    _, result = run_json_child(
        [str(python), str(WORKER)], request, log_file, spec.timeout_s, f"smoke: vLLM on {model_dir}", "smoke.timeout_s"
    )
    if result is None:
        raise StageFailed(f"smoke: the vLLM worker died without a result on {model_dir}; log: {log_file}")
    return result


def baseline_result(python: Path, ctx: RunContext, spec: SmokeSpec) -> dict[str, Any]:
    """The unquantized model through vLLM, cached by model (identity, revision, content) and smoke settings."""
    from pipeline.evaluate import cache_root

    settings = spec.model_dump(exclude={"compare_baseline"})
    key = fingerprint("smoke-baseline/v2", ctx.source.identity, ctx.source.revision, ctx.model_fingerprint, settings)
    path = cache_root() / "smoke-baselines" / f"{key[:24]}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    result = run_worker(python, ctx.source.path, spec, ctx.logs_dir / "smoke-baseline.log")
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


def run_smoke(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Load quantized (and baseline) in vLLM, check method and outputs, write reports/smoke.json."""
    spec = recipe.smoke
    if not spec.enabled:
        return {"_status": "disabled", "_note": "smoke.enabled is false"}
    python = vllm_python(spec)
    quant = run_worker(python, ctx.model_dir, spec, ctx.logs_dir / "smoke-quantized.log")
    report: dict[str, Any] = {"status": quant["status"], "runs": {"quantized": quant}}
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
        from pipeline.serve_check import serve_check

        summary["serve"] = serve_check(python, ctx.model_dir, spec, ctx.logs_dir / "smoke-serve.log")
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
