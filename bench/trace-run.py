"""`qpipe run ...` with a timeline on stderr: seconds since the process started at each step outside the stages.

Where a run's time beyond its stages goes (issue 17's whole-process overhead): interpreter start, imports, recipe
checks, the model fingerprint, the stage fingerprints, each stage. Usage: python bench/trace-run.py run gptq ...
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so interpreter start-up counts too."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path("/proc/self/stat").read_text()
    started = int(stat.rsplit(")", 1)[1].split()[19]) / ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def mark(label: str) -> None:
    print(f"trace {process_age():7.2f} s  {label}", file=sys.stderr, flush=True)


def traced(owner: Any, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{name} start")
        try:
            return original(*args, **kwargs)
        finally:
            mark(f"{name} end")

    setattr(owner, name, wrapper)


def traced_backend(get_backend: Callable[[str], Any]) -> Callable[[str], Any]:
    """The quantize stage's backend with its load and engine traced; llm-compressor's engine also marks when it
    is imported, when its calibration starts (the layers traced) and each layer's epoch end (GPTQ's solves),
    so a fresh process's start-up costs show beside the bench's warm `oneshot`."""

    def get(name: str) -> Any:
        backend = get_backend(name)
        traced(backend, "load")
        quantize = backend.quantize

        def quantize_traced(*args: Any, **kwargs: Any) -> Any:
            mark("quantize start")
            if name == "llmcompressor":
                from llmcompressor.core import LifecycleCallbacks

                mark("llmcompressor imported")
                for hook in ("calibration_start", "sequential_epoch_end", "calibration_end"):
                    traced(LifecycleCallbacks, hook)
            try:
                return quantize(*args, **kwargs)
            finally:
                mark("quantize end")

        backend.quantize = quantize_traced
        return backend

    return get


def main() -> int:
    mark("interpreter ready")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's `pipeline`, as `-m` would
    from pipeline import cli, runner, validate
    from pipeline.recipe import load
    from pipeline.stages import quantize

    mark("pipeline.cli imported")
    traced(load, "load_recipe")
    traced(validate, "validate_recipe")
    traced(runner, "resolve_model")
    traced(runner, "model_fingerprint")
    traced(runner, "stage_fingerprints")
    traced(runner, "check_parallel_resources")
    traced(runner, "_execute")
    traced(runner, "write_model_card")
    traced(quantize, "load_model")
    quantize.get_backend = traced_backend(quantize.get_backend)
    sys.argv = ["qpipe", *sys.argv[1:]]
    try:
        return cli.main()
    finally:
        mark("exit")


if __name__ == "__main__":
    sys.exit(main())
