"""Quantize-backend registry: checks a recipe against the declarations in `pipeline.formats`; engines import lazily."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.formats import SCHEMES, BackendInfo, backend_info
from pipeline.recipe.schema import QuantizeSpec


class QuantizeBackend(Protocol):
    """Loads a model, quantizes it over a calibration set and writes it in its format."""

    def load(
        self, path: Any, spec: QuantizeSpec, dtype: str, trust_remote_code: bool, tokenizer: Any
    ) -> tuple[Any, Any]:
        """The model and the tokenizer to quantize it with: `tokenizer` (the run's, from `path`), or the engine's
        own where the engine loads one with the model (GPTQModel)."""

    def quantize(
        self, model: Any, tokenizer: Any, calibration: Any, spec: QuantizeSpec, seed: int, log_dir: Any = None
    ) -> Any:
        """`log_dir`: a folder for files the engine writes of its own accord (logs); never the working directory."""

    def save(self, model: Any, tokenizer: Any, out_dir: Any, dtype: Any = None) -> None: ...

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]: ...


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
    if not info.selects_layers and (spec.targets != defaults.targets or spec.ignore != defaults.ignore):
        raise PipelineError(
            f"quantize.targets/ignore: backend {info.name} quantizes every decoder Linear and skips lm_head; "
            "remove targets/ignore or use backend llmcompressor"
        )
    fmt = info.output_format(spec.method)
    if fmt.only_bits is not None and SCHEMES[spec.scheme].weight_bits != fmt.only_bits:
        raise PipelineError(
            f"quantize.scheme: the {fmt.label} checkpoint format is {fmt.only_bits}-bit only; got {spec.scheme}"
        )
    if importlib.util.find_spec(info.package) is None:
        raise PipelineError(f"quantize.backend: {info.package} is not installed; {info.install_hint}")
    return info


def get_backend(name: str) -> QuantizeBackend:
    """Instantiate a backend by name (imports its engine)."""
    return importlib.import_module(backend_info(name).module).Backend()
