"""Whether copies from the GPU into new host memory (a save's first step) go faster side by side in several
processes: each child copies its share of the GiB with `.cpu()` into host memory it touches for the first time.

Usage, on a machine with two GPUs: python bench/fault-probe.py (results: docs/BENCHMARKS.md, "Seventh session").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

PIECES = 16  # tensors per child, as a save copies a shard tensor by tensor
RUNS = [(2, 3.0), (1, 6.0), (2, 3.0), (1, 6.0), (4, 1.5)]  # (processes, GiB each), run top to bottom


def copy_seconds(gib: float, device: int) -> float:
    """Seconds to copy `gib` of bf16 from GPU `device` into new host tensors."""
    torch.cuda.set_device(device)
    numel = int(gib * 2**30) // 2 // PIECES
    pieces = [torch.ones(numel, dtype=torch.bfloat16, device="cuda") for _ in range(PIECES)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    host = [piece.cpu() for piece in pieces]
    took = time.perf_counter() - start
    assert len(host) == PIECES
    return took


def side_by_side(processes: int, gib: float) -> list[float]:
    """Each child's copy time, the children started together (one per GPU, in turn)."""
    children = [
        subprocess.Popen([sys.executable, __file__, str(gib), str(i % 2)], stdout=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    return [json.loads(child.communicate()[0].splitlines()[-1]) for child in children]


def main() -> None:
    if len(sys.argv) == 3:  # a child
        print(json.dumps(round(copy_seconds(float(sys.argv[1]), int(sys.argv[2])), 2)), flush=True)
        return
    for processes, gib in RUNS:
        start = time.perf_counter()
        copies = side_by_side(processes, gib)
        print(f"{processes} procs x {gib} GiB wall {time.perf_counter() - start:.2f} s copies {copies}", flush=True)


if __name__ == "__main__":
    main()
