"""Recovery (quantized / baseline per metric) and the quality gate; pure functions over eval summaries."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

GATE_METRICS = ("acc", "acc_norm", "exact_match")


class MetricCheck(BaseModel):
    """One metric of one task: baseline vs quantized and whether it passes."""

    task: str
    metric: str
    baseline: float
    quantized: float
    baseline_stderr: float | None = None
    quantized_stderr: float | None = None
    recovery: float
    min_recovery: float
    floor: float | None = None
    passed: bool


def recovery_ratio(baseline: float, quantized: float) -> float:
    """quantized / baseline; a zero baseline counts as fully recovered when quantized is not below it."""
    if baseline <= 0:
        return 1.0 if quantized >= baseline else 0.0
    return quantized / baseline


def gated_metrics(scores: dict[str, dict[str, Any]], gate_tasks: list[str]) -> list[tuple[str, str]]:
    """(task, metric) pairs the gate looks at: the requested tasks/groups' accuracy-like metrics."""
    pairs = []
    for task in gate_tasks:
        for metric in GATE_METRICS:
            if metric in scores.get(task, {}):
                pairs.append((task, metric))
    return pairs


def check_recovery(
    baseline: dict[str, dict[str, Any]],
    quantized: dict[str, dict[str, Any]],
    gate_tasks: list[str],
    min_recovery: float,
    floors: dict[str, float],
) -> list[MetricCheck]:
    """Compare every gated metric; `floors` maps "task/metric" or "metric" to an absolute minimum."""
    checks = []
    for task, metric in gated_metrics(baseline, gate_tasks):
        if metric not in quantized.get(task, {}):
            continue
        base, quant = float(baseline[task][metric]), float(quantized[task][metric])
        ratio = recovery_ratio(base, quant)
        floor = floors.get(f"{task}/{metric}", floors.get(metric))
        checks.append(
            MetricCheck(
                task=task,
                metric=metric,
                baseline=base,
                quantized=quant,
                baseline_stderr=baseline[task].get(f"{metric}_stderr"),
                quantized_stderr=quantized[task].get(f"{metric}_stderr"),
                recovery=ratio,
                min_recovery=min_recovery,
                floor=floor,
                passed=ratio >= min_recovery and (floor is None or quant >= floor),
            )
        )
    return checks


def gate_verdict(checks: list[MetricCheck]) -> str:
    """ "passed" when every check passes (and there is at least one), else "failed"."""
    return "passed" if checks and all(c.passed for c in checks) else "failed"


def scores(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**summary["tasks"], **summary["groups"]}
