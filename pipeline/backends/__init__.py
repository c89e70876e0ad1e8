"""Quantize-backend registry: each backend declares what it supports; implementations import lazily."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.recipe import QuantizeSpec


class QuantizeBackend(Protocol):
    """Turns a loaded model + calibration set into a quantized model and writes it in its format."""

    def quantize(self, model: Any, tokenizer: Any, calibration: Any, spec: QuantizeSpec, seed: int) -> Any: ...

    def save(self, model: Any, tokenizer: Any, out_dir: Any) -> None: ...

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BackendInfo:
    """Declarations `validate` can check without importing the engine."""

    name: str
    module: str
    package: str  # import name of the engine, for availability checks
    methods: frozenset[str]
    schemes: frozenset[str]
    output_format: str
    needs_gpu: bool = False


BACKENDS: dict[str, BackendInfo] = {
    "llmcompressor": BackendInfo(
        name="llmcompressor",
        module="pipeline.backends.llmcompressor_backend",
        package="llmcompressor",
        methods=frozenset({"rtn", "gptq", "awq"}),
        schemes=frozenset({"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "FP8"}),
        output_format="compressed-tensors",
    ),
}


def backend_info(name: str) -> BackendInfo:
    if name not in BACKENDS:
        raise PipelineError(f"quantize.backend: unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_backend(spec: QuantizeSpec) -> BackendInfo:
    """Will this backend run this method/scheme here? Raises a one-line PipelineError if not."""
    info = backend_info(spec.backend)
    if spec.method not in info.methods:
        raise PipelineError(f"quantize.method: backend {info.name} has no method {spec.method!r}")
    if spec.scheme not in info.schemes:
        raise PipelineError(f"quantize.scheme: backend {info.name} does not support {spec.scheme}")
    if importlib.util.find_spec(info.package) is None:
        raise PipelineError(f"quantize.backend: {info.package} is not installed; run `make venv`")
    return info


def get_backend(name: str) -> QuantizeBackend:
    """Instantiate a backend by name (imports its engine)."""
    return importlib.import_module(backend_info(name).module).Backend()
