"""Wall time, peak RSS (process tree) and peak GPU memory of a block of work; freeing GPU memory between stages."""

from __future__ import annotations

import gc
import threading
import time
from types import TracebackType
from typing import Any

import psutil


def tree_rss_bytes(process: psutil.Process) -> int:
    """RSS of a process and all its children (vLLM and lm-eval spawn workers)."""
    total = 0
    for proc in (process, *process.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class GpuDeviceMemory:
    """Memory in use on the GPUs as the driver sees it (NVML): every process counts, so the vLLM and rank
    children a stage starts are measured too, which torch's allocator statistics of this process miss."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVIDIA driver or no nvidia-ml-py: nothing to sample
            self._handles = []

    def __bool__(self) -> bool:
        return bool(self._handles)

    def used_bytes(self) -> int:
        return sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)


class ResourceMonitor:
    """Context manager sampling RSS (and GPU memory in use, where NVML is there) every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.wall_s = 0.0
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self.peak_gpu_device_mb: float | None = None
        self._gpus = GpuDeviceMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._process = psutil.Process()
        self._start = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_bytes(self._process) / 2**20)
            if self._gpus:
                used = self._gpus.used_bytes() / 2**20
                self.peak_gpu_device_mb = max(self.peak_gpu_device_mb or 0.0, used)
            self._stop.wait(self.interval)

    def __enter__(self) -> ResourceMonitor:
        self._start = time.perf_counter()
        if _cuda_ready():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_bytes(self._process) / 2**20)
        self.wall_s = time.perf_counter() - self._start
        if _cuda_ready():
            import torch

            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def release_accelerator_memory() -> None:
    """Collect garbage and return PyTorch's cached GPU blocks to the driver, so that the next model, or a vLLM
    child process on the same GPU, finds the memory free (vLLM checks free memory at start-up)."""
    gc.collect()
    if _cuda_ready():
        import torch

        torch.cuda.empty_cache()


def default_device() -> str:
    """Where models run when nothing says otherwise: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_gpu_fraction() -> float | None:
    """Free share of the first GPU's memory (driver view), or None without a CUDA GPU."""
    if not _cuda_ready():
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return free / total


def _cuda_ready() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())
