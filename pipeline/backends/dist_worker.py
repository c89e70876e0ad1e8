"""One rank of distributed quantization; started by the quantize stage (pipeline/backends/distributed.py) as

``RANK=r LOCAL_RANK=r WORLD_SIZE=N MASTER_ADDR=... MASTER_PORT=... python -m pipeline.backends.dist_worker REQUEST``

Every rank imports what it will need and joins the process group (NCCL on GPUs, gloo on CPU) before
REQUEST.json exists, and waits for the parent to write it (giving up if the parent is gone). Then it loads the
model (onto its own GPU when it fits there; otherwise through llm-compressor's offloaded loading: rank 0 reads
the weights, the other ranks share them through host memory), calibrates on its contiguous slice of the
calibration set and takes part in saving; rank 0 writes the model, the tokenizer and a JSON result.

A GPU-resident replica is compressed by its own rank before the collective save (`save_compressed`). The save
otherwise splits compression across the ranks and broadcasts each module from the rank that compressed it;
compressed-tensors 0.19 sizes the receiving tensors from a compression on the meta device, which leaves an
asymmetric scheme's zero point unpacked (int8 [out, groups]) where the sender packed it (int32): NCCL then waits
forever (AWQ W4A16_ASYM on two H200s) and gloo delivers the wrong bytes. Ranks sharing the host copy exchange
shapes and are unaffected.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from pipeline.backends import patches
from pipeline.backends.distributed import PARENT_PID_ENV, POLL_S, DistributedRequest, rank_slice
from pipeline.backends.pinned_load import pinned_loading
from pipeline.backends.tuning import Placement, placement_for
from pipeline.run.files import write_text_atomic


def rank_start(launched_at: float | None, created: float, marks: dict[str, float]) -> dict[str, float]:
    """This process's start in parts, from epoch-second `marks` (`imported`, `grouped`, `requested`):
    `spawn_s` its process starting (when the parent said when it started the ranks), `import_s` the
    interpreter and the libraries (`preload`), `group_s` the device, the process group and its first barrier,
    `idle_s` ready and waiting for the request (a start the parent's own work hid completely)."""
    started = {
        "import_s": round(marks["imported"] - created, 2),
        "group_s": round(marks["grouped"] - marks["imported"], 2),
        "idle_s": round(marks["requested"] - marks["grouped"], 2),
    }
    if launched_at is not None:
        started["spawn_s"] = max(0.0, round(created - launched_at, 2))  # `created` is to the clock tick
    return started


def process_created() -> float:
    """Epoch seconds when this process started, to the clock tick. psutil's `create_time` adds /proc/stat's
    boot time, which is whole seconds, so it can be up to a second early."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def preload() -> None:
    """Import what `run` uses before the request comes, while the parent still validates and calibrates."""
    patches.transformers_without_sklearn()
    import datasets  # noqa: F401
    import llmcompressor  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from pipeline.backends import llmcompressor_backend  # noqa: F401


def wait_for_request(path: Path, parent_pid: int | None) -> DistributedRequest:
    """The request, once the parent has written it (atomically); exits if the parent is gone first."""
    while not path.is_file():
        if parent_pid is not None and not psutil.pid_exists(parent_pid):
            raise SystemExit(f"dist_worker: parent process {parent_pid} exited before writing {path}")
        time.sleep(POLL_S)
    return DistributedRequest.model_validate_json(path.read_text(encoding="utf-8"))


def init_process_group() -> None:
    """NCCL with this rank's GPU (`LOCAL_RANK`) bound to the group, or gloo without CUDA; `env://` rendezvous.
    The barrier makes every rank's NCCL set-up happen here, before the request, not in the first collective."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    dist.barrier()


def load_model(request: DistributedRequest) -> tuple[Placement, Any]:
    """Where it fits (`placement_for`), every rank loads the whole model onto its own GPU through pinned buffers
    (`pinned_loading`), reading the files side by side; otherwise rank 0 loads it once on the host and the ranks
    share it (onloaded per layer)."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    placement = placement_for(request.model, request.quantize, request.dtype, request.trust_remote_code)
    args = {"dtype": request.dtype, "trust_remote_code": request.trust_remote_code}
    if placement.device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
        with pinned_loading():
            return placement, AutoModelForCausalLM.from_pretrained(request.model, device_map=device, **args)
    # the context swaps `from_pretrained` for its shared loading: look it up inside
    with load_offloaded_model(extra_cpu_mem=request.reserve_cpu_bytes):
        return placement, AutoModelForCausalLM.from_pretrained(request.model, device_map="auto_offload", **args)


def load_rank_calibration(path: str, rank: int, world_size: int) -> Any:
    """This rank's slice of the calibration set. Slicing here (not in llm-compressor's sampler) also covers
    the tuned path, which hands `oneshot` a DataLoader that the engine would not partition."""
    from datasets import load_from_disk

    calibration = load_from_disk(path)
    return calibration.select(rank_slice(len(calibration), rank, world_size))


def run(request: DistributedRequest, started: dict[str, float]) -> dict[str, Any]:
    """Quantize on this rank and save (collectively; rank 0 writes). Returns the summary rank 0 records.
    `started`: this process's start in parts (`rank_start`)."""
    from transformers import AutoTokenizer

    from pipeline.backends.llmcompressor_backend import Backend, save_compressed

    rank, world_size = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    placement, model = load_model(request)
    tokenizer = AutoTokenizer.from_pretrained(request.model, trust_remote_code=request.trust_remote_code)
    calibration = load_rank_calibration(request.calibration, rank, world_size)
    backend = Backend()
    loaded = time.perf_counter()
    model = backend.quantize(model, tokenizer, calibration, request.quantize, seed=request.seed)
    quantized = time.perf_counter()
    compute_dtype = str(model.dtype)
    if request.export_dtype is not None and model.dtype != getattr(torch, request.export_dtype):
        model.to(getattr(torch, request.export_dtype))
    saved = save_compressed(model, Path(request.output))  # all join, rank 0 writes
    if rank == 0:
        tokenizer.save_pretrained(request.output)
    mine = {
        "rank": rank,
        **started,
        "load_s": round(loaded - start, 2),
        "quantize_s": round(quantized - loaded, 2),
        "save_s": round(time.perf_counter() - quantized, 2),
        **saved,  # compress_s of save_s: this rank's replica compressed on its own
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    ranks: list[Any] = [None] * world_size
    dist.all_gather_object(ranks, mine)  # rank 0 reports every rank: the slowest and the fullest decide
    peaks = [r["peak_gpu_gib"] for r in ranks if r["peak_gpu_gib"] is not None]
    return {
        "world_size": world_size,
        "quantize_s": mine["quantize_s"],
        "compute_dtype": compute_dtype,
        # the stage's description, so the parent never imports llm-compressor to build the modifiers again
        "describe": {**backend.describe(request.quantize), "placement": placement.model_dump()},
        "peak_gpu_gib": max(peaks) if peaks else None,  # the fullest rank's
        "ranks": ranks,
    }


def main(argv: list[str]) -> int:
    """Entry point of each rank: `REQUEST.json` in (once the parent writes it), the saved model and (rank 0)
    `request.result` out."""
    if len(argv) != 1:
        print(
            f"usage: RANK=... python -m pipeline.backends.dist_worker REQUEST.json (got {len(argv)} arguments)",
            file=sys.stderr,
        )
        return 2
    created = process_created()
    preload()
    marks = {"imported": time.time()}
    init_process_group()
    marks["grouped"] = time.time()
    try:
        parent = os.environ.get(PARENT_PID_ENV)
        request = wait_for_request(Path(argv[0]), int(parent) if parent else None)
        marks["requested"] = time.time()
        result = run(request, rank_start(request.launched_at, created, marks))
        if dist.get_rank() == 0:
            write_text_atomic(Path(request.result), json.dumps(result, indent=2))  # the stage stops the ranks on it
    except BaseException:
        # Not destroying the group: with NCCL that waits for a peer blocked in a collective, forever (a rank that
        # failed in GPTQ's solve hung a two-GPU run). Exiting at once lets the parent stop the other ranks.
        traceback.print_exc()
        leave(1)
    dist.destroy_process_group()
    return 0


def leave(code: int) -> None:
    """Exit without the interpreter's teardown, which takes seconds with torch, transformers and llm-compressor
    loaded (and a GPU context) while the quantize stage waits: the files are written and closed and
    the process group is gone, so only the logs need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
