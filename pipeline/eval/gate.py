"""Recovery (quantized / baseline per metric) and the quality gate; pure functions over eval summaries.

The verdict comes from paired per-question results: both models answer the same questions, so the question is
the unit and each falls in one of four cells (right/wrong for base x right/wrong for quantized). Resampling
questions with replacement is then a multinomial draw over the four cell counts, so a paired bootstrap of the
recovery costs O(resamples) and uses integer counts only: the interval is the same on every CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
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


Verdict = Literal["passed", "failed", "inconclusive"]
RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0


class PairedRecovery(BaseModel):
    """Recovery with its paired-bootstrap interval, the flips each way, and the verdict against `min_recovery`."""

    questions: int
    baseline: float
    quantized: float
    recovery: float
    ci_low: float
    ci_high: float
    confidence: float
    gained: int  # wrong for the base model, right for the quantized one
    lost: int  # right for the base model, wrong for the quantized one
    min_recovery: float
    min_questions: int
    verdict: Verdict
    reason: str


def _ratio(quantized: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """quantized / baseline per resample; a zero baseline counts as recovered when quantized is not below it."""
    safe = np.where(baseline > 0, baseline, 1)
    return np.where(baseline > 0, quantized / safe, (quantized >= baseline).astype(float))


def paired_recovery(
    baseline: Sequence[float],
    quantized: Sequence[float],
    min_recovery: float,
    min_questions: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> PairedRecovery:
    """Verdict from per-question correctness (1/0, same question order): `passed` when the whole interval is at or
    above `min_recovery`, `failed` when it is below, else (or with fewer than `min_questions`) `inconclusive`."""
    base = np.asarray(baseline, dtype=float) > 0.5
    quant = np.asarray(quantized, dtype=float) > 0.5
    if base.shape != quant.shape:
        raise ValueError(f"paired results differ in length: {base.size} baseline vs {quant.size} quantized")
    n = int(base.size)
    cells = np.array([(base & quant).sum(), (base & ~quant).sum(), (~base & quant).sum(), (~base & ~quant).sum()])
    if n == 0:
        raise ValueError("no paired questions to compare")
    draws = np.random.default_rng(SEED).multinomial(n, cells / n, size=resamples)
    boot = _ratio((draws[:, 0] + draws[:, 2]).astype(float), (draws[:, 0] + draws[:, 1]).astype(float))
    low, high = interval(boot, confidence)
    point = recovery_ratio(float(cells[0] + cells[1]), float(cells[0] + cells[2]))
    verdict, reason = _decide(low, high, n, min_recovery, min_questions, confidence)
    return PairedRecovery(
        questions=n,
        baseline=float(base.mean()),
        quantized=float(quant.mean()),
        recovery=point,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        gained=int(cells[2]),
        lost=int(cells[1]),
        min_recovery=min_recovery,
        min_questions=min_questions,
        verdict=verdict,
        reason=reason,
    )


def interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap resamples."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return float(low), float(high)


def interval_verdict(low: float, high: float, limit: float, at_least: bool) -> Verdict:
    """`passed` when the whole interval is on the right side of `limit` (at or above it when `at_least`, else at or
    below), `failed` when it is wholly on the wrong side, else `inconclusive`."""
    right, wrong = (low >= limit, high < limit) if at_least else (high <= limit, low > limit)
    return "passed" if right else "failed" if wrong else "inconclusive"


def _decide(
    low: float, high: float, n: int, min_recovery: float, min_questions: int, confidence: float
) -> tuple[Verdict, str]:
    shown = f"{confidence:.0%} interval {low:.1%}-{high:.1%}"
    if n < min_questions:
        return "inconclusive", f"n = {n} questions < eval.min_questions {min_questions} ({shown})"
    verdict = interval_verdict(low, high, min_recovery, at_least=True)
    side = {"passed": "at or above", "failed": "below", "inconclusive": "straddles"}[verdict]
    advice = "; evaluate more questions" if verdict == "inconclusive" else ""
    return verdict, f"{shown} {side} {min_recovery:.0%} (n = {n}){advice}"


class TokenCheck(BaseModel):
    """The token-level gate: mean KL(base || quant) and top-1 agreement on held-out text, each with a bootstrap
    interval over the texts, against the scheme's (or recipe's) `max_kl` and `min_top1`."""

    texts: int
    tokens: int
    kl_mean: float
    kl_low: float
    kl_high: float
    max_kl: float
    top1: float
    top1_low: float
    top1_high: float
    min_top1: float
    confidence: float
    verdict: Verdict
    reason: str


def token_check(
    kl: Sequence[float],
    top1: Sequence[float],
    tokens: Sequence[int],
    max_kl: float,
    min_top1: float,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> TokenCheck:
    """Verdict from per-text sums (KL, agreeing positions, positions): texts are resampled, not tokens, because a
    text's tokens share its context. `passed` when both whole intervals are on the right side of their limits,
    `failed` when either whole interval is on the wrong side, else `inconclusive`."""
    kl_sums, agree, counts = (np.asarray(v, dtype=float) for v in (kl, top1, tokens))
    if not (kl_sums.size == agree.size == counts.size) or counts.sum() <= 0:
        raise ValueError(
            f"per-text figures differ in length or hold no tokens: {kl_sums.size}, {agree.size}, {counts.size}"
        )
    picks = np.random.default_rng(SEED).integers(0, counts.size, size=(resamples, counts.size))
    kl_low, kl_high = interval(kl_sums[picks].sum(1) / counts[picks].sum(1), confidence)
    top1_low, top1_high = interval(agree[picks].sum(1) / counts[picks].sum(1), confidence)
    kl_mean, top1_mean = kl_sums.sum() / counts.sum(), agree.sum() / counts.sum()
    shown = f"KL {kl_low:.4f}-{kl_high:.4f} (max {max_kl:g}), top-1 {top1_low:.1%}-{top1_high:.1%} (min {min_top1:.0%})"
    verdict = combine(
        [
            interval_verdict(kl_low, kl_high, max_kl, at_least=False),
            interval_verdict(top1_low, top1_high, min_top1, at_least=True),
        ]
    )
    return TokenCheck(
        texts=int(counts.size),
        tokens=int(counts.sum()),
        kl_mean=float(kl_mean),
        kl_low=kl_low,
        kl_high=kl_high,
        max_kl=max_kl,
        top1=float(top1_mean),
        top1_low=top1_low,
        top1_high=top1_high,
        min_top1=min_top1,
        confidence=confidence,
        verdict=verdict,
        reason=f"{confidence:.0%} intervals: {shown}",
    )


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """The gate over several checks: failed if any failed, else inconclusive if any is, else passed (none: failed)."""
    if not verdicts or "failed" in verdicts:
        return "failed"
    return "inconclusive" if "inconclusive" in verdicts else "passed"


def scores(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**summary["tasks"], **summary["groups"]}


def leaf_tasks(summary: dict[str, Any], task: str) -> list[str]:
    """The tasks whose questions make up `task`: a group's subtasks, recursively; a plain task itself."""
    children = summary.get("group_subtasks", {}).get(task)
    if not children:
        return [task]
    return [leaf for child in children for leaf in leaf_tasks(summary, child)]


def paired_checks(
    baseline: dict[str, Any], quantized: dict[str, Any], tasks: list[str], minimum: float, min_questions: int
) -> list[dict]:
    """Per gated task: the paired recovery interval and verdict over the questions both models answered, and
    which subtasks' questions flipped each way."""
    checks = []
    for task in tasks:
        base_scores, quant_scores, flips = [], [], {}
        for leaf in leaf_tasks(quantized, task):
            base, quant = baseline.get("questions", {}).get(leaf, {}), quantized.get("questions", {}).get(leaf, {})
            common = sorted(set(base) & set(quant), key=lambda doc: (len(doc), doc))
            base_scores += [base[doc] for doc in common]
            quant_scores += [quant[doc] for doc in common]
            gained = sum(base[d] < 0.5 <= quant[d] for d in common)
            lost = sum(quant[d] < 0.5 <= base[d] for d in common)
            if gained or lost:
                flips[leaf] = {"gained": gained, "lost": lost, "questions": len(common)}
        if base_scores:
            result = paired_recovery(base_scores, quant_scores, minimum, min_questions)
            checks.append({"task": task, **result.model_dump(), "flips": flips})
    return checks


def gate(paired: list[dict], checks: list[MetricCheck], token: TokenCheck | None = None) -> str:
    """The paired verdicts of every gated task and the token-level verdict (when it runs); an absolute floor
    (`eval.min_scores`) missed fails it outright."""
    floor_missed = any(c.floor is not None and c.quantized < c.floor for c in checks)
    verdicts = [p["verdict"] for p in paired] + ([token.verdict] if token else [])
    return combine(verdicts + (["failed"] if floor_missed else []))
