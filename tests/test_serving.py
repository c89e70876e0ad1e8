"""`qpipe bench serve`: figures from the vLLM worker's result, the bandwidth bound, the table, the model card; the
worker's serving mode in real vLLM on the CPU (the command itself needs a GPU and says so)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fake_artifact import make_run_dir

from pipeline.artifact.verify import verify_artifact
from pipeline.bench.serving import (
    ServeSettings,
    Target,
    alternatives,
    attach_to_artifact,
    summarize,
    targets,
    worker_request,
)
from pipeline.cli import main

GIB = 2**30
SETTINGS = ServeSettings(prompt_tokens=512, output_tokens=256, concurrency=(1, 8))


def qwen3_8b_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 4096}))
    return folder


def worker_result(device: str = "NVIDIA H200", decode: float = 150.0) -> dict[str, Any]:
    """A serving result as pipeline/vllm/worker.py writes it."""
    return {
        "status": "ok",
        "timings": {"import_s": 9.0, "load_s": 61.5},
        "versions": {"vllm": "0.26.0"},
        "quantization": {
            "method": "compressed-tensors",
            "layer_schemes": {"CompressedTensorsWNA16[MacheteLinearKernel]": 252, "UnquantizedLinearMethod": 1},
        },
        "engine_log": {"kv_cache_tokens": 700000.0, "max_concurrency": 170.9},
        "memory": {"device": device, "weights_bytes": 6 * GIB, "embedding_bytes": GIB},
        "batch1": {"ttft_s": 0.021, "decode_tokens_per_s": decode},
        "sweep": [
            {"requests": 1, "wall_s": 2.0, "output_tokens": 256, "output_tokens_per_s": 128.0},
            {"requests": 8, "wall_s": 2.5, "output_tokens": 2048, "output_tokens_per_s": 819.2},
        ],
    }


def test_decode_is_set_beside_the_bandwidth_bound(tmp_path: Path) -> None:
    model = qwen3_8b_config(tmp_path / "m")
    figures = summarize(worker_result(), model, SETTINGS)
    # bytes per token: 5 GiB of weights read (the embedding is not) + 640 tokens x 147,456 B of KV cache
    read = 5 * GIB + 640 * (2 * 36 * 8 * 128 * 2)
    assert figures["decode_bound"]["bytes_per_token"] == read
    assert figures["decode_bound"]["tokens_per_s"] == pytest.approx(4.8e12 / read, abs=0.1)
    assert figures["decode_of_bound"] == pytest.approx(150.0 / (4.8e12 / read), abs=1e-3)
    assert figures["kernels"] == ["MacheteLinearKernel"] and figures["weights_gib"] == 6.0
    assert summarize(worker_result(device="Unknown GPU"), model, SETTINGS)["decode_bound"] is None


def test_each_chosen_kernel_gets_a_rerun_without_it(tmp_path: Path) -> None:
    target = Target("w4a16", tmp_path)
    figures = summarize(worker_result(), qwen3_8b_config(tmp_path), SETTINGS)
    assert [t.disabled for t in alternatives(target, figures)] == [("MacheteLinearKernel",)]


def test_run_directories_bring_their_base_model(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    base = Path(json.loads((run_dir / "manifest.json").read_text())["model"]["path"])
    assert [t.label for t in targets([run_dir], None)] == [run_dir.name]  # the source is not a checkpoint: no base
    qwen3_8b_config(base)
    found = targets([run_dir], None)
    assert [(t.label, t.model_dir) for t in found] == [("base", base), (run_dir.name, run_dir / "model")]
    assert [t.label for t in targets([run_dir / "model"], None)] == ["model"]  # a bare folder: no base known
    with pytest.raises(Exception, match="no config.json"):
        targets([tmp_path / "nothing"], None)


def test_request_measures_as_served(tmp_path: Path) -> None:
    request = worker_request(Target("m", tmp_path), SETTINGS)
    assert request["enforce_eager"] is False and request["kv_cache_gib"] is None
    assert request["serving"] == {"prompt_tokens": 512, "output_tokens": 256, "concurrency": [1, 8]}


def test_card_shows_serving_figures_and_still_verifies(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    assert "## Serving" not in (run_dir / "model" / "README.md").read_text()
    model = qwen3_8b_config(tmp_path / "cfg")
    runs = [
        {
            "label": label,
            "model": "m",
            "disabled_kernels": [],
            "log": "l",
            **summarize(worker_result(), model, SETTINGS),
        }
        for label in ("base", run_dir.name, "other")
    ]
    attach_to_artifact(run_dir, {"settings": {**SETTINGS.__dict__, "concurrency": [1, 8]}, "runs": runs}, run_dir.name)
    card = (run_dir / "model" / "README.md").read_text()
    assert "## Serving" in card and "on NVIDIA H200" in card and "MacheteLinearKernel" in card
    assert "| other |" not in card  # only this model and its base
    assert verify_artifact(run_dir).problems == []


def test_cpu_only_machine_is_told_it_needs_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "serve", str(qwen3_8b_config(tmp_path / "m"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


@pytest.mark.e2e
@pytest.mark.vllm
def test_worker_serving_mode_in_real_vllm(vllm_ready: Path, demo_model_dir: Path, tmp_path: Path) -> None:
    """The worker's serving figures on the CPU build of vLLM (tiny workload; the command refuses CPUs)."""
    from pipeline.run.processes import run_json_child
    from pipeline.vllm.launch import WORKER

    settings = ServeSettings(prompt_tokens=32, output_tokens=8, concurrency=(1, 3), max_model_len=256)
    request = {**worker_request(Target("demo", demo_model_dir), settings), "kv_cache_gib": 0.25}
    _, result = run_json_child([str(vllm_ready), str(WORKER)], request, tmp_path / "log", 900, "serve", "t")
    assert result is not None and result["status"] == "ok", result
    figures = summarize(result, demo_model_dir, settings)
    assert figures["kv_cache_tokens"] > 0 and figures["weights_gib"] >= 0 and figures["decode_tokens_per_s"] > 0
    assert [s["requests"] for s in figures["sweep"]] == [1, 3]
    assert [s["output_tokens"] for s in figures["sweep"]] == [8, 24]  # ignore_eos: exactly output_tokens each
    assert result["memory"]["weights_bytes"] > result["memory"]["embedding_bytes"] > 0
