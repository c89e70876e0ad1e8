"""Multi-GPU: visible-GPU checks and the `torchrun` launch of the distributed quantize worker.

With ``quantize.num_gpus: N > 1``, ``qpipe run`` starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.backends.dist_worker REQUEST`` (torchrun)
as soon as the recipe is loaded (`prestarted_ranks`): the ranks import their libraries and join the process group
while the parent validates, fingerprints and calibrates, then wait for REQUEST. The quantize stage writes it and
waits for torchrun; each rank calibrates on its slice of the calibration set (llm-compressor synchronises the
statistics), rank 0 saves the compressed model, and export moves that folder into the artifact. When the plan
skips quantize, the ranks are stopped before any other stage runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.errors import PipelineError, StageFailed
from pipeline.paths import import_root
from pipeline.recipe.schema import QuantizeSpec, Recipe
from pipeline.run.context import RunContext
from pipeline.run.files import write_text_atomic
from pipeline.run.processes import kill_process_group, start_in_session

WORKER_MODULE = "pipeline.backends.dist_worker"
# NVLink multicast (NVLS) off: NCCL's NVLS setup fails or hangs on hosts/containers that do not expose it.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
RESERVE_CPU_BYTES = 5 * 10**9  # host memory llm-compressor's offloaded loading leaves free (its default)
TIMEOUT_S = 24 * 3600  # a hung collective must not block a run forever
WORK_DIR = "quantize-dist"  # in the run directory: the result and the saved model until export
PARENT_PID_ENV = "QPIPE_PARENT_PID"  # ranks waiting for their request give up when this process is gone
POLL_S = 0.05  # how often a waiting side looks for the other's file: a rank for its request, the stage for the result


def visible_cuda_gpus() -> int:
    """CUDA GPUs this process can use (honours CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count()


def require_gpus(field: str, requested: int) -> None:
    """Raise a one-line PipelineError when more than one GPU is requested and fewer are visible."""
    if requested <= 1:
        return
    visible = visible_cuda_gpus()
    if requested > visible:
        raise PipelineError(
            f"{field}: {requested} requested but {visible} CUDA GPUs visible; "
            f"set {field}=1 or run on a host with {requested} GPUs"
        )


def check_parallel_resources(recipe: Recipe, stages: list[str]) -> None:
    """Before any model is loaded: the GPU counts the stages about to run ask for are visible."""
    if "quantize" in stages:
        require_gpus("quantize.num_gpus", recipe.quantize.num_gpus)
    if "eval" in stages and recipe.eval.enabled:
        require_gpus("eval.tensor_parallel_size", recipe.eval.tensor_parallel_size)
    if "smoke" in stages and recipe.smoke.enabled:
        require_gpus("smoke.tensor_parallel_size", recipe.smoke.tensor_parallel_size)


class DistributedRequest(BaseModel):
    """What every rank of the worker needs: model, calibration set, quantize settings and where to save."""

    model_config = ConfigDict(extra="forbid")

    model: str
    trust_remote_code: bool = False
    dtype: str  # compute dtype ("auto", "bfloat16", "float32", ...)
    export_dtype: str | None = None  # cast before saving when it differs from the compute dtype
    calibration: str  # `datasets` folder written by the calibrate stage
    quantize: QuantizeSpec
    seed: int = 0
    output: str  # rank 0 saves the compressed model and tokenizer here
    result: str  # rank 0 writes a JSON summary here
    reserve_cpu_bytes: int  # host memory the offloaded loading leaves free
    launched_at: float | None = None  # epoch seconds when torchrun was started: ranks time their own start


class LaunchPlan(BaseModel):
    """The exact torchrun command and the environment variables set on top of the caller's."""

    model_config = ConfigDict(frozen=True)

    argv: list[str]
    env: dict[str, str]
    world_size: int


def launch_plan(request_file: Path, num_gpus: int, cpu_count: int | None = None) -> LaunchPlan:
    """torchrun (as `python -m torch.distributed.run`, so the venv's torch is used) with one rank per GPU."""
    threads = max(1, (cpu_count or os.cpu_count() or 1) // num_gpus)
    pythonpath = os.pathsep.join(filter(None, [str(import_root()), os.environ.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(num_gpus)]
    return LaunchPlan(
        argv=[*argv, "-m", WORKER_MODULE, str(request_file)],
        env={
            **NCCL_ENV,
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": pythonpath,
            PARENT_PID_ENV: str(os.getpid()),
        },
        world_size=num_gpus,
    )


class RankLaunch:
    """A torchrun started before its request exists: the ranks import, join the process group and wait for
    the request file, so their start overlaps what the parent does until it writes it. Output goes to a
    temporary log that `run` copies where the stage keeps its logs."""

    def __init__(self, num_gpus: int, plan: LaunchPlan | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qpipe-ranks-"))
        self.request_file = self.dir / "request.json"
        self.plan = plan or launch_plan(self.request_file, num_gpus)
        self.log_file = self.dir / "torchrun.log"
        self.launched_at = time.time()
        try:  # its own session: a stop or timeout kills torchrun and every rank
            self.proc = start_in_session(self.plan.argv, self.log_file, {**os.environ, **self.plan.env})
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def run(self, request: DistributedRequest, log_file: Path, timeout_s: float = TIMEOUT_S) -> dict[str, float]:
        """Write the request and wait until rank 0's result exists (or torchrun exits first), then stop the
        ranks: what is left of them, destroying the process group and exiting, writes nothing. The log lands in
        `log_file`. Returns `launch_s` (request to stop: what the stage waits), `ahead_s` (how long the ranks
        were started before) and `stopped_at` (epoch seconds)."""
        submitted = time.time()
        request = request.model_copy(update={"launched_at": self.launched_at})
        write_text_atomic(self.request_file, request.model_dump_json(indent=2))
        try:
            returncode = self._wait(Path(request.result), timeout_s)
        finally:
            self.stop(log_file)
        what = f"quantize: torchrun ({self.plan.world_size} ranks)"
        if returncode is None:
            raise StageFailed(f"{what} did not finish within {timeout_s:.0f} s; log: {log_file}")
        if returncode != 0:
            raise StageFailed(f"{what} exited {returncode}; log: {log_file}")
        stopped = time.time()
        return {
            "launch_s": round(stopped - submitted, 2),
            "ahead_s": round(submitted - self.launched_at, 2),
            "stopped_at": stopped,
        }

    def _wait(self, result: Path, timeout_s: float) -> int | None:
        """0 once `result` exists (rank 0 writes it atomically after the save), torchrun's exit code if it exits
        first, None past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result.is_file():
                return 0
            returncode = self.proc.poll()
            if returncode is not None:
                return returncode
            time.sleep(POLL_S)
        return None

    def stop(self, log_file: Path | None = None) -> None:
        """Kill torchrun and its ranks if still running and remove the temporary files (the log copied to
        `log_file` first). Safe to call again."""
        kill_process_group(self.proc)
        if log_file is not None and self.log_file.is_file():
            log_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_file, log_file)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def prestarted_ranks(recipe: Recipe, steps: list[str]) -> Iterator[RankLaunch | None]:
    """Ranks started now for a quantize stage on several GPUs, stopped at the end whatever happened; None when
    the steps have no such stage."""
    if "quantize" not in steps or recipe.quantize.num_gpus <= 1:
        yield None
        return
    ranks = RankLaunch(recipe.quantize.num_gpus)
    try:
        yield ranks
    finally:
        ranks.stop()


def rank_slice(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous block of sample indices rank `rank` calibrates on (sizes differ by at most one)."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def launch_quantize(request: DistributedRequest, log_file: Path, ranks: RankLaunch) -> dict[str, Any]:
    """Hand `request` to the ranks, wait for them and return rank 0's result with the launch timings; `exit_s`
    is from rank 0 writing its result to the ranks being stopped."""
    timings = ranks.run(request, log_file)
    result_file = Path(request.result)
    if not result_file.is_file() or not (Path(request.output) / "config.json").is_file():
        raise StageFailed(f"quantize: torchrun finished but rank 0 saved no model in {request.output}; log: {log_file}")
    exit_s = round(timings.pop("stopped_at") - result_file.stat().st_mtime, 2)
    return {**json.loads(result_file.read_text()), **timings, "exit_s": exit_s}


def quantize_distributed(recipe: Recipe, ctx: RunContext, compute_dtype: str, export_dtype: Any) -> dict[str, Any]:
    """The quantize stage on `quantize.num_gpus` ranks; export picks the saved model up from `ctx.state`."""
    spec = recipe.quantize
    require_gpus("quantize.num_gpus", spec.num_gpus)
    samples = calibration_size(ctx)  # num_gpus > 1 implies a calibrated method (recipe schema)
    if samples < spec.num_gpus:
        raise PipelineError(
            f"quantize.num_gpus: {spec.num_gpus} ranks but only {samples} calibration samples; "
            "lower num_gpus or provide more calibration data"
        )
    work = ctx.run_dir / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    request = DistributedRequest(
        model=str(ctx.source.path),
        trust_remote_code=recipe.model.trust_remote_code,
        dtype=compute_dtype,
        export_dtype=str(export_dtype).removeprefix("torch.") if export_dtype is not None else None,
        calibration=str(ctx.calibration_dir),
        quantize=spec,
        seed=recipe.calibrate.seed,
        output=str(work / "model"),
        result=str(work / "result.json"),
        reserve_cpu_bytes=RESERVE_CPU_BYTES,
    )
    ctx.log.info("quantize: %s %s via %s on %d GPUs (torchrun)", spec.method, spec.scheme, spec.backend, spec.num_gpus)
    ranks = ctx.state.pop("ranks", None) or RankLaunch(spec.num_gpus)  # prestarted by `qpipe run`, or now
    result = launch_quantize(request, ctx.logs_dir / "quantize-torchrun.log", ranks)
    plan = ranks.plan
    ctx.state.update(saved_dir=work / "model", work_dir=work)
    return {
        "backend": spec.backend,
        "method": spec.method,
        "scheme": spec.scheme,
        **result["describe"],
        "calibration_samples": samples,
        "compute_dtype": result["compute_dtype"],
        "export_dtype": str(export_dtype),
        "distributed": {
            "world_size": plan.world_size,
            "argv": plan.argv,
            "env": plan.env,
            "samples_per_rank": [len(rank_slice(samples, r, plan.world_size)) for r in range(plan.world_size)],
            "quantize_s": result["quantize_s"],
            "launch_s": result["launch_s"],  # from the request to the ranks being stopped: what the stage waited
            "ahead_s": result["ahead_s"],  # how long before the request torchrun was started
            "exit_s": result["exit_s"],  # from rank 0's result to the ranks being stopped
            # per rank: spawn_s (torchrun starting it), import_s, group_s (the process group), idle_s (ready,
            # waiting for the request), load_s, quantize_s, save_s (compress_s of it), peak_gpu_gib (None on CPU)
            "ranks": result["ranks"],
            "peak_gpu_gib": result["peak_gpu_gib"],
            "log": "logs/quantize-torchrun.log",
        },
    }


def calibration_size(ctx: RunContext) -> int:
    """Samples in the calibration set the calibrate stage saved (memory-mapped, cheap)."""
    from pipeline.run.context import load_calibration

    return len(load_calibration(ctx))
