"""`qpipe bench` on CPU: synthetic models, mode parsing, a tiny side-by-side run and the markdown report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.tuning import TuningPlan
from pipeline.bench.benchmark import BenchReport, overridden, parse_mode, render_report, run_bench
from pipeline.bench.synthetic_model import QWEN3_8B, build_model, scaled_shape, write_model_dir
from pipeline.cli import build_parser
from pipeline.errors import PipelineError


def test_qwen3_8b_shape() -> None:
    assert round(QWEN3_8B.parameter_count() / 1e9, 2) == 8.19
    small = scaled_shape(QWEN3_8B, layers=2, scale=1 / 32)
    assert (small.hidden_size, small.intermediate_size, small.num_layers, small.head_dim) == (128, 384, 2, 128)
    assert small.num_heads % small.num_kv_heads == 0


def test_synthetic_model_is_seeded_and_loadable_by_path(tmp_path: Path) -> None:
    shape = scaled_shape(QWEN3_8B, layers=1, scale=1 / 32)
    model_dir = write_model_dir(shape, tmp_path / "m")
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    first = build_model(shape, 3, "cpu", model_dir)
    second = build_model(shape, 3, "cpu", model_dir)
    other = build_model(shape, 4, "cpu", model_dir)
    assert sum(p.numel() for p in first.parameters()) == shape.parameter_count()
    assert first.dtype == torch.bfloat16 and first.name_or_path == str(model_dir)
    pairs = list(zip(first.parameters(), second.parameters(), other.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_parse_mode() -> None:
    assert parse_mode("raw").name == "raw"
    mode = parse_mode("tuned:tokens=8192,offload=cpu,hessian=off,batch=4,search=1,factor=off,propagate=on")
    assert mode.batch_tokens == 8192
    assert mode.overrides == {
        "sequential_offload_device": "cpu",
        "fast_hessian": False,
        "batch_size": 4,
        "awq_search_stride": 1,
        "fast_factorization": False,
        "propagate_error": True,
    }
    for bad in ("fast", "raw:tokens=1", "tuned:warp=9", "tuned:search=0"):
        with pytest.raises(PipelineError):
            parse_mode(bad)


def test_mode_overrides_are_checked_like_a_planned_plan() -> None:
    plan = TuningPlan(enabled=True, reason="test", fast_factorization=True, tf32_updates=True)
    assert overridden(plan, parse_mode("tuned:concurrent=on")).concurrent_solves
    with pytest.raises(PipelineError, match="tuned:factor=off.*tf32_updates needs fast_factorization"):
        overridden(plan, parse_mode("tuned:factor=off"))
    assert not overridden(plan, parse_mode("tuned:factor=off,tf32=off")).fast_factorization


def test_bench_subcommand_parses() -> None:
    args = build_parser().parse_args(["bench", "--methods", "gptq", "--modes", "raw", "tuned:tokens=4096", "--quality"])
    assert args.methods == "gptq" and args.modes == ["raw", "tuned:tokens=4096"] and args.quality


@pytest.mark.e2e  # two full benchmark runs (~12 s)
def test_tiny_side_by_side_run_and_report(tmp_path: Path) -> None:
    path = run_bench(
        ["fp8", "gptq"],
        ["raw", "default", "tuned"],
        layers=1,
        scale=1 / 32,
        samples=4,
        seq_len=16,
        quality=True,
        out_dir=tmp_path / "results",
        machine="test-cpu",
    )
    report = BenchReport.model_validate_json(path.read_text())
    assert path.name.startswith("test-cpu-")
    assert [(r.method, r.mode) for r in report.runs] == [
        ("fp8", "default"),
        ("fp8", "raw"),
        ("fp8", "tuned"),
        ("gptq", "default"),
        ("gptq", "raw"),
        ("gptq", "tuned"),
    ]
    for run in report.runs:
        assert run.stages_s["quantize"] > 0 and run.peak_rss_gib > 0
        assert run.quality is not None and run.quality["kl_vs_unquantized"] > 0
    gptq = {r.mode: r for r in report.runs if r.method == "gptq"}
    assert not gptq["tuned"].plan["enabled"]  # no GPU: the tuned path is the default path
    assert gptq["tuned"].quality["weights_equal_fraction"] == 1.0
    phases = gptq["default"].phases_s
    assert set(phases) >= {"calibrate_pass", "propagate_pass", "gptq_hessian", "gptq_solve", "gptq_factorize"}
    assert gptq["default"].calib_tokens_per_s > 0

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nProse stays.\n")
    render_report(tmp_path / "results", doc, root=tmp_path)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nProse stays.")
    rows = [line for line in text.splitlines() if line.startswith("| test-cpu |")]
    assert len(rows) == len(report.runs)
    render_report(tmp_path / "results", doc, root=tmp_path)  # idempotent: the generated section is replaced
    assert doc.read_text() == text


def test_phase_timers_time_the_tuned_awq_forward() -> None:
    """The search subsample replaces AWQ's `_run_samples` during `oneshot`; its forwards still count as awq_forward."""
    from types import SimpleNamespace

    from pipeline.backends import tuning
    from pipeline.bench.benchmark import phase_timers

    def parent(index: int) -> torch.Tensor:
        return torch.full((1,), float(index))

    cache = type("Cache", (), {"__len__": lambda self: 4, "fetch": lambda self, index: {"index": index}})()
    phases: dict[str, float] = {}
    original = tuning.strided_awq_samples
    with phase_timers(phases):
        outputs = tuning.strided_awq_samples(2)(SimpleNamespace(_parent_args_cache={parent: cache}), parent)
    assert [float(o) for o in outputs] == [0.0, 2.0] and phases["awq_forward"] > 0
    assert tuning.strided_awq_samples is original
