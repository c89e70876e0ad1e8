"""Load a checkpoint onto the GPU with transformers' own copies or through `pipeline.backends.pinned_load`, in a
fresh process, and print the time as JSON (docs/BENCHMARKS.md, "Weights onto the GPU through pinned buffers").

Usage: python bench/load-weights.py CHECKPOINT hf|pin [--workers N] [--verify]
`--workers` sets transformers' loader threads (4 by default); `--verify` compares every loaded tensor with the
checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's `pipeline`

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, core_model_loading  # noqa: E402

from pipeline.backends.pinned_load import pinned_loading  # noqa: E402


def unequal_tensors(model: torch.nn.Module, checkpoint: str) -> tuple[int, int]:
    """(tensors checked, tensors whose loaded values differ from the checkpoint's)."""
    from safetensors import safe_open

    params = model.state_dict()
    checked = bad = 0
    for path in sorted(glob.glob(f"{checkpoint}/*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name in params:
                    checked += 1
                    bad += not torch.equal(handle.get_tensor(name).to(params[name].device), params[name])
    return checked, bad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("mode", choices=["hf", "pin"])
    parser.add_argument("--workers", type=int, default=core_model_loading.GLOBAL_WORKERS)
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    core_model_loading.GLOBAL_WORKERS = args.workers
    torch.ones(1, device="cuda")  # the CUDA context, outside the timing
    torch.cuda.synchronize()
    started = time.perf_counter()
    with pinned_loading() if args.mode == "pin" else nullcontext():
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    out = {"mode": args.mode, "workers": args.workers, "load_s": round(time.perf_counter() - started, 3)}
    out["gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.verify:
        out["checked"], out["unequal"] = unequal_tensors(model, args.checkpoint)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
