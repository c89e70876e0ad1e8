"""Checkpoint weights onto the GPU through pinned memory, for the quantize stage's load when the model fits there.

transformers 5 loads with four threads, each copying a tensor from the checkpoint's memory map with
`tensor.to("cuda")`. A copy from pageable memory is made on the default stream, where the threads' copies take
turns: the 8B shape's 16 GB took 2.5-3.0 s on an H200 host (about 6 GB/s) with 4, 8 or 16 threads alike. Here
each loader thread copies through two pinned buffers of its own on a CUDA stream of its own: it reads the memory
map's pages into one buffer while the other one's transfer runs, and the threads' transfers run side by side.
That took 0.8-1.1 s, every tensor equal to the checkpoint's (docs/BENCHMARKS.md, `bench/load-weights.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from pipeline.backends import patches

STAGING_BYTES = 64 * 2**20  # per pinned buffer; two per loader thread


class _Staging(threading.local):
    """The calling thread's pinned buffers, their transfers' events and its stream, made on first use."""

    device: torch.device | None = None

    def ready(self, device: torch.device) -> _Staging:
        if self.device != device:
            self.device = device
            self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.stream = torch.cuda.Stream(device)
        return self


_staging = _Staging()


def pinned_copy(source: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the contiguous host tensor `source` on the CUDA `device`, through the thread's pinned buffers;
    done when it returns (its stream synchronized), so any stream may use it."""
    staging = _staging.ready(device)
    target = torch.empty(source.shape, dtype=source.dtype, device=device)
    src, dst = source.reshape(-1).view(torch.uint8), target.reshape(-1).view(torch.uint8)
    with torch.cuda.stream(staging.stream):
        for index, start in enumerate(range(0, src.numel(), STAGING_BYTES)):
            buffer, done = staging.buffers[index % 2], staging.events[index % 2]
            done.synchronize()  # this buffer's previous transfer has read it
            size = min(STAGING_BYTES, src.numel() - start)
            buffer[:size].copy_(src[start : start + size])
            dst[start : start + size].copy_(buffer[:size], non_blocking=True)
            done.record(staging.stream)
    staging.stream.synchronize()
    return target


def pinned_materialize(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """transformers' `_materialize_copy(tensor, device, dtype)` with copies onto a CUDA device made by
    `pinned_copy`; any other copy (to the host, a tensor not contiguous in host memory) is transformers' own."""

    def materialize(tensor: Any, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        target = torch.device(device) if device is not None else None
        if target is None or target.type != "cuda":
            return original(tensor, device, dtype)
        host = tensor[...]  # the safetensors slice: a tensor over the memory map, nothing read yet
        if host.device.type != "cpu" or not host.is_contiguous():
            return original(host, device, dtype)
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        copied = pinned_copy(host, target)
        return copied if dtype is None or dtype == copied.dtype else copied.to(dtype)

    return materialize


def pinned_loading() -> Any:
    """For the block, transformers' loader copies weights onto CUDA devices with `pinned_copy`."""
    return patches.transformers_weight_copy(pinned_materialize)
