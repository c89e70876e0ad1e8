"""Multi-GPU: recipe fields, visible-GPU checks, the rank launch plan, and a real 2-rank gloo run on CPU."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.backends import distributed
from pipeline.backends.distributed import (
    DistributedRequest,
    LaunchPlan,
    RankLaunch,
    check_parallel_resources,
    launch_plan,
    launch_quantize,
    prestarted_ranks,
    rank_slice,
    require_gpus,
)
from pipeline.errors import PipelineError, StageFailed
from pipeline.paths import import_root
from pipeline.recipe.load import build_recipe, load_recipe
from pipeline.recipe.schema import EvalSpec, QuantizeSpec, SmokeSpec
from pipeline.run.processes import free_port

TINY = [
    "calibrate.dataset=calibration/demo-calibration.jsonl",
    "calibrate.num_samples=8",
    "calibrate.max_seq_length=32",
    "eval.enabled=false",
    "smoke.enabled=false",
]


def recipe_error(data: dict[str, Any]) -> str:
    with pytest.raises(PipelineError) as info:
        build_recipe({"name": "r", **data}, "r.yaml")
    return str(info.value)


def test_parallel_fields_default_to_one_gpu() -> None:
    assert QuantizeSpec().num_gpus == 1 and EvalSpec().tensor_parallel_size == 1
    assert SmokeSpec().tensor_parallel_size == 1
    recipe = build_recipe({"name": "r", "quantize": {"method": "awq", "scheme": "W4A16", "num_gpus": 4}}, "r.yaml")
    assert recipe.quantize.num_gpus == 4


def test_num_gpus_needs_a_distributed_backend_and_calibration() -> None:
    message = recipe_error({"quantize": {"method": "rtn", "scheme": "FP8_DYNAMIC", "num_gpus": 2}})
    assert message.startswith("r.yaml: quantize.num_gpus: rtn FP8_DYNAMIC is data-free")
    assert "set num_gpus: 1" in message
    message = recipe_error({"quantize": {"backend": "other", "num_gpus": 2}})
    assert message.startswith("r.yaml: quantize.num_gpus: backend other has no distributed calibration")
    assert "(supported: llmcompressor)" in message
    # static activations and SmoothQuant calibrate, so they distribute
    build_recipe({"name": "r", "quantize": {"method": "rtn", "scheme": "FP8", "num_gpus": 2}}, "r.yaml")
    build_recipe(
        {"name": "r", "quantize": {"method": "gptq", "scheme": "W8A8", "smoothquant_strength": 0.8, "num_gpus": 2}},
        "r.yaml",
    )


def test_every_rank_needs_calibration_samples() -> None:
    message = recipe_error({"calibrate": {"num_samples": 2}, "quantize": {"num_gpus": 4}})
    assert message == (
        "r.yaml: quantize.num_gpus: 4 ranks need at least 4 calibration samples; "
        "raise calibrate.num_samples (now 2) or lower num_gpus"
    )


@pytest.mark.parametrize("section", ["eval", "smoke"])
def test_tensor_parallel_size_must_be_positive(section: str) -> None:
    assert f"{section}.tensor_parallel_size" in recipe_error({section: {"tensor_parallel_size": 0}})


def test_more_gpus_than_visible_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PipelineError) as info:
        require_gpus("quantize.num_gpus", 2)
    assert str(info.value) == (
        "quantize.num_gpus: 2 requested but 0 CUDA GPUs visible; set quantize.num_gpus=1 or run on a host with 2 GPUs"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    require_gpus("quantize.num_gpus", 2)
    with pytest.raises(PipelineError, match="smoke.tensor_parallel_size: 4 requested but 2 CUDA GPUs visible"):
        require_gpus("smoke.tensor_parallel_size", 4)


def test_one_gpu_never_queries_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> int:
        raise AssertionError("device_count called")

    monkeypatch.setattr(torch.cuda, "device_count", boom)
    require_gpus("quantize.num_gpus", 1)


def test_checks_cover_only_the_stages_that_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    recipe = build_recipe(
        {"name": "r", "eval": {"tensor_parallel_size": 2}, "smoke": {"tensor_parallel_size": 2, "enabled": False}},
        "r.yaml",
    )
    check_parallel_resources(recipe, ["calibrate", "quantize", "export", "smoke"])
    with pytest.raises(PipelineError, match=r"^eval.tensor_parallel_size: 2 requested but 1 CUDA GPUs visible"):
        check_parallel_resources(recipe, ["eval"])


def test_run_fails_before_any_model_is_loaded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.runner import run_pipeline
    from pipeline.stages import quantize

    def no_load(*args: Any) -> None:
        raise AssertionError("model loaded")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(quantize, "load_model", no_load)
    recipe, path = load_recipe("gptq", [*TINY, "quantize.num_gpus=2"], str(tiny_model_dir))
    with pytest.raises(PipelineError, match=r"^quantize.num_gpus: 2 requested but 0 CUDA GPUs visible"):
        run_pipeline(recipe, path, ["calibrate", "quantize", "export"], output=tmp_path)
    assert not list(tmp_path.rglob("calibration"))  # not even the calibrate stage ran


def test_launch_plan_runs_one_worker_per_gpu_with_nvls_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    plan = launch_plan(Path("/run/quantize-dist/request.json"), 4, cpu_count=64, port=29555)
    assert plan.argv == [sys.executable, "-m", "pipeline.backends.dist_worker", "/run/quantize-dist/request.json"]
    assert plan.world_size == 4
    assert plan.env["NCCL_NVLS_ENABLE"] == "0"
    assert plan.env["OMP_NUM_THREADS"] == "16"
    assert plan.env["PYTHONPATH"] == os.pathsep.join([str(import_root()), "/elsewhere"])
    assert plan.env["QPIPE_PARENT_PID"] == str(os.getpid())  # waiting ranks give up when this process is gone
    # torch.distributed's env:// rendezvous, rank 0 hosting the store
    assert {k: plan.env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")} == {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
        "WORLD_SIZE": "4",
    }
    assert plan.rank_env(3)["RANK"] == plan.rank_env(3)["LOCAL_RANK"] == "3" and "RANK" not in plan.env
    assert launch_plan(Path("r.json"), 4, cpu_count=2).env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(("samples", "ranks"), [(8, 2), (7, 2), (10, 4), (3, 3)])
def test_rank_slices_partition_the_calibration_set(samples: int, ranks: int) -> None:
    slices = [rank_slice(samples, r, ranks) for r in range(ranks)]
    assert [i for s in slices for i in s] == list(range(samples))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1 and min(map(len, slices)) >= 1


def _request(tmp_path: Path) -> DistributedRequest:
    return DistributedRequest(
        model="m",
        dtype="auto",
        calibration="c",
        quantize=QuantizeSpec(),
        output=str(tmp_path / "out"),
        result=str(tmp_path / "result.json"),
        reserve_cpu_bytes=0,
    )


def test_a_failing_rank_or_a_timeout_stops_every_rank(tmp_path: Path) -> None:
    """A rank that dies leaves the others waiting in a collective forever: the stage stops them all."""
    pid_file = tmp_path / "rank0.pid"
    rank_1_fails = (  # once rank 0 is up (it records its pid), rank 1 exits 3
        f"import os, pathlib, time; pid = pathlib.Path({str(pid_file)!r})\n"
        "if os.environ['RANK'] == '1':\n"
        "    while not pid.exists(): time.sleep(0.05)\n"
        "    raise SystemExit(3)\n"
        "tmp = pid.with_suffix('.tmp'); tmp.write_text(str(os.getpid())); os.replace(tmp, pid); time.sleep(60)"
    )
    failing = LaunchPlan(argv=[sys.executable, "-c", rank_1_fails], env={}, world_size=2)
    launch = RankLaunch(2, plan=failing)
    with pytest.raises(StageFailed, match=r"^quantize: rank 1 exited 3 \(2 ranks\); log: "):
        launch.run(_request(tmp_path), tmp_path / "fail.log")
    assert (tmp_path / "fail.log").is_file() and not launch.dir.exists()  # log kept, temporary files gone
    _assert_dies(int(pid_file.read_text()))
    child_file = tmp_path / "child.pid"
    spawn = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(child_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    hanging = LaunchPlan(argv=[sys.executable, "-c", spawn], env={"QPIPE_PROBE": "1"}, world_size=1)
    with pytest.raises(StageFailed, match=r"the ranks did not finish within 3 s"):
        RankLaunch(1, plan=hanging).run(_request(tmp_path), tmp_path / "hang.log", timeout_s=3)
    _assert_dies(int(child_file.read_text()))


def test_ranks_that_exit_without_a_result_fail_the_stage(tmp_path: Path) -> None:
    request = _request(tmp_path)
    quiet = LaunchPlan(argv=[sys.executable, "-c", "pass"], env={}, world_size=2)
    with pytest.raises(StageFailed, match=r"^quantize: the ranks finished but rank 0 saved no model in "):
        launch_quantize(request, tmp_path / "ranks.log", RankLaunch(2, plan=quiet))


def test_the_stage_stops_the_ranks_once_rank_0_wrote_its_result(tmp_path: Path) -> None:
    """What is left of the ranks after the result (process group teardown, exit) is not waited for."""
    request = _request(tmp_path)
    lingering = (  # each rank records its pid (atomically), rank 0 then writes the result, and both linger
        "import os, pathlib, time; rank = os.environ['RANK']\n"
        f"pid = pathlib.Path({str(tmp_path)!r}, f'rank{{rank}}.pid')\n"
        "tmp = pid.with_suffix('.tmp'); tmp.write_text(str(os.getpid())); os.replace(tmp, pid)\n"
        f"if rank == '0': pathlib.Path({request.result!r}).write_text('{{}}')\n"
        "time.sleep(60)"
    )
    plan = LaunchPlan(argv=[sys.executable, "-c", lingering], env={}, world_size=2)
    timings = RankLaunch(2, plan=plan).run(request, tmp_path / "ranks.log", timeout_s=30)
    assert timings["launch_s"] < 20 and (tmp_path / "rank0.pid").is_file()
    for pid_file in tmp_path.glob("rank*.pid"):  # rank 1 may not have got as far before the stop
        _assert_dies(int(pid_file.read_text()))


def _assert_dies(pid: int) -> None:
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "a rank's process survived"


def test_ranks_start_only_for_a_quantize_stage_on_several_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeping = LaunchPlan(argv=[sys.executable, "-c", "import time; time.sleep(60)"], env={}, world_size=2)
    monkeypatch.setattr(distributed, "launch_plan", lambda *args: sleeping)
    one, two = (build_recipe({"name": "r", "quantize": {"num_gpus": n}}, "r.yaml") for n in (1, 2))
    with prestarted_ranks(one, ["calibrate", "quantize"]) as none, prestarted_ranks(two, ["eval"]) as neither:
        assert none is None and neither is None
    with prestarted_ranks(two, ["calibrate", "quantize"]) as ranks:
        assert ranks is not None and ranks.running() and len(ranks.procs) == 2
    for proc in ranks.procs:  # stopped on the way out, whatever happened inside
        _assert_dies(proc.pid)


def test_a_waiting_rank_gives_up_when_its_parent_is_gone(tmp_path: Path) -> None:
    from pipeline.backends.dist_worker import wait_for_request

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(SystemExit, match=rf"parent process {gone.pid} exited before writing"):
        wait_for_request(tmp_path / "request.json", gone.pid)
    (tmp_path / "request.json").write_text(_request(tmp_path).model_dump_json())
    assert wait_for_request(tmp_path / "request.json", gone.pid).model == "m"  # a written request is read


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return status != "Z"


def test_worker_rejects_a_missing_request(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.backends.dist_worker import main

    assert main([]) == 2
    assert "usage: RANK=... python -m pipeline.backends.dist_worker REQUEST.json" in capsys.readouterr().err


FAILING_RANK = """
import sys, time
from types import SimpleNamespace
import torch.distributed as dist
from pipeline.backends import dist_worker

def fail(request, started):
    raise RuntimeError("solve failed")

dist_worker.preload = lambda: None
dist_worker.wait_for_request = lambda path, parent: SimpleNamespace(launched_at=time.time())
dist_worker.run = fail
dist.destroy_process_group = lambda: print("group destroyed", flush=True)
dist_worker.leave(dist_worker.main([sys.argv[1]]))
"""


def test_a_failing_rank_exits_without_waiting_for_its_peers(tmp_path: Path) -> None:
    """A rank whose quantize step raises prints why and exits non-zero at once: destroying an NCCL group would wait
    for a peer blocked in a collective (gloo here, one rank)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-c", FAILING_RANK, str(tmp_path / "request.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "RuntimeError: solve failed" in done.stderr
    assert "group destroyed" not in done.stdout


def test_smoke_request_carries_tensor_parallel_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    from pipeline.vllm.launch import run_worker

    echo = tmp_path / "python"  # stands in for the vLLM env's python: returns the request it was given
    echo.write_text('#!/bin/sh\ncp "$2" "$3"\n')
    echo.chmod(echo.stat().st_mode | stat.S_IEXEC)
    request = run_worker(echo, tiny_model_dir, SmokeSpec(tensor_parallel_size=2), tmp_path / "smoke.log")
    assert request["tensor_parallel_size"] == 2


def test_vllm_worker_passes_tensor_parallel_size_to_llm(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.vllm import worker as vllm_worker

    seen: dict[str, Any] = {}

    class FakeLLM:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)
            config = types.SimpleNamespace(quantization=None, dtype="bfloat16")
            self.llm_engine = types.SimpleNamespace(model_config=config)

        def collective_rpc(self, method: str) -> list[dict[str, int]]:
            return [{}]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    request_file = tmp_path / "request.json"
    for given, expected in (({}, 1), ({"tensor_parallel_size": 2}, 2)):
        request_file.write_text(json.dumps({"model": str(tiny_model_dir), "prompts": ["a"], **given}))
        request = vllm_worker.read_request([str(request_file)])
        vllm_worker.load_engine(request, {"timings": {}})
        assert seen["tensor_parallel_size"] == expected


def test_eval_on_several_gpus_uses_lm_eval_parallelize() -> None:
    from pipeline.eval.lm_eval_runner import model_args

    assert model_args("m", "auto", 1) == {"pretrained": "m", "dtype": "auto"}
    assert model_args("m", "auto", 2) == {"pretrained": "m", "dtype": "auto", "parallelize": True}


def test_hf_eval_over_several_gpus_of_a_compressed_checkpoint_stops_at_validate() -> None:
    from pipeline.validate import validate_recipe

    recipe, _ = load_recipe("gptq", ["eval.tensor_parallel_size=2"])
    with pytest.raises(PipelineError, match=r"^eval.tensor_parallel_size: .*set eval.backend: vllm"):
        validate_recipe(recipe)
    for fine in (
        ["eval.tensor_parallel_size=2", "eval.backend=vllm"],
        ["eval.tensor_parallel_size=2", "eval.enabled=false"],
    ):
        validate_recipe(load_recipe("gptq", fine)[0])


def test_dispatched_compressed_checkpoint_loses_its_hook_upstream(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Why validate stops hf eval over several GPUs: loading a compressed-tensors checkpoint with a device map
    that makes accelerate dispatch it (here CPU + disk; GPUs on two H200s) leaves a model whose first forward
    fails. The bf16 checkpoint loads and runs the same way. When this starts passing the forward, upstream is
    fixed and `check_parallel_eval` can go."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    def dispatched(path: Path) -> Any:
        layers = {f"model.layers.{i}": "cpu" for i in range(2)}
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", **layers}
        return AutoModelForCausalLM.from_pretrained(
            path, device_map={**device_map, "lm_head": "disk"}, offload_folder=str(tmp_path / "offload")
        )

    tokens = torch.tensor([[1, 2, 3]])
    assert dispatched(tiny_model_dir)(tokens).logits.shape[-1] > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])])
    model.save_pretrained(tmp_path / "compressed", save_compressed=True)
    compressed = dispatched(tmp_path / "compressed")  # loads and decompresses without complaint
    with pytest.raises(AttributeError, match="_hf_hook"):
        compressed(tokens)


def _config_dir(tmp_path: Path, name: str, **config: int) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_vllm_eval_passes_tensor_parallel_and_sizes_context_for_the_model(tmp_path: Path) -> None:
    """The vLLM eval takes the model's own context (not smoke.max_model_len) and a KV cache holding one such
    sequence: the smoke section's size when that suffices, else keys + values of every layer for every token."""
    from pipeline.eval.lm_eval_runner import model_args
    from pipeline.vllm.evaluation import engine_args

    recipe, _ = load_recipe("fp8", ["eval.backend=vllm", "smoke.kv_cache_gib=0.5", "smoke.max_model_len=512"])
    small = _config_dir(
        tmp_path, "small", max_position_embeddings=4096, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, hidden_size=512,
    )  # fmt: skip
    args = model_args("m", "auto", 2, "vllm", engine_args(recipe, small))
    assert args["tensor_parallel_size"] == 2 and "parallelize" not in args
    assert args["kv_cache_memory_bytes"] == 2**29 and args["max_model_len"] == 4096 and args["enforce_eager"]
    qwen3_8b = _config_dir(
        tmp_path, "qwen3-8b", max_position_embeddings=40960, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_size=4096,
    )  # fmt: skip
    args = engine_args(recipe, qwen3_8b)
    assert args["max_model_len"] == 40960
    assert args["kv_cache_memory_bytes"] == 2 * 36 * 8 * 128 * 2 * 40960


def _run_gptq(model_dir: Path, output: Path, num_gpus: int) -> Path:
    """As `qpipe run` does: ranks for several GPUs start before the run and wait for the quantize stage."""
    from pipeline.runner import run_pipeline

    recipe, path = load_recipe("gptq", [*TINY, f"quantize.num_gpus={num_gpus}"], str(model_dir))
    steps = ["calibrate", "quantize", "export"]
    with prestarted_ranks(recipe, steps) as ranks:
        return run_pipeline(recipe, path, steps, output=output, ranks=ranks).run_dir


@pytest.mark.e2e  # two gloo ranks (~20 s)
def test_two_rank_gloo_gptq_matches_single_process(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 CPU ranks (gloo): llm-compressor splits the calibration set, reduces the GPTQ Hessians
    and saves once; the artifact has the single-process layout, the same scales and loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.run.manifest import Manifest

    monkeypatch.setattr(distributed, "visible_cuda_gpus", lambda: 2)  # the ranks themselves run on CPU
    monkeypatch.setattr(distributed, "RESERVE_CPU_BYTES", 0)  # the 5 GB default exceeds this machine's budget
    single = _run_gptq(tiny_model_dir, tmp_path / "single", 1)
    multi = _run_gptq(tiny_model_dir, tmp_path / "multi", 2)

    assert not (multi / distributed.WORK_DIR).exists()
    assert {p.name for p in (multi / "model").iterdir()} == {p.name for p in (single / "model").iterdir()}
    config = {d: json.loads((d / "model" / "config.json").read_text()) for d in (single, multi)}
    assert config[single]["quantization_config"] == config[multi]["quantization_config"]
    stage = Manifest.load(multi / "manifest.json").stages["quantize"].outputs
    assert stage["distributed"]["world_size"] == 2 and stage["distributed"]["samples_per_rank"] == [4, 4]
    ranks = stage["distributed"]["ranks"]  # each rank's start / load / calibrate+quantize / save split and GPU peak
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["load_s"] > 0 and r["save_s"] > 0 for r in ranks)
    launch = stage["distributed"]
    # the last rank to reach the group's barrier waits for nobody: its group_s may round to 0
    assert all(r["spawn_s"] >= 0 and r["import_s"] > 0 and r["group_s"] >= 0 and r["idle_s"] >= 0 for r in ranks)
    assert launch["ahead_s"] > 0 and launch["exit_s"] >= 0  # started before the calibrate stage ran
    # no rank read its request before the quantize stage wrote it
    assert all(r["spawn_s"] + r["import_s"] + r["group_s"] + r["idle_s"] >= launch["ahead_s"] - 0.05 for r in ranks)
    assert ranks[0]["quantize_s"] == launch["quantize_s"] and launch["peak_gpu_gib"] is None
    argv = launch["argv"]
    assert argv[-3:-1] == ["-m", "pipeline.backends.dist_worker"] and argv[-1].endswith("/request.json")
    assert stage["modifiers"] == ["GPTQModifier"] and stage["calibration_samples"] == 8
    log = (multi / "logs" / distributed.RANKS_LOG).read_text()
    assert "partitioning dataset across ranks" not in log  # each rank got its own slice from the worker

    ours, theirs = (load_file(str(d / "model" / "model.safetensors")) for d in (multi, single))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    # Weight observers see the same weights, so the scales match exactly. The int4 values are not compared:
    # with gloo on CPU, llm-compressor 0.14's distributed GPTQ intermittently saturates a module's values
    # (about every second run; see the Multi-GPU section of README.md), to be re-checked with NCCL on GPUs.
    scales = [name for name in ours if name.endswith("weight_scale")]
    assert scales and all(torch.equal(ours[name], theirs[name]) for name in scales)
    model = AutoModelForCausalLM.from_pretrained(multi / "model")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # run again: quantize is up to date, so ranks started for it are stopped before anything else runs
    from pipeline.runner import run_pipeline

    recipe, path = load_recipe("gptq", [*TINY, "quantize.num_gpus=2"], str(tiny_model_dir))
    idle = LaunchPlan(argv=[sys.executable, "-c", "import time; time.sleep(60)"], env={}, world_size=2)
    ranks = RankLaunch(2, plan=idle)
    run_pipeline(recipe, path, ["calibrate", "quantize", "export"], output=tmp_path / "multi", ranks=ranks)
    assert not ranks.running() and not ranks.dir.exists()
    assert Manifest.load(multi / "manifest.json").stages["quantize"].outputs == stage


def _compress_on_rank(rank: int, port: int, out: str, local_first: bool) -> None:
    """One gloo rank holding a full W4A16_ASYM replica in compressed-tensors' device cache (as GPU-resident ranks
    do, on the CPU here): optionally `compress_in_place`, then the compression `save_pretrained` runs."""
    import datetime

    import torch.distributed as dist
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload.cache.dist_device import DistributedDeviceCache
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.apply import apply_quantization_config

    from pipeline.backends.llmcompressor_backend import compress_in_place

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 64, bias=False) for _ in range(4)])
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}, format="pack-quantized"))
    for module in model:
        module.weight_scale.data.fill_(0.01)
        module.weight_zero_point.data.fill_(3)
        module.quantization_status = QuantizationStatus.FROZEN
        module._parameters = DistributedDeviceCache.from_mapping(module._parameters, "cpu", "cpu")
        module._buffers = DistributedDeviceCache.from_mapping(module._buffers, "cpu", "cpu")
    if local_first:
        compress_in_place(model)
    ModelCompressor.from_pretrained_model(model).compress_model(model, skip_compressed=True)
    zero_points = [module.weight_zero_point for module in model]
    summary = [[list(z.shape), str(z.dtype), int(z.double().sum())] for z in zero_points]
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()


def _zero_points_after_save(tmp_path: Path, local_first: bool) -> list[Any]:
    import torch.multiprocessing as mp

    port = free_port()
    # spawn, not fork: a rank forked from a pytest process that already ran torch inherits its thread pools'
    # locks and hung in the full suite
    mp.start_processes(_compress_on_rank, args=(port, str(tmp_path), local_first), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.e2e  # two spawned gloo ranks (~20 s)
def test_compress_in_place_gives_every_rank_the_packed_zero_points(tmp_path: Path) -> None:
    """GPU-resident AWQ ranks hung at save on 2 H200s; compressing each replica locally first fixed it there.
    Here: every module's asymmetric zero point ends up packed (int32, 64 rows / 8 per int32) on both ranks."""
    ranks = _zero_points_after_save(tmp_path, local_first=True)
    assert ranks[0] == ranks[1]
    assert all(shape == [8, 2] and dtype == "torch.int32" for shape, dtype, _ in ranks[0])


@pytest.mark.e2e  # two spawned gloo ranks (~20 s)
def test_parallel_compression_mis_sizes_asymmetric_zero_points_upstream(tmp_path: Path) -> None:
    """compressed-tensors 0.19's split compression: the receiving rank sizes a module from a compression on meta,
    which leaves the zero point unpacked (int8 [64, 2]); on gloo the wrong bytes arrive, on NCCL it hangs. This
    fails once upstream fixes it, the signal to stop compressing GPU-resident replicas first (`save_compressed`)."""
    ranks = _zero_points_after_save(tmp_path, local_first=False)
    unpacked = [
        (rank, index)
        for rank, zero_points in enumerate(ranks)
        for index, z in enumerate(zero_points)
        if z[1] == "torch.int8"
    ]
    assert unpacked, "every rank got packed zero points: upstream fixed the split compression"


def test_every_rank_writes_every_nth_shard() -> None:
    from pipeline.backends.llmcompressor_backend import shard_of_rank

    names = [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert [[shard_of_rank(n, rank, 2) for n in names] for rank in (0, 1)] == [
        [True, False, True, False, True],
        [False, True, False, True, False],
    ]
    assert shard_of_rank("model.safetensors", 0, 2) and not shard_of_rank("model.safetensors", 1, 2)


def _quantized_tiny_model(model_dir: str) -> Any:
    """The tiny model after a data-free W4A16 `oneshot` (deterministic), not yet compressed."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])])
    return model


def _save_share_on_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    """One gloo rank holding a whole replica of the quantized tiny model: the collective split save."""
    import datetime

    import torch.distributed as dist

    from pipeline.backends.llmcompressor_backend import save_compressed

    model = _quantized_tiny_model(model_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    save_compressed(model, Path(out), replica=True, max_shard_size="100KB")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.e2e  # two spawned gloo ranks (~30 s)
def test_ranks_holding_replicas_write_the_single_process_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each rank writes every other shard and rank 0 the rest; the folder is the one-process save, byte for
    byte (several shards: the tiny model at 100 KB per shard)."""
    import torch.multiprocessing as mp

    from pipeline.backends.llmcompressor_backend import save_compressed

    single, split = tmp_path / "single", tmp_path / "split"
    save_compressed(_quantized_tiny_model(str(tiny_model_dir)), single, max_shard_size="100KB")
    port = free_port()
    mp.start_processes(
        _save_share_on_rank, args=(port, str(tiny_model_dir), str(split)), nprocs=2, start_method="spawn"
    )
    files = {p.name: p.read_bytes() for p in single.iterdir()}
    assert sum(name.endswith(".safetensors") for name in files) >= 3
    assert {p.name: p.read_bytes() for p in split.iterdir()} == files


def test_bench_num_gpus_option_and_its_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.bench.benchmark import run_bench
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["bench", "--num-gpus", "2"]).num_gpus == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PipelineError, match=r"^--num-gpus: 2 requested but 0 CUDA GPUs visible"):
        run_bench(["gptq"], ["tuned"], num_gpus=2)
    monkeypatch.setattr(distributed, "visible_cuda_gpus", lambda: 2)
    with pytest.raises(PipelineError, match=r"^--num-gpus: fp8 is data-free"):
        run_bench(["gptq", "fp8"], ["tuned"], num_gpus=2)
    with pytest.raises(PipelineError, match=r"^--num-gpus: mode 'raw' runs in-process only"):
        run_bench(["gptq"], ["raw", "tuned"], num_gpus=2)


@pytest.mark.e2e  # two gloo ranks (~20 s)
def test_bench_runs_gptq_through_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.bench.benchmark import BenchReport, render_table, run_bench

    monkeypatch.setattr(distributed, "visible_cuda_gpus", lambda: 2)  # the ranks run on CPU (gloo)
    monkeypatch.setattr(distributed, "RESERVE_CPU_BYTES", 0)
    path = run_bench(["gptq"], ["default"], layers=1, scale=1 / 32, samples=4, seq_len=16, out_dir=tmp_path, num_gpus=2)
    report = BenchReport.model_validate_json(path.read_text())
    (run,) = report.runs
    assert run.num_gpus == 2 and run.mode == "default" and set(run.stages_s) == {"build", "save", "quantize", "launch"}
    assert 0 < run.stages_s["quantize"] < run.stages_s["launch"]
    assert "| default (2 GPUs, launched) |" in render_table(report, "x.json")
