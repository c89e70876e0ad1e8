"""The paired verdict on constructed per-question results: pass, fail, inconclusive, and its arithmetic."""

from __future__ import annotations

import pytest

from pipeline.eval.gate import combine, gate, paired_recovery, token_check


def _pairs(both: int, base_only: int, quant_only: int, neither: int) -> tuple[list[int], list[int]]:
    """Per-question correctness lists with the given counts in each paired cell."""
    base = [1] * both + [1] * base_only + [0] * quant_only + [0] * neither
    quant = [1] * both + [0] * base_only + [1] * quant_only + [0] * neither
    return base, quant


def test_identical_answers_on_many_questions_pass() -> None:
    base, quant = _pairs(700, 0, 0, 300)
    result = paired_recovery(base, quant, min_recovery=0.97, min_questions=100)
    assert result.verdict == "passed"
    assert result.recovery == result.ci_low == result.ci_high == 1.0
    assert (result.gained, result.lost, result.questions) == (0, 0, 1000)


def test_a_clear_loss_fails() -> None:
    base, quant = _pairs(500, 200, 0, 300)  # 70 % -> 50 %: recovery 0.714
    result = paired_recovery(base, quant, min_recovery=0.97, min_questions=100)
    assert result.verdict == "failed"
    assert result.recovery == pytest.approx(500 / 700)
    assert result.ci_high < 0.97 and result.lost == 200


def test_an_interval_across_the_threshold_is_inconclusive() -> None:
    base, quant = _pairs(140, 20, 15, 25)  # 80 % -> 77.5 %: recovery 0.969, n = 200
    result = paired_recovery(base, quant, min_recovery=0.97, min_questions=100)
    assert result.verdict == "inconclusive"
    assert result.ci_low < 0.97 <= result.ci_high
    assert "straddles" in result.reason


def test_few_questions_are_inconclusive_even_when_identical() -> None:
    base, quant = _pairs(5, 0, 0, 10)  # the 15-question fixture: one flip moves recovery by 20 points
    result = paired_recovery(base, quant, min_recovery=0.97, min_questions=100)
    assert result.verdict == "inconclusive" and "n = 15" in result.reason


def test_pairing_narrows_the_interval() -> None:
    """Same accuracies, but flips that cancel question by question widen the interval: pairing is what counts."""
    stable = paired_recovery(*_pairs(600, 0, 0, 400), min_recovery=0.9, min_questions=1)
    churn = paired_recovery(*_pairs(450, 150, 150, 250), min_recovery=0.9, min_questions=1)
    assert stable.recovery == churn.recovery == 1.0
    assert churn.ci_high - churn.ci_low > stable.ci_high - stable.ci_low


def test_interval_is_reproducible() -> None:
    args = (*_pairs(300, 40, 30, 130), 0.97, 50)
    assert paired_recovery(*args) == paired_recovery(*args)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_recovery([1, 0], [1], 0.97, 1)


def test_combined_gate() -> None:
    assert combine(["passed", "passed"]) == "passed"
    assert combine(["passed", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "failed"]) == "failed"
    assert combine([]) == "failed"


def _texts(n: int, kl_per_token: float, agreement: float, tokens: int = 100, spread: float = 0.0) -> tuple:
    """Per-text sums for `n` texts of `tokens` tokens; `spread` alternates texts above and below the mean."""
    kl = [tokens * kl_per_token * (1 + spread * (-1) ** i) for i in range(n)]
    agree = [round(tokens * agreement)] * n
    return kl, agree, [tokens] * n


def test_token_gate_passes_a_close_model() -> None:
    check = token_check(*_texts(32, 0.01, 0.97, spread=0.2), max_kl=0.05, min_top1=0.9)
    assert check.verdict == "passed"
    assert check.kl_mean == pytest.approx(0.01) and check.top1 == pytest.approx(0.97)
    assert check.kl_low <= check.kl_mean <= check.kl_high < 0.05
    assert (check.texts, check.tokens) == (32, 3200)


def test_token_gate_fails_on_kl_or_on_agreement() -> None:
    assert token_check(*_texts(32, 0.2, 0.97), max_kl=0.05, min_top1=0.9).verdict == "failed"
    assert token_check(*_texts(32, 0.01, 0.7), max_kl=0.05, min_top1=0.9).verdict == "failed"


def test_token_gate_is_inconclusive_when_few_texts_straddle_the_limit() -> None:
    """Two texts, one far above the limit and one far below: the mean passes, the interval cannot decide."""
    check = token_check([1.0, 9.0], [95, 95], [100, 100], max_kl=0.06, min_top1=0.9)
    assert check.kl_mean == pytest.approx(0.05)
    assert check.verdict == "inconclusive" and check.kl_low < 0.06 < check.kl_high


def test_token_gate_resamples_texts_not_tokens() -> None:
    """The same tokens in fewer, longer texts give a wider interval: texts are the independent unit."""
    many = token_check(*_texts(64, 0.02, 0.95, tokens=50, spread=0.5), max_kl=0.05, min_top1=0.9)
    few = token_check(*_texts(8, 0.02, 0.95, tokens=400, spread=0.5), max_kl=0.05, min_top1=0.9)
    assert many.tokens == few.tokens
    assert few.kl_high - few.kl_low > many.kl_high - many.kl_low


def test_token_gate_refuses_mismatched_figures() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        token_check([0.1, 0.2], [1], [10, 10], max_kl=0.05, min_top1=0.9)


def test_gate_combines_tasks_and_tokens() -> None:
    passed = [{"verdict": "passed"}]
    close = token_check(*_texts(32, 0.01, 0.97), max_kl=0.05, min_top1=0.9)
    far = token_check(*_texts(32, 0.2, 0.97), max_kl=0.05, min_top1=0.9)
    assert gate(passed, [], close) == "passed"
    assert gate(passed, [], far) == "failed"
    assert gate([{"verdict": "inconclusive"}], [], close) == "inconclusive"
    assert gate(passed, []) == "passed"  # eval.token_gate off
