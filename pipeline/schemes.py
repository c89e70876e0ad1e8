"""Catalogue of the compressed-tensors preset schemes a recipe may name, and what each implies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchemeInfo:
    """What a preset quantizes; enough to validate a recipe without importing llm-compressor."""

    name: str
    weight_type: str  # "int" or "float"
    weight_bits: int
    grouped: bool  # per-group weight scales (group_size applies)
    symmetric: bool
    activations: str | None  # None (weight-only), "dynamic" or "static"
    default_min_recovery: float
    vllm_scheme: str  # part of the vLLM compressed-tensors scheme class name that serves it

    @property
    def weight_only(self) -> bool:
        return self.activations is None


SCHEMES: dict[str, SchemeInfo] = {
    s.name: s
    for s in (
        SchemeInfo("W4A16", "int", 4, True, True, None, 0.96, "WNA16"),
        SchemeInfo("W4A16_ASYM", "int", 4, True, False, None, 0.96, "WNA16"),
        SchemeInfo("W8A16", "int", 8, True, True, None, 0.98, "WNA16"),
        SchemeInfo("W8A8", "int", 8, False, True, "dynamic", 0.98, "W8A8Int8"),
        SchemeInfo("FP8_DYNAMIC", "float", 8, False, True, "dynamic", 0.99, "W8A8Fp8"),
        SchemeInfo("FP8", "float", 8, False, True, "static", 0.99, "W8A8Fp8"),
    )
}


def needs_calibration(method: str, scheme: SchemeInfo, smoothquant: bool) -> bool:
    """Whether the quantize stage needs calibration data for this method/scheme."""
    return method in ("gptq", "awq") or smoothquant or scheme.activations == "static"
