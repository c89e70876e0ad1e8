"""A realistic finished run directory built in milliseconds: manifest, model/ with a small safetensors file and a
compressed-tensors config.json, reports and the model card, without running quantization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from pipeline.artifact.card import write_card
from pipeline.eval.gate import check_recovery, gate, paired_checks, token_check
from pipeline.recipe.load import build_recipe, recipe_yaml
from pipeline.recipe.schema import Recipe
from pipeline.run.context import RECIPE_FILE
from pipeline.run.manifest import Manifest, StageRecord, hash_tree, library_versions

BASE_ID = "Qwen/Qwen3-0.6B"
W4A16_GROUP = {
    "format": "pack-quantized",
    "input_activations": None,
    "output_activations": None,
    "targets": ["Linear"],
    "weights": {
        "actorder": "static",
        "dynamic": False,
        "group_size": 128,
        "num_bits": 4,
        "observer": "memoryless_minmax",
        "strategy": "group",
        "symmetric": True,
        "type": "int",
    },
}
SMOKE_REPORT = {  # as pipeline/stages/smoke.py writes it
    "status": "passed",
    "vllm_method": "compressed-tensors",
    "quantized": {"load_s": 21.4, "ttft_s": 0.05, "tokens_per_s": 1843.2, "peak_rss_mb": 2100.0, "size_bytes": 34016},
    "baseline": {"load_s": 25.0, "ttft_s": 0.06, "tokens_per_s": 1210.9, "peak_rss_mb": 3900.0, "size_bytes": 524288},
    "ratios": {"load_s": 0.856, "ttft_s": 0.833, "tokens_per_s": 1.522, "peak_rss_mb": 0.538, "size_bytes": 0.065},
    "token_agreement": 0.8125,
    "problems": [],
}


def fake_recipe() -> Recipe:
    data = {
        "name": "gptq",
        "description": "GPTQ int4 symmetric weights, group 128 (vLLM W4A16)",
        "model": {"id": BASE_ID},
        "calibrate": {"num_samples": 64, "max_seq_length": 256, "seed": 7},
        "quantize": {"method": "gptq", "scheme": "W4A16"},
        "eval": {"limit": 20},
    }
    return build_recipe(data, "fake")


# per gate outcome: (questions per subject, base right, quantized right) with the quantized model's right answers a
# subset of the base model's, so every flip is a loss
OUTCOMES = {"passed": (200, 104, 104), "failed": (200, 104, 80), "inconclusive": (5, 3, 2)}
SUBJECTS = ("mmlu_anatomy", "mmlu_astronomy")


def summary(per_subject: int, right: int) -> dict[str, Any]:
    """An lm-eval summary as `pipeline.eval.lm_eval_runner.summarize` writes it, with per-question results."""
    acc = right / per_subject
    tasks = {name: {"alias": name, "acc": acc, "acc_stderr": 0.05, "n_samples": per_subject} for name in SUBJECTS}
    questions = {name: {str(i): float(i < right) for i in range(per_subject)} for name in SUBJECTS}
    return {
        "lm_eval_version": "0.4.13",
        "tasks": tasks,
        "groups": {"mmlu": {"alias": "mmlu", "acc": acc, "acc_stderr": 0.012, "n_samples": 2 * per_subject}},
        "group_subtasks": {"mmlu": list(SUBJECTS)},
        "questions": questions,
        "wall_s": 12.5,
    }


def eval_report(outcome: str) -> dict[str, Any]:
    """reports/eval.json as the eval stage writes it, for a run whose gate came out as `outcome`."""
    per_subject, base_right, quant_right = OUTCOMES[outcome]
    baseline, quantized = summary(per_subject, base_right), summary(per_subject, quant_right)
    checks = check_recovery(
        {**baseline["tasks"], **baseline["groups"]}, {**quantized["tasks"], **quantized["groups"]}, ["mmlu"], 0.96, {}
    )
    paired = paired_checks(baseline, quantized, ["mmlu"], 0.96, min_questions=100)
    fidelity = {"kl_mean": 0.0123, "top1_agreement": 0.931, "tokens": 8000, "texts": 32, "dataset": "heldout.jsonl"}
    kl = [250 * 0.0123 * (1.2 if i % 2 else 0.8) for i in range(32)]  # 32 texts of 250 tokens around the mean
    token = token_check(kl, [round(250 * 0.931)] * 32, [250] * 32, max_kl=0.1, min_top1=0.85)
    report = {
        "gate": gate(paired, checks, token),
        "token": token.model_dump(),
        "min_recovery": 0.96,
        "min_scores": {},
        "paired": paired,
        "checks": [c.model_dump() for c in checks],
        "fidelity": fidelity,
        "data": {"source": "local"},
        "settings": {"tasks": ["mmlu"], "num_fewshot": 5, "limit": 20, "backend": "hf"},
        "baseline": {**baseline, "cached": True},
        "quantized": quantized,
    }
    assert report["gate"] == outcome, report["paired"]
    return report


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_base_model(path: Path) -> None:
    """The unquantized model's folder: a card with a license and 16-bit weights."""
    path.mkdir(parents=True)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    save_file({"w": np.zeros((512, 512), dtype=np.float16)}, str(path / "model.safetensors"))


def write_model_dir(model: Path, recipe: Recipe) -> dict[str, Any]:
    """model/ as export leaves it; returns export's record outputs."""
    model.mkdir(parents=True)
    save_file(
        {
            "model.layers.0.mlp.down_proj.weight_packed": np.arange(512 * 16, dtype=np.int32).reshape(512, 16),
            "model.layers.0.mlp.down_proj.weight_scale": np.ones((512, 1), dtype=np.float16),
        },
        str(model / "model.safetensors"),
    )
    quant = {"config_groups": {"group_0": W4A16_GROUP}, "format": "pack-quantized", "ignore": ["lm_head"]}
    shape = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 1}
    config = {
        "model_type": "qwen3",
        **shape,
        "max_position_embeddings": 4096,
        "quantization_config": {**quant, "quant_method": "compressed-tensors"},
    }
    write_json(model / "config.json", config)
    write_json(model / "tokenizer_config.json", {"model_max_length": 1024})
    (model / RECIPE_FILE).write_text(recipe_yaml(recipe), encoding="utf-8")
    files = hash_tree(model)
    return {
        "path": "model",
        "format": "compressed-tensors",
        "size_bytes": sum(f["size"] for f in files.values()),
        "files": files,
    }


def make_run_dir(root: Path, outcome: str = "passed", smoke: bool = True, recipe: Recipe | None = None) -> Path:
    """A complete run directory under `root`, card included; `smoke=False` leaves the smoke stage unrun; `recipe`
    replaces fake_recipe()'s settings (the reports stay those of `outcome`)."""
    recipe = recipe or fake_recipe()
    base = root / "hub-cache" / "Qwen3-0.6B"
    write_base_model(base)
    run_dir = root / "artifacts" / "Qwen--Qwen3-0.6B" / f"gptq-{recipe.artifact_hash()}"
    export = write_model_dir(run_dir / "model", recipe)
    report = eval_report(outcome)
    write_json(run_dir / "reports" / "eval.json", report)
    versions = library_versions()
    stages = {
        "calibrate": StageRecord(status="done", outputs={"samples": 64, "tokens": 15000, "path": "calibration"}),
        "quantize": StageRecord(status="done", outputs={"method": "gptq", "scheme": "W4A16"}, versions=versions),
        "export": StageRecord(status="done", outputs=export, versions=versions),
        "eval": StageRecord(status="done", outputs={"gate": report["gate"], "path": "reports/eval.json"}),
        "smoke": StageRecord(status="disabled", note="smoke.enabled is false"),
    }
    if smoke:
        write_json(run_dir / "reports" / "smoke.json", SMOKE_REPORT)
        stages["smoke"] = StageRecord(status="done", outputs={"path": "reports/smoke.json"})
    manifest = Manifest(
        qpipe_version="0.1.0",
        recipe=recipe.name,
        recipe_hash=recipe.artifact_hash(),
        recipe_source="recipes/gptq.yaml",
        command=f"/opt/venv/bin/qpipe run gptq --model {BASE_ID}",
        model={"identity": BASE_ID, "kind": "hub", "path": str(base), "revision": "main", "fingerprint": "f" * 64},
        status="complete",
        gate=report["gate"],
        stages=stages,
    )
    (run_dir / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
    manifest.stages["card"] = write_card(run_dir, manifest, recipe)
    manifest.save(run_dir / "manifest.json")
    return run_dir
