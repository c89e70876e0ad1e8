"""`qpipe bench serve`: checkpoints in vLLM on a GPU, base and quantized in one run, each in its own process.

Per model: load time, weight memory, KV-cache capacity, batch-1 time to first token and decode speed next to
the HBM-bandwidth bound, output throughput over a concurrency sweep, and the linear kernels vLLM chose. With
`alternatives`, every quantized model runs again once per chosen kernel with that kernel switched off
(`VLLM_DISABLED_KERNELS`), which shows the kernel vLLM falls back to and what it costs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.artifact.card import SERVING_REPORT, serving_table
from pipeline.errors import PipelineError, StageFailed
from pipeline.run.context import LOGGER_NAME
from pipeline.run.files import write_json_atomic, write_text_atomic
from pipeline.run.manifest import Manifest
from pipeline.run.model_source import kv_bytes_per_token, text_config
from pipeline.vllm.launch import WORKER, gpu_memory_utilization

log = logging.getLogger(LOGGER_NAME)
# HBM bandwidth in bytes/s from the vendors' datasheets, by a part of the CUDA device name (longest match wins).
GPU_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
}
KERNEL = re.compile(r"\[([^\]]+)\]")  # "CompressedTensorsWNA16[MacheteLinearKernel]" -> the kernel names


@dataclass(frozen=True)
class ServeSettings:
    """The workload every model is measured with."""

    prompt_tokens: int = 512
    output_tokens: int = 256
    concurrency: tuple[int, ...] = (1, 8, 64, 512)
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    timeout_s: int = 1200
    seed: int = 0


@dataclass
class Target:
    """One model to measure: a label, its folder, the run directory it came from (if any), disabled kernels."""

    label: str
    model_dir: Path
    run_dir: Path | None = None
    disabled: tuple[str, ...] = ()


def targets(paths: list[Path], base: Path | None, with_base: bool = True) -> list[Target]:
    """The base model first (given, or the source checkpoint of the run directories), then each argument."""
    found: list[Target] = []
    for path in paths:
        run_dir = path if (path / "manifest.json").is_file() and (path / "model").is_dir() else None
        model_dir = path / "model" if run_dir else path
        if not (model_dir / "config.json").is_file():
            raise PipelineError(f"{path}: not a model folder or run directory (no config.json); pass an exported model")
        found.append(Target(run_dir.name if run_dir else path.name, model_dir, run_dir))
    if not with_base:
        return found
    if base is None:
        sources = {source_checkpoint(t.run_dir) for t in found if t.run_dir} - {None}
        base = sources.pop() if len(sources) == 1 else None
    if base is None:
        return found
    return [Target("base", base), *found]


def source_checkpoint(run_dir: Path) -> Path | None:
    """The local checkpoint a run directory was quantized from, when it is still on disk."""
    manifest = Manifest.load(run_dir / "manifest.json")
    path = manifest.model.get("path") if manifest else None
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def worker_request(target: Target, settings: ServeSettings) -> dict[str, Any]:
    return {
        "model": str(target.model_dir),
        "gpu_memory_utilization": gpu_memory_utilization(),
        "kv_cache_gib": None,  # what gpu_memory_utilization leaves, as `vllm serve` sizes it
        "max_model_len": settings.max_model_len,
        "enforce_eager": False,  # CUDA graphs, as served
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": settings.seed,
        "serving": {
            "prompt_tokens": settings.prompt_tokens,
            "output_tokens": settings.output_tokens,
            "concurrency": list(settings.concurrency),
        },
    }


def measure(python: Path, target: Target, settings: ServeSettings, log_dir: Path) -> dict[str, Any]:
    """One model in a fresh vLLM process; a failure is recorded in the result, not raised."""
    from pipeline.run.processes import run_json_child

    env = {**os.environ, "VLLM_DISABLED_KERNELS": ",".join(target.disabled)} if target.disabled else None
    name = target.label + "".join(f"-no-{k}" for k in target.disabled)
    log_file = log_dir / f"serve-{name}.log"
    what = f"bench serve: vLLM on {target.model_dir}"
    log.info("%s%s", what, f" with {', '.join(target.disabled)} disabled" if target.disabled else "")
    try:
        _, result = run_json_child(
            [str(python), str(WORKER)],
            worker_request(target, settings),
            log_file,
            settings.timeout_s,
            what,
            "--timeout",
            env,
        )
    except StageFailed as exc:
        result = {"status": "error", "error": str(exc)}
    result = result or {"status": "error", "error": f"the vLLM worker wrote no result; log: {log_file}"}
    return {
        "label": target.label,
        "model": str(target.model_dir),
        "disabled_kernels": list(target.disabled),
        "log": str(log_file),
        **summarize(result, target.model_dir, settings),
    }


def kernels(result: dict[str, Any]) -> list[str]:
    """The linear kernels vLLM chose, from the worker's layer-scheme counts."""
    schemes = (result.get("quantization") or {}).get("layer_schemes") or {}
    return sorted({k for name in schemes for match in KERNEL.findall(name) for k in match.split(",")})


def bandwidth(device: str | None) -> float | None:
    matches = [key for key in GPU_BANDWIDTH if device and key in device]
    return GPU_BANDWIDTH[max(matches, key=len)] if matches else None


def decode_bound(result: dict[str, Any], model_dir: Path, settings: ServeSettings) -> dict[str, Any] | None:
    """Batch-1 decode cannot beat HBM bandwidth / bytes read per token: every weight but the input embedding
    (one row of it is read), plus the KV cache at the mean context of the measured request."""
    memory = result.get("memory") or {}
    rate = bandwidth(memory.get("device"))
    if rate is None or "weights_bytes" not in memory:
        return None
    context = settings.prompt_tokens + settings.output_tokens / 2
    kv_per_token = kv_bytes_per_token(text_config(model_dir / "config.json"))
    read = memory["weights_bytes"] - memory["embedding_bytes"] + context * kv_per_token
    return {"bandwidth_bytes_per_s": rate, "bytes_per_token": int(read), "tokens_per_s": round(rate / read, 1)}


def summarize(result: dict[str, Any], model_dir: Path, settings: ServeSettings) -> dict[str, Any]:
    """The figures of one worker result, in the report's shape."""
    if result.get("status") != "ok":
        return {"status": result.get("status", "error"), "error": result.get("error")}
    memory, engine = result.get("memory") or {}, result.get("engine_log") or {}
    bound = decode_bound(result, model_dir, settings)
    decode = result["batch1"]["decode_tokens_per_s"]
    return {
        "status": "ok",
        "device": memory.get("device"),
        "versions": result.get("versions"),
        "method": (result.get("quantization") or {}).get("method"),
        "kernels": kernels(result),
        "layer_schemes": (result.get("quantization") or {}).get("layer_schemes"),
        "load_s": result["timings"]["load_s"],
        "weights_gib": round(memory.get("weights_bytes", 0) / 2**30, 2),
        "kv_cache_tokens": engine.get("kv_cache_tokens"),
        "max_concurrency": engine.get("max_concurrency"),
        "ttft_s": result["batch1"]["ttft_s"],
        "decode_tokens_per_s": decode,
        "decode_bound": bound,
        "decode_of_bound": round(decode / bound["tokens_per_s"], 3) if bound and decode else None,
        "sweep": result["sweep"],
    }


def alternatives(target: Target, measured: dict[str, Any]) -> list[Target]:
    """One re-run per kernel the quantized model used, with that kernel switched off."""
    return [Target(target.label, target.model_dir, target.run_dir, (k,)) for k in measured.get("kernels", [])]


def run_serve_bench(
    paths: list[Path],
    out_dir: Path,
    settings: ServeSettings,
    base: Path | None = None,
    alternative: bool = False,
    with_base: bool = True,
) -> dict[str, Any]:
    """Measure every model, write OUT/serving.json and serving.md, and each run directory's reports/serving.json
    (its model card then shows the figures)."""
    import torch

    from pipeline.recipe.schema import SmokeSpec
    from pipeline.vllm.environment import vllm_python

    if not torch.cuda.is_available():
        raise PipelineError(
            "bench serve: needs a CUDA GPU (CPU figures say nothing about GPU serving); on this machine the smoke "
            "stage reports load time and tokens/s in reports/smoke.json"
        )
    todo = targets(paths, base, with_base)
    python = vllm_python(SmokeSpec())
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for target in todo:
        measured = measure(python, target, settings, out_dir)
        runs.append(measured)
        if alternative and target.label != "base":
            runs.extend(measure(python, alt, settings, out_dir) for alt in alternatives(target, measured))
    report = {"settings": asdict(settings), "runs": runs}
    write_json_atomic(out_dir / "serving.json", report)
    write_text_atomic(out_dir / "serving.md", serving_table(report))
    for target in todo:
        if target.run_dir is not None:
            attach_to_artifact(target.run_dir, report, target.label)
    return report


def attach_to_artifact(run_dir: Path, report: dict[str, Any], label: str) -> None:
    """The runs of this model (and of the base) as the run directory's reports/serving.json; its card follows."""
    from pipeline.artifact.card import refresh_card

    mine = [r for r in report["runs"] if r["label"] in (label, "base")]
    write_json_atomic(run_dir / SERVING_REPORT, {**report, "runs": mine})
    refresh_card(run_dir)
