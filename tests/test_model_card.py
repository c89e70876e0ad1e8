"""Model card: Hugging Face metadata, the real numbers of the run, honest sections, the runner hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_artifact import BASE_ID, make_run_dir
from huggingface_hub import ModelCard

from pipeline.artifact.card import fmt_cell, render_card, write_model_card
from pipeline.artifact.verify import CARD_STAGE, load_saved_recipe, verify_artifact
from pipeline.cli import main
from pipeline.run.context import RunContext
from pipeline.run.manifest import Manifest
from pipeline.run.model_source import ModelSource

ROOT = Path(__file__).resolve().parent.parent


def card_of(run_dir: Path) -> str:
    return (run_dir / "model" / "README.md").read_text(encoding="utf-8")


def section(card: str, title: str) -> str:
    """The text of one `## title` section."""
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def drop_stage(run_dir: Path, stage: str) -> Manifest:
    manifest = Manifest.load(run_dir / "manifest.json")
    del manifest.stages[stage]
    return manifest


def test_front_matter_is_hub_metadata(tmp_path: Path) -> None:
    card = ModelCard.load(make_run_dir(tmp_path) / "model" / "README.md")
    assert card.data.base_model == BASE_ID
    assert card.data.license == "apache-2.0"  # carried from the base model's own card
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"w4a16", "compressed-tensors", "gptq"} <= set(card.data.tags)


def test_card_states_what_was_done(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    done = section(card_of(run_dir), "What was done")
    manifest = Manifest.load(run_dir / "manifest.json")
    assert "| method | GPTQ |" in done
    assert "| scheme | W4A16 |" in done
    assert "int4, symmetric, per group of 128" in done
    assert "64 samples × up to 256 tokens (15,000 tokens), seed 7" in done
    assert f"hash `{manifest.recipe_hash}`" in done


def test_results_table_has_baseline_quantized_recovery_and_stderr(tmp_path: Path) -> None:
    results = section(card_of(make_run_dir(tmp_path)), "Evaluation: base model vs quantized")
    assert "| mmlu | 400 | 0.5200 | 0.5200 | 100.0% | 100.0% – 100.0% | 0 / 0 | passed |" in results
    assert "| mmlu | acc | 0.5200 ± 0.0120 | 0.5200 ± 0.0120 | 100.0% | pass (min 96.0%) |" in results
    assert "| mmlu_astronomy | acc | 0.5200 ± 0.0500 | 0.5200 ± 0.0500 | 100.0% |" in results
    assert "Token-level gate on `heldout.jsonl` (8,000 tokens of 32 texts; 95.0% intervals" in results
    assert "| KL(base ‖ quantized), nats/token | 0.0123 | " in results and "| at most 0.1 | passed |" in results
    assert "| top-1 agreement | 93.2% | " in results
    assert "at most 20 questions per task" in results


def test_smoke_figures_deploy_versions_and_command(tmp_path: Path) -> None:
    card = card_of(make_run_dir(tmp_path))
    smoke = section(card, "vLLM smoke test")
    assert "Status: **passed**; vLLM detected the quantization method `compressed-tensors`" in smoke
    assert "81.2% of the first greedy tokens equal the base model's" in smoke
    assert "| load time (s) | 21.4 | 25 | 0.856 |" in smoke
    assert "| tokens/s | 1,843 | 1,211 | 1.522 |" in smoke
    assert "| size on disk | 33.22 KiB | 512.00 KiB | 0.065 |" in smoke
    assert "vllm serve" in card and 'LLM(model="' in card
    assert "| llmcompressor | " in section(card, "Library versions")
    assert f"qpipe run gptq --model {BASE_ID}" in section(card, "Reproduce")


def test_card_names_no_absolute_local_path(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    manifest = Manifest.load(run_dir / "manifest.json")
    manifest.command = "/opt/venv/bin/qpipe run /home/alice/recipes/gptq.yaml --model /models/llama --output /data/out"
    card = render_card(run_dir, manifest, load_saved_recipe(run_dir / "recipe.yaml"))
    assert "qpipe run gptq.yaml --model llama --output out" in section(card, "Reproduce")
    assert "/home/alice" not in card and "/models/" not in card and "/data/out" not in card


def test_failed_gate_is_stated_at_the_top(tmp_path: Path) -> None:
    card = card_of(make_run_dir(tmp_path, outcome="failed"))
    top = card.split("## What was done", 1)[0]
    assert "Quality gate FAILED" in top
    assert "mmlu/acc recovered 76.9%, minimum 96.0%" in top
    assert "**FAIL**" in section(card, "Evaluation: base model vs quantized")


def test_inconclusive_gate_is_stated_at_the_top_with_its_reason(tmp_path: Path) -> None:
    card = card_of(make_run_dir(tmp_path, outcome="inconclusive"))
    top = card.split("## What was done", 1)[0]
    assert "Quality gate inconclusive" in top
    assert "mmlu: n = 10 questions < eval.min_questions 100" in top
    assert "| mmlu | 10 | 0.6000 | 0.4000 | 66.7% |" in section(card, "Evaluation: base model vs quantized")


def test_stages_that_did_not_run_say_so(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, smoke=False)
    manifest = drop_stage(run_dir, "eval")
    manifest.gate = "not-run"
    card = render_card(run_dir, manifest, load_saved_recipe(run_dir / "recipe.yaml"))
    assert "The quality gate did not run" in card.split("## What was done", 1)[0]
    assert "The eval stage did not run for this artifact." in section(card, "Evaluation: base model vs quantized")
    smoke = section(card, "vLLM smoke test")
    assert "Not run. No smoke results: the stage's status is disabled (smoke.enabled is false)." in smoke
    assert "tokens/s" not in card


def test_missing_report_is_stated(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    (run_dir / "reports" / "smoke.json").unlink()
    manifest = Manifest.load(run_dir / "manifest.json")
    card = render_card(run_dir, manifest, load_saved_recipe(run_dir / "recipe.yaml"))
    assert "The smoke stage finished but reports/smoke.json is missing." in section(card, "vLLM smoke test")


def test_runner_hook_writes_card_and_records_its_hash(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    (run_dir / "model" / "README.md").unlink()
    manifest = drop_stage(run_dir, CARD_STAGE)
    recipe = load_saved_recipe(run_dir / "recipe.yaml")
    source = ModelSource("hub", BASE_ID, Path(manifest.model["path"]), "main")
    write_model_card(RunContext(recipe, source, "f" * 64, run_dir, manifest))
    saved = Manifest.load(run_dir / "manifest.json")
    assert saved.stages[CARD_STAGE].outputs["path"] == "model/README.md"
    assert verify_artifact(run_dir).problems == []


def test_runner_hook_skips_without_exported_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = Manifest(qpipe_version="0", recipe="gptq", recipe_hash="0", recipe_source="x")
    recipe = load_saved_recipe(make_run_dir(tmp_path) / "recipe.yaml")
    ctx = RunContext(recipe, ModelSource("local", "base", tmp_path, None), "", run_dir, manifest)
    write_model_card(ctx)
    assert CARD_STAGE not in manifest.stages
    assert not (run_dir / "model").exists()


def test_card_command_rerenders_from_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path)
    report_path = run_dir / "reports" / "eval.json"
    report = json.loads(report_path.read_text())
    report["token"]["top1"] = 0.5
    report_path.write_text(json.dumps(report))
    assert main(["card", str(run_dir)]) == 0
    assert "| top-1 agreement | 50.0% |" in card_of(run_dir)
    assert verify_artifact(run_dir).problems == []  # the new card's hash replaced the old one


def test_card_command_refuses_a_published_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path)
    assert main(["publish", str(run_dir), "--to", str(tmp_path / "pub")]) == 0
    assert main(["card", str(tmp_path / "pub")]) == 2
    assert "pass the run directory" in capsys.readouterr().err


def test_table_cells_are_escaped() -> None:
    assert fmt_cell("a|b\nc") == "a\\|b c"


def test_card_states_the_vllm_version_and_gpus_it_needs(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    needs = section(card_of(run_dir), "What serving it needs")
    assert "vLLM 0.26.0+" in needs and "integer weight-only (WNA16): compute capability 7.5+" in needs
    assert "| t4 | 16.00 GiB | 7.5 | full | 4,096 |" in needs and "v100" not in needs  # 7.0: no WNA16 kernel
    config_path = run_dir / "model" / "config.json"
    config = json.loads(config_path.read_text())
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    group = {"targets": ["Linear"], "weights": fp8, "input_activations": {**fp8, "dynamic": True}}
    config["quantization_config"]["config_groups"] = {"group_0": group}
    config_path.write_text(json.dumps(config))
    assert main(["card", str(run_dir)]) == 0
    needs = section(card_of(run_dir), "What serving it needs")
    assert "from 7.5 vLLM serves it as weight-only FP8" in needs
    assert "| a100-80gb | 80.00 GiB | 8.0 | fallback |" in needs and "| h100 | 80.00 GiB | 9.0 | full |" in needs
