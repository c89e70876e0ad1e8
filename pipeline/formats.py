"""The one registry of format knowledge: schemes, checkpoint formats and the engines that write them.

Adding a scheme, a format or an engine starts here: recipe validation, the quantize stage, vLLM's smoke
check, `verify` and the model card all read these tables instead of keeping their own. Pure data (no engine
imports), so `validate` answers "will this recipe work here?" without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_GROUP_SIZE = 128  # the W4A16/W8A16 presets' group and the one GPTQModel is given when the recipe names none
METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "rtn": "Round-to-nearest (RTN)"}  # as the model card says them


@dataclass(frozen=True)
class SchemeInfo:
    """What a compressed-tensors preset quantizes; enough to validate a recipe without importing llm-compressor."""

    name: str
    weight_type: str  # "int" or "float"
    weight_bits: int
    grouped: bool  # per-group weight scales (group_size applies)
    symmetric: bool
    activations: str | None  # None (weight-only), "dynamic" or "static"
    default_min_recovery: float
    default_max_kl: float  # token gate: mean KL(base || quant) nats/token (docs/BENCHMARKS.md, "Token-level gate")
    default_min_top1: float  # token gate: next-token top-1 agreement
    vllm_scheme: str  # part of the vLLM compressed-tensors scheme class name that serves it

    @property
    def weight_only(self) -> bool:
        return self.activations is None


SCHEMES: dict[str, SchemeInfo] = {
    s.name: s
    for s in (
        SchemeInfo("W4A16", "int", 4, True, True, None, 0.96, 0.1, 0.85, "WNA16"),
        SchemeInfo("W4A16_ASYM", "int", 4, True, False, None, 0.96, 0.1, 0.85, "WNA16"),
        SchemeInfo("W8A16", "int", 8, True, True, None, 0.98, 0.02, 0.95, "WNA16"),
        SchemeInfo("W8A8", "int", 8, False, True, "dynamic", 0.98, 0.05, 0.9, "W8A8Int8"),
        SchemeInfo("FP8_DYNAMIC", "float", 8, False, True, "dynamic", 0.99, 0.05, 0.9, "W8A8Fp8"),
        SchemeInfo("FP8", "float", 8, False, True, "static", 0.99, 0.05, 0.9, "W8A8Fp8"),
    )
}


@dataclass(frozen=True)
class FormatInfo:
    """A checkpoint format: config.json's `quantization_config.quant_method` and what loads it."""

    name: str
    label: str
    vllm_methods: frozenset[str]  # what vLLM reports (`model_config.quantization`) when it loads one
    transformers_needs: str  # packages transformers needs besides itself, as the model card words it
    only_bits: int | None = None  # weight bits the format can store, when it is limited to one width

    @property
    def native(self) -> bool:
        """GPTQ/AWQ's own flat quantization_config rather than compressed-tensors' config groups."""
        return self.name != "compressed-tensors"


# GPTQ/AWQ become their Marlin variants in vLLM on GPUs that support Marlin and the `auto_*` methods on CPU.
FORMATS: dict[str, FormatInfo] = {
    f.name: f
    for f in (
        FormatInfo(
            "compressed-tensors", "compressed-tensors", frozenset({"compressed-tensors"}), "`compressed-tensors`"
        ),
        FormatInfo("gptq", "GPTQ", frozenset({"gptq", "gptq_marlin", "auto_gptq"}), "`gptqmodel` and `optimum`"),
        FormatInfo("awq", "AWQ", frozenset({"awq", "awq_marlin", "auto_awq"}), "`gptqmodel`", only_bits=4),
    )
}


@dataclass(frozen=True)
class BackendInfo:
    """A quantize backend's declarations (`quantize.backend`), checked by `validate` without importing the engine."""

    name: str
    module: str
    package: str  # import name of the engine, for availability checks
    methods: frozenset[str]
    schemes: frozenset[str]
    formats: dict[str, str]  # method -> checkpoint format (a FORMATS key)
    unsupported_fields: tuple[str, ...] = ()  # QuantizeSpec fields this engine has no equivalent for
    distributed: bool = False  # calibration runs data-parallel, one process per GPU (quantize.num_gpus > 1)
    selects_layers: bool = False  # honours quantize.targets/ignore (else: every decoder Linear, not lm_head)
    extra: str | None = None  # the pyproject extra that installs the engine (None: a base dependency)

    def output_format(self, method: str) -> FormatInfo:
        return FORMATS[self.formats[method]]

    @property
    def install_hint(self) -> str:
        if self.extra is None:
            return "reinstall qpipe (`make venv`)"
        return f"install it with `pip install 'qpipe[{self.extra}]'` (`make venv` does)"


BACKENDS: dict[str, BackendInfo] = {
    "llmcompressor": BackendInfo(
        name="llmcompressor",
        module="pipeline.backends.llmcompressor_backend",
        package="llmcompressor",
        methods=frozenset({"rtn", "gptq", "awq"}),
        schemes=frozenset({"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "FP8"}),
        formats=dict.fromkeys(("rtn", "gptq", "awq"), "compressed-tensors"),
        distributed=True,
        selects_layers=True,
    ),
    "gptqmodel": BackendInfo(
        name="gptqmodel",
        module="pipeline.backends.gptqmodel_backend",
        package="gptqmodel",
        extra="gptqmodel",
        methods=frozenset({"gptq", "awq"}),
        schemes=frozenset({"W4A16", "W4A16_ASYM", "W8A16"}),
        formats={"gptq": "gptq", "awq": "awq"},
        unsupported_fields=("actorder", "smoothquant_strength"),
    ),
}
DISTRIBUTED_BACKENDS = tuple(name for name, info in BACKENDS.items() if info.distributed)


def backend_info(name: str) -> BackendInfo:
    """The declarations of `quantize.backend`; an unknown name is a one-line error listing the known ones."""
    if name not in BACKENDS:
        raise PipelineError(f"quantize.backend: unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def needs_calibration(method: str, scheme: SchemeInfo, smoothquant: bool) -> bool:
    """Whether the quantize stage needs calibration data for this method/scheme."""
    return method in ("gptq", "awq") or smoothquant or scheme.activations == "static"


def expected_quantization(
    scheme: str, symmetric: bool | None, group_size: int | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fields compressed-tensors' weight and input-activation args must have for a scheme (what verify checks)."""
    info = SCHEMES[scheme]
    weights: dict[str, Any] = {
        "num_bits": info.weight_bits,
        "type": info.weight_type,
        "symmetric": info.symmetric if symmetric is None else symmetric,
    }
    if info.grouped:
        weights["strategy"] = "group"
    if group_size is not None:
        weights["group_size"] = group_size
    if info.weight_only:
        return weights, None
    return weights, {"type": info.weight_type, "dynamic": info.activations == "dynamic"}


def expected_native_quantization(
    fmt: str, scheme: str, symmetric: bool | None, group_size: int | None
) -> dict[str, Any]:
    """Fields of a native GPTQ/AWQ quantization_config for a scheme (AWQ says zero_point, not sym)."""
    info = SCHEMES[scheme]
    sym = info.symmetric if symmetric is None else symmetric
    expected: dict[str, Any] = {"bits": info.weight_bits, "group_size": group_size or DEFAULT_GROUP_SIZE}
    return {**expected, **({"zero_point": not sym} if fmt == "awq" else {"sym": sym})}
