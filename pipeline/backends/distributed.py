"""Multi-GPU: visible-GPU checks and the launch of the distributed quantize worker, one process per GPU.

With ``quantize.num_gpus: N > 1``, ``qpipe run`` starts N processes of
``python -m pipeline.backends.dist_worker REQUEST`` with torch.distributed's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` for its ``env://`` rendezvous) as soon as the recipe is loaded
(`prestarted_ranks`): the ranks import their libraries and join the process group while the parent validates,
fingerprints and calibrates, then wait for REQUEST. The quantize stage writes it and waits for rank 0's result;
each rank calibrates on its slice of the calibration set (llm-compressor synchronises the statistics), rank 0
saves the compressed model, and export moves that folder into the artifact. When the plan skips quantize, the
ranks are stopped before any other stage runs.

The ranks are started directly rather than through ``torchrun``: its agent imports torch before it spawns
anyone, which put 2.0-2.5 s in front of every rank's own start on the H200 hosts (docs/BENCHMARKS.md), and the
single-host, fixed-size launch needs none of its elastic restarts. The parent does what is left of the agent's
job: it watches every rank and stops them all when one fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
from pipeline.run.processes import free_port, kill_process_groups

WORKER_MODULE = "pipeline.backends.dist_worker"
# NVLink multicast (NVLS) off: NCCL's NVLS setup fails or hangs on hosts/containers that do not expose it.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
RESERVE_CPU_BYTES = 5 * 10**9  # host memory llm-compressor's offloaded loading leaves free (its default)
TIMEOUT_S = 24 * 3600  # a hung collective must not block a run forever
RANKS_LOG = "quantize-ranks.log"  # in the run's logs: every rank's output
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
    launched_at: float | None = None  # epoch seconds when the ranks were started: they time their own start


class LaunchPlan(BaseModel):
    """The command every rank runs and the environment set on top of the caller's: `env` for all, `RANK` and
    `LOCAL_RANK` added per rank."""

    model_config = ConfigDict(frozen=True)

    argv: list[str]
    env: dict[str, str]
    world_size: int

    def rank_env(self, rank: int) -> dict[str, str]:
        return {**self.env, "RANK": str(rank), "LOCAL_RANK": str(rank)}


def launch_plan(request_file: Path, num_gpus: int, cpu_count: int | None = None, port: int | None = None) -> LaunchPlan:
    """One `dist_worker` process per GPU, with this venv's python, rendezvousing on localhost."""
    threads = max(1, (cpu_count or os.cpu_count() or 1) // num_gpus)
    pythonpath = os.pathsep.join(filter(None, [str(import_root()), os.environ.get("PYTHONPATH")]))
    return LaunchPlan(
        argv=[sys.executable, "-m", WORKER_MODULE, str(request_file)],
        env={
            **NCCL_ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port or free_port()),
            "WORLD_SIZE": str(num_gpus),
            "LOCAL_WORLD_SIZE": str(num_gpus),
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": pythonpath,
            PARENT_PID_ENV: str(os.getpid()),
        },
        world_size=num_gpus,
    )


class RankLaunch:
    """Ranks started before their request exists: they import, join the process group and wait for the
    request file, so their start overlaps what the parent does until it writes it. Their output goes to one
    temporary log that `run` copies where the stage keeps its logs."""

    def __init__(self, num_gpus: int, plan: LaunchPlan | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qpipe-ranks-"))
        self.request_file = self.dir / "request.json"
        self.plan = plan or launch_plan(self.request_file, num_gpus)
        self.log_file = self.dir / "ranks.log"
        self.launched_at = time.time()
        self.procs: list[subprocess.Popen] = []
        try:
            with self.log_file.open("w") as log:
                for rank in range(self.plan.world_size):  # each in its own session: a stop kills all it spawned
                    env = {**os.environ, **self.plan.rank_env(rank)}
                    self.procs.append(
                        subprocess.Popen(
                            self.plan.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                        )
                    )
        except BaseException:
            self.stop()
            raise

    def run(self, request: DistributedRequest, log_file: Path, timeout_s: float = TIMEOUT_S) -> dict[str, float]:
        """Write the request and wait until rank 0's result exists (or a rank fails, or all exit first), then
        stop the ranks: what is left of them, destroying the process group and exiting, writes nothing. The log
        lands in `log_file`. Returns `launch_s` (request to stop: what the stage waits), `ahead_s` (how long the
        ranks were started before) and `stopped_at` (epoch seconds)."""
        submitted = time.time()
        request = request.model_copy(update={"launched_at": self.launched_at})
        write_text_atomic(self.request_file, request.model_dump_json(indent=2))
        try:
            failure = self._wait(Path(request.result), timeout_s)
        finally:
            self.stop(log_file)
        if failure is not None:
            raise StageFailed(f"quantize: {failure} ({self.plan.world_size} ranks); log: {log_file}")
        stopped = time.time()
        return {
            "launch_s": round(stopped - submitted, 2),
            "ahead_s": round(submitted - self.launched_at, 2),
            "stopped_at": stopped,
        }

    def _wait(self, result: Path, timeout_s: float) -> str | None:
        """None once `result` exists (rank 0 writes it atomically after the save) or every rank exited 0;
        otherwise what went wrong: the first rank to exit non-zero (the others would wait on it in a collective
        forever), or the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result.is_file():
                return None
            codes = [proc.poll() for proc in self.procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                return f"rank {rank} exited {code}"
            if all(code == 0 for code in codes):
                return None
            time.sleep(POLL_S)
        return f"the ranks did not finish within {timeout_s:.0f} s"

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def stop(self, log_file: Path | None = None) -> None:
        """Kill every rank still running (and all it spawned) and remove the temporary files (the log copied to
        `log_file` first). Safe to call again."""
        kill_process_groups(self.procs)
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
        raise StageFailed(
            f"quantize: the ranks finished but rank 0 saved no model in {request.output}; log: {log_file}"
        )
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
    ctx.log.info("quantize: %s %s via %s on %d GPUs", spec.method, spec.scheme, spec.backend, spec.num_gpus)
    ranks = ctx.state.pop("ranks", None) or RankLaunch(spec.num_gpus)  # prestarted by `qpipe run`, or now
    result = launch_quantize(request, ctx.logs_dir / RANKS_LOG, ranks)
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
            "ahead_s": result["ahead_s"],  # how long before the request the ranks were started
            "exit_s": result["exit_s"],  # from rank 0's result to the ranks being stopped
            # per rank: spawn_s (its process starting), import_s, group_s (the process group), idle_s (ready,
            # waiting for the request), load_s, quantize_s, save_s (compress_s of it), peak_gpu_gib (None on CPU)
            "ranks": result["ranks"],
            "peak_gpu_gib": result["peak_gpu_gib"],
            "log": f"logs/{RANKS_LOG}",
        },
    }


def calibration_size(ctx: RunContext) -> int:
    """Samples in the calibration set the calibrate stage saved (memory-mapped, cheap)."""
    from pipeline.run.context import load_calibration

    return len(load_calibration(ctx))
