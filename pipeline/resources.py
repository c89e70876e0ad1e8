"""Wall time, peak RSS (process tree) and peak GPU memory of a block of work."""

from __future__ import annotations

import threading
import time
from types import TracebackType

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


class ResourceMonitor:
    """Context manager sampling RSS every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.wall_s = 0.0
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._process = psutil.Process()
        self._start = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_bytes(self._process) / 2**20)
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


def _cuda_ready() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())
