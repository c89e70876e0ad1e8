"""Eval stage end to end on the demo model: lm-eval on the MMLU fixture, fidelity, gate, eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from demo_runs import run_recipe

from pipeline.run.manifest import Manifest

pytestmark = pytest.mark.e2e
EVAL = ["--set", "eval.limit=4", "--set", "eval.num_fewshot=1", "--set", "eval.fidelity_samples=16"]


def eval_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "reports" / "eval.json").read_text())


@pytest.fixture(scope="module")
def evaluated(demo_artifacts: dict[str, Path]) -> dict[str, dict]:
    reports = {}
    for name in ("rtn", "w8a8", "fp8"):
        code = run_recipe(name, demo_artifacts[name].parent.parent, *EVAL, steps="eval")
        assert code == 4, name  # 12 questions are too few for any verdict: inconclusive, whatever the answers
        reports[name] = eval_report(demo_artifacts[name])
    return reports


def test_eval_report_structure(evaluated: dict[str, dict], demo_artifacts: dict[str, Path]) -> None:
    report = evaluated["w8a8"]
    for side in ("baseline", "quantized"):
        assert "mmlu" in report[side]["groups"]
        assert report[side]["lm_eval_version"]
        assert sum(t["n_samples"] for t in report[side]["tasks"].values()) == 12  # 3 subjects x limit 4
    assert report["gate"] == "inconclusive"
    assert {c["task"] for c in report["checks"]} == {"mmlu"}
    (paired,) = report["paired"]
    assert paired["task"] == "mmlu" and paired["questions"] == 12 and "n = 12 questions" in paired["reason"]
    assert paired["ci_low"] <= paired["recovery"] <= paired["ci_high"]
    flips = sum(f["gained"] + f["lost"] for f in paired["flips"].values())
    assert flips == paired["gained"] + paired["lost"]
    for side in ("baseline", "quantized"):  # lm-eval's per-question results, one per question asked
        assert sum(len(q) for q in report[side]["questions"].values()) == 12
    manifest = Manifest.load(demo_artifacts["w8a8"] / "manifest.json")
    assert manifest.gate == report["gate"]
    assert manifest.stages["eval"].outputs["kl_mean"] == report["fidelity"]["kl_mean"]
    token = report["token"]  # the token-level gate over the fidelity set's texts
    assert token["texts"] == report["fidelity"]["texts"] and token["tokens"] == report["fidelity"]["tokens"]
    assert token["kl_low"] <= token["kl_mean"] <= token["kl_high"] and token["top1_low"] <= token["top1_high"]
    assert manifest.stages["eval"].outputs["token_gate"] == token["verdict"]


def test_baseline_is_cached_across_recipes(evaluated: dict[str, dict]) -> None:
    cached = [r["baseline"]["cached"] for r in evaluated.values()]
    assert cached.count(False) <= 1 and cached[-1] is True
    assert len({json.dumps(r["baseline"]["groups"], sort_keys=True) for r in evaluated.values()}) == 1


def test_eight_bit_schemes_are_closer_than_int4_rtn(evaluated: dict[str, dict]) -> None:
    kl = {name: r["fidelity"]["kl_mean"] for name, r in evaluated.items()}
    assert kl["w8a8"] < kl["rtn"] and kl["fp8"] < kl["rtn"], kl
    assert all(r["fidelity"]["top1_agreement"] > 0.5 for r in evaluated.values())


@pytest.mark.vllm
def test_vllm_backend_gives_the_hf_structure(evaluated: dict[str, dict], vllm_ready: Path, tmp_path: Path) -> None:
    """eval.backend vllm: lm-eval's vllm model type in the vLLM environment, summarised like the hf backend."""
    steps = "calibrate,quantize,export,eval"
    code = run_recipe("fp8", tmp_path, *EVAL, "--set", "eval.backend=vllm", steps=steps)
    assert code == 4  # 12 questions: inconclusive
    run_dir = next((tmp_path / "qpipe-demo").glob("fp8-*"))
    vllm_report, hf_report = eval_report(run_dir), evaluated["fp8"]
    assert vllm_report["settings"]["backend"] == "vllm" and hf_report["settings"]["backend"] == "hf"
    for side in ("baseline", "quantized"):
        ours, theirs = vllm_report[side], hf_report[side]
        assert set(ours) - {"cached"} == set(theirs) - {"cached"}
        assert set(ours["tasks"]) == set(theirs["tasks"]) and set(ours["groups"]) == set(theirs["groups"])
        assert [t["n_samples"] for t in ours["tasks"].values()] == [t["n_samples"] for t in theirs["tasks"].values()]
        assert 0.0 <= ours["groups"]["mmlu"]["acc"] <= 1.0
    assert (run_dir / "logs" / "eval-quantized.log").is_file()
