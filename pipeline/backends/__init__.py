"""Quantize-backend registry: each backend declares what it supports; implementations import lazily."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.recipe import QuantizeSpec
from pipeline.schemes import SCHEMES


class QuantizeBackend(Protocol):
    """Loads a model, quantizes it over a calibration set and writes it in its format."""

    def load(self, path: Any, spec: QuantizeSpec, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]: ...

    def quantize(self, model: Any, tokenizer: Any, calibration: Any, spec: QuantizeSpec, seed: int) -> Any: ...

    def save(self, model: Any, tokenizer: Any, out_dir: Any, dtype: Any = None) -> None: ...

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BackendInfo:
    """Declarations `validate` can check without importing the engine."""

    name: str
    module: str
    package: str  # import name of the engine, for availability checks
    methods: frozenset[str]
    schemes: frozenset[str]
    formats: dict[str, str]  # method -> checkpoint format (config.json quantization_config.quant_method)
    unsupported_fields: tuple[str, ...] = ()  # QuantizeSpec fields this engine has no equivalent for

    def output_format(self, method: str) -> str:
        return self.formats[method]


BACKENDS: dict[str, BackendInfo] = {
    "llmcompressor": BackendInfo(
        name="llmcompressor",
        module="pipeline.backends.llmcompressor_backend",
        package="llmcompressor",
        methods=frozenset({"rtn", "gptq", "awq"}),
        schemes=frozenset({"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "FP8"}),
        formats=dict.fromkeys(("rtn", "gptq", "awq"), "compressed-tensors"),
    ),
    "gptqmodel": BackendInfo(
        name="gptqmodel",
        module="pipeline.backends.gptqmodel_backend",
        package="gptqmodel",
        methods=frozenset({"gptq", "awq"}),
        schemes=frozenset({"W4A16", "W4A16_ASYM", "W8A16"}),
        formats={"gptq": "gptq", "awq": "awq"},
        unsupported_fields=("actorder", "smoothquant_strength"),
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
    for field in info.unsupported_fields:
        if getattr(spec, field) is not None:
            raise PipelineError(f"quantize.{field}: backend {info.name} has no equivalent; remove it")
    defaults = QuantizeSpec()
    if info.name != "llmcompressor" and (spec.targets != defaults.targets or spec.ignore != defaults.ignore):
        raise PipelineError(
            f"quantize.targets/ignore: backend {info.name} quantizes every decoder Linear and skips lm_head; "
            "remove targets/ignore or use backend llmcompressor"
        )
    if spec.method == "awq" and info.formats[spec.method] == "awq" and SCHEMES[spec.scheme].weight_bits != 4:
        raise PipelineError(f"quantize.scheme: the AWQ checkpoint format is 4-bit only; got {spec.scheme}")
    if importlib.util.find_spec(info.package) is None:
        raise PipelineError(f"quantize.backend: {info.package} is not installed; run `make venv`")
    return info


def get_backend(name: str) -> QuantizeBackend:
    """Instantiate a backend by name (imports its engine)."""
    return importlib.import_module(backend_info(name).module).Backend()
