"""Run lm-eval as a library and reduce its results to a compact, JSON-serialisable summary."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.run.hub import hub_unreachable

HUB_DATASET = "cais/mmlu"
METRICS = ("acc", "acc_norm", "exact_match")
LOCAL_HINT = "set eval.mmlu_dir to a local Hendrycks-layout MMLU copy (test/ and dev/ CSVs)"


class EvalDataUnavailable(PipelineError):
    """The eval data set is neither reachable on the Hugging Face hub nor given locally."""


def run_lm_eval(
    model_path: str,
    tasks: list[str],
    num_fewshot: int,
    limit: int | None,
    batch_size: int | str,
    device: str,
    include_path: Path | None,
    dtype: str = "auto",
    backend: str = "hf",
    tensor_parallel_size: int = 1,
    engine_args: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model_path`` on ``tasks`` with lm-eval and return :func:`summarize` of the results.

    Tasks found in ``include_path`` load from there only (no scan of lm-eval's ~14k stock YAMLs); any
    other task needs the hub, which is probed first so an offline machine fails fast.
    """
    from lm_eval import simple_evaluate

    task_manager = _task_manager(tasks, include_path)
    try:
        results = simple_evaluate(
            model=backend,
            model_args=model_args(model_path, dtype, tensor_parallel_size, backend, engine_args, trust_remote_code),
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=task_manager,
            log_samples=True,  # per-question results: the gate pairs them across the two models
        )
    except ConnectionError as err:  # datasets' error for a hub data set that is offline and not cached
        raise EvalDataUnavailable(f"{str(err).splitlines()[0]}; {LOCAL_HINT}") from err
    return summarize(results)


def model_args(
    model_path: str,
    dtype: str,
    tensor_parallel_size: int,
    backend: str = "hf",
    engine_args: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """lm-eval's model arguments. vllm: ``tensor_parallel_size`` plus ``engine_args`` for ``vllm.LLM``.
    hf: more than one GPU becomes ``parallelize=True``: accelerate's ``device_map="auto"`` splits the layers
    over all visible GPUs (HFLM has no tensor parallelism in-process; its ``tp_plan`` needs a torchrun
    launch). Restrict the GPUs with CUDA_VISIBLE_DEVICES."""
    args: dict[str, Any] = {"pretrained": model_path, "dtype": dtype}
    if trust_remote_code:
        args["trust_remote_code"] = True
    if backend == "vllm":
        return {**args, "tensor_parallel_size": tensor_parallel_size, **(engine_args or {})}
    if tensor_parallel_size > 1:
        args["parallelize"] = True
    return args


def _task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """A TaskManager over ``include_path`` alone when it defines every task, else over the stock tasks too.

    Needing the stock tasks means loading data from the hub, so its reachability is checked first.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    require_hub()
    return TaskManager(include_path=str(include_path) if include_path else None)


def require_hub() -> None:
    """Fail fast with a one-line hint when the hub cannot be reached (before lm-eval retries for minutes).

    In offline mode nothing is probed: ``datasets`` then fails at once unless the data set is cached.
    """
    reason = hub_unreachable(HUB_DATASET, "dataset")
    if reason is not None:
        raise EvalDataUnavailable(f"Hugging Face hub unreachable ({reason}); {LOCAL_HINT}")


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Compact summary: metrics per task and group, sample counts, lm-eval version and a config hash."""
    groups = set(results.get("groups", {}))
    n_samples = results.get("n-samples", {})
    tasks, group_rows = {}, {}
    for name, row in results["results"].items():
        entry = {"alias": row.get("alias", name), **_metrics(row)}
        if name in groups:
            entry["n_samples"] = row.get("sample_len")
            group_rows[name] = entry
        else:
            entry["n_samples"] = n_samples.get(name, {}).get("effective", row.get("sample_len"))
            tasks[name] = entry
    return {
        "lm_eval_version": results.get("lm_eval_version"),
        "tasks": tasks,
        "groups": group_rows,
        "group_subtasks": results.get("group_subtasks", {}),
        "n_shot": results.get("n-shot", {}),
        "n_samples": n_samples,
        "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
        "config_hash": config_hash(results.get("configs", {})),
        "questions": per_question(results),
    }


def per_question(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task, each question's score (doc_id -> its first accuracy-like metric) from lm-eval's logged samples."""
    out: dict[str, dict[str, float]] = {}
    for task, samples in (results.get("samples") or {}).items():
        rows: dict[str, float] = {}
        for sample in samples:
            metric = next((m for m in METRICS if m in sample), None)
            if metric is not None:
                rows.setdefault(str(sample["doc_id"]), float(sample[metric]))
        out[task] = rows
    return out


def _metrics(row: dict[str, Any]) -> dict[str, float | None]:
    """Accuracy-like metrics and their stderr from lm-eval's ``"metric,filter"`` keys.

    The filter is dropped when it is ``none`` (``acc,none`` -> ``acc``) and kept otherwise.
    """
    out = {}
    for key, value in row.items():
        metric, _, filt = key.partition(",")
        if metric.removesuffix("_stderr") in METRICS and filt:
            out[metric if filt == "none" else f"{metric},{filt}"] = _number(value)
    return out


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A" and NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def config_hash(configs: dict[str, Any]) -> str:
    """Hash of the task configs, ignoring where they were read from (local paths differ per machine)."""
    portable = {name: _portable(cfg) for name, cfg in configs.items()}
    return hashlib.sha256(json.dumps(portable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _portable(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop ``metadata.config_source`` and replace a local ``dataset_path`` by a marker."""
    cfg = dict(cfg)
    cfg["metadata"] = {k: v for k, v in (cfg.get("metadata") or {}).items() if k != "config_source"}
    if Path(str(cfg.get("dataset_path", ""))).is_absolute():
        cfg["dataset_path"] = "<local>"
    return cfg


def main(argv: list[str]) -> int:
    """``python -m pipeline.eval.lm_eval_runner REQUEST RESULT``: run_lm_eval(**request) in another environment
    (the vLLM one, for ``eval.backend: vllm``); the summary, or ``{"error": ...}``, is written to RESULT."""
    request = json.loads(Path(argv[0]).read_text())
    request["include_path"] = Path(request["include_path"]) if request.get("include_path") else None
    try:
        outcome = run_lm_eval(**request)
    except Exception as exc:  # reported to the parent as one line; the traceback stays in the log
        import traceback

        traceback.print_exc()
        outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        if isinstance(exc, ModuleNotFoundError):  # the parent says which environment lacks which package
            outcome["missing"] = exc.name
    Path(argv[1]).write_text(json.dumps(outcome))
    return 1 if "error" in outcome else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
