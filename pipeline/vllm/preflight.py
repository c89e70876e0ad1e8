"""`qpipe preflight`: will vLLM serve this artifact on that GPU? Rules over config.json and pipeline/hardware.py.

The errors users hit when serving quantized models (FP8 on a GPU without FP8, out of memory at start-up, a
vLLM too old for the checkpoint's format), answered before vLLM starts, one line per rule with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from pipeline.errors import PipelineError
from pipeline.hardware import COMPRESSED_TENSORS_SCHEMAS, GPUS, KERNELS, VLLM_COMPRESSED_TENSORS, Gpu
from pipeline.run.files import format_bytes
from pipeline.run.model_source import kv_bytes_per_token, text_config

# Memory besides weights and KV cache: an allowance, not a measurement. vLLM profiles the real peak at start-up
# (a forward pass of a full batch, the sampler's logits, CUDA graph pools, the CUDA context); the rule keeps this
# much free for it, so "fits" means "leaves vLLM that headroom", and vLLM's own start-up profile has the last word.
ALLOWANCE_BYTES = 3 * 2**30
DEFAULT_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
MAX_UTILIZATION = 0.95  # the highest share the fix suggests: the rest is the driver's and other processes'
ARG_KEYS = ("weights", "input_activations", "output_activations")
SEVERITY = {"ok": 0, "skip": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Verdict:
    """One rule's answer: `fail` means vLLM will not serve it as asked (exit 2); `warn` and `skip` do not."""

    rule: str
    status: str  # ok, warn, fail or skip
    text: str  # the finding and, unless ok, the fix

    def line(self) -> str:
        return f"{self.status:<4} {self.rule}: {self.text}"


@dataclass(frozen=True)
class Artifact:
    """What the rules read of an exported model directory."""

    quantization: dict[str, Any]  # config.json's quantization_config ({} when unquantized)
    weights_bytes: int
    kv_bytes_per_token: int  # 16-bit KV cache, whole model
    kv_heads: int
    max_positions: int | None


def read_artifact(model_dir: Path) -> Artifact:
    """config.json and weight file sizes of `model_dir`; a missing file or field is a one-line PipelineError."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{model_dir}: no config.json; pass an exported model directory or its run directory")
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern)]
    if not weights:
        raise PipelineError(f"{model_dir}: no weight files (*.safetensors or *.bin); pass the complete model folder")
    config = text_config(config_path)
    try:
        kv = kv_bytes_per_token(config)
    except KeyError as exc:
        raise PipelineError(f"{config_path}: no {exc.args[0]}; preflight needs the decoder's shape") from None
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    return Artifact(
        quantization=quantization,
        weights_bytes=sum(p.stat().st_size for p in weights),
        kv_bytes_per_token=kv,
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        max_positions=config.get("max_position_embeddings"),
    )


def group_kernel(group: dict[str, Any]) -> str | None:
    """The KERNELS entry vLLM's compressed-tensors support picks for a config group, None when no rule covers it."""
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "float" and weights.get("num_bits") == 8:
        return "W8A8Fp8" if acts and acts.get("type") == "float" else "W8A16Fp8"
    if weights.get("type") == "int":
        if acts is None:
            return "WNA16"
        if weights.get("num_bits") == 8 and acts.get("type") == "int" and acts.get("num_bits") == 8:
            return "W8A8Int8"
    return None


def layer_kernels(quantization: dict[str, Any]) -> list[str | None]:
    """The kernels an artifact's quantized layers need: the native format's own, or one per config group."""
    method = quantization.get("quant_method")
    if method in ("gptq", "awq"):
        return [method]
    return sorted({group_kernel(g) for g in (quantization.get("config_groups") or {}).values()}, key=str)


def compute_rule(quantization: dict[str, Any], gpu: Gpu) -> Verdict:
    """The artifact's layer kernels against the GPU's compute capability (the most severe answer of its groups)."""
    if not quantization:
        return Verdict("compute", "skip", "not quantized: no quantization kernel to check")
    verdicts = [kernel_verdict(kernel, gpu) for kernel in layer_kernels(quantization)]
    if not verdicts:
        return Verdict("compute", "skip", f"quantization_config of {quantization.get('quant_method')} has no groups")
    return max(verdicts, key=lambda v: SEVERITY[v.status])


def kernel_verdict(kernel: str | None, gpu: Gpu) -> Verdict:
    if kernel is None:
        return Verdict("compute", "skip", "a layer scheme qpipe has no capability rule for; not checked")
    needs = KERNELS[kernel]
    here = f"{gpu.name} has compute capability {gpu.capability_text}"
    need = f"{needs.capability[0]}.{needs.capability[1]}"
    if gpu.capability >= needs.capability:
        return Verdict("compute", "ok", f"{needs.label} needs compute capability {need}+; {here}")
    if needs.fallback_capability is not None and gpu.capability >= needs.fallback_capability:
        return Verdict(
            "compute",
            "warn",
            f"{needs.label} needs compute capability {need}+ and {here}: vLLM falls back to {needs.fallback}; "
            f"fix: a GPU with FP8 support (compute capability {need}+: L4, L40S, RTX 4090, H100, H200) for FP8 speed",
        )
    floor = needs.fallback_capability or needs.capability
    return Verdict(
        "compute",
        "fail",
        f"{needs.label} needs compute capability {floor[0]}.{floor[1]}+ and {here}: vLLM has no kernel for it; "
        "fix: a newer GPU, or a scheme this GPU runs",
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU holds for an artifact at a context length, against vLLM's share of that GPU."""

    weights: int
    kv_per_token: int
    budget: int  # memory x gpu_memory_utilization

    @property
    def kv_room(self) -> int:
        """What is left for the KV cache once weights and the allowance are placed."""
        return self.budget - self.weights - ALLOWANCE_BYTES

    @property
    def largest_context(self) -> int:
        """The largest max_model_len whose one full sequence fits in the KV cache (vLLM's start-up check)."""
        return max(self.kv_room // self.kv_per_token, 0)


def memory_plan(artifact: Artifact, gpu: Gpu, utilization: float, tensor_parallel_size: int = 1) -> MemoryPlan:
    """Per-GPU weights and KV bytes per token: tensor parallelism splits the weights and the KV heads (a head
    is replicated when there are fewer heads than GPUs)."""
    tp = tensor_parallel_size
    heads_per_gpu = max(artifact.kv_heads // tp, 1)
    return MemoryPlan(
        weights=-(-artifact.weights_bytes // tp),
        kv_per_token=artifact.kv_bytes_per_token * heads_per_gpu // artifact.kv_heads,
        budget=int(gpu.memory_bytes * utilization),
    )


def memory_rule(
    artifact: Artifact,
    gpu: Gpu,
    max_model_len: int,
    utilization: float,
    tensor_parallel_size: int = 1,
    kv_cache_bytes: int | None = None,
) -> Verdict:
    """Weights + the KV cache of one `max_model_len` sequence + the allowance within memory x utilization.

    `kv_cache_bytes`: a fixed KV cache (vLLM's kv_cache_memory_bytes, which the smoke stage sets from
    smoke.kv_cache_gib) instead of whatever the budget leaves."""
    if artifact.max_positions and max_model_len > artifact.max_positions:
        limit = f"{artifact.max_positions:,}"
        text = f"max_model_len {max_model_len:,} exceeds the model's max_position_embeddings {limit}"
        return Verdict("memory", "fail", f"{text}; fix: --max-model-len {limit} or less")
    plan = memory_plan(artifact, gpu, utilization, tensor_parallel_size)
    sequence = max_model_len * plan.kv_per_token
    kv = sequence if kv_cache_bytes is None else kv_cache_bytes
    need = plan.weights + kv + ALLOWANCE_BYTES
    room = plan.kv_room if kv_cache_bytes is None else min(kv_cache_bytes, plan.kv_room)
    largest = min(max(room // plan.kv_per_token, 0), artifact.max_positions or room)
    sums = (
        f"weights {format_bytes(plan.weights)} + KV cache {format_bytes(kv)} + {format_bytes(ALLOWANCE_BYTES)} "
        f"allowance = {format_bytes(need)} of {format_bytes(plan.budget)} ({gpu.name}: "
        f"{format_bytes(gpu.memory_bytes)} x gpu_memory_utilization {utilization})"
    )
    if need <= plan.budget and max_model_len <= largest:
        return Verdict("memory", "ok", f"{sums}; largest max_model_len that fits: {largest:,}")
    bigger = bigger_gpu(plan.weights + sequence + ALLOWANCE_BYTES, utilization)
    if plan.kv_room < plan.kv_per_token:
        return Verdict("memory", "fail", f"{sums}: the weights alone leave no room; fix: {bigger}")
    if kv_cache_bytes is not None:
        fix = f"smoke.kv_cache_gib of at most {format_bytes(plan.kv_room)} and smoke.max_model_len {largest:,} or less"
        return Verdict("memory", "fail", f"{sums}; fix: {fix}")
    fixes = [f"--max-model-len {largest:,} or less"]
    wanted = (plan.weights + sequence + ALLOWANCE_BYTES) / gpu.memory_bytes
    if wanted <= MAX_UTILIZATION:
        fixes.append(f"gpu_memory_utilization {wanted:.2f}+ where nothing else uses the GPU")
    text = f"{sums}: max_model_len {max_model_len:,} does not fit; fix: {', or '.join([*fixes, bigger])}"
    return Verdict("memory", "fail", text)


def bigger_gpu(need: int, utilization: float) -> str:
    """The fix when the context cannot shrink enough: a GPU whose share holds `need`, or fewer bytes per GPU."""
    return f"a GPU with {format_bytes(need / utilization)}+ of memory, tensor_parallel_size > 1, or a smaller scheme"


def compressed_tensors_rule(quantization: dict[str, Any], vllm: str, shipped: str) -> Verdict:
    """The compressed-tensors version that wrote the artifact against the one `vllm` ships: a newer writer is
    only a problem when it uses an args field (QuantizationArgs forbids unknown ones) or a format the older
    release lacks, which qpipe can check where it has that release's schema."""
    where = f"vLLM {vllm} ships compressed-tensors {shipped}"
    if quantization.get("quant_method") != "compressed-tensors":
        method = quantization.get("quant_method") or "no quantization"
        return Verdict("compressed-tensors", "ok", f"{method}: not a compressed-tensors checkpoint ({where})")
    written = quantization.get("version")
    if written is None:
        return Verdict("compressed-tensors", "warn", f"config.json records no compressed-tensors version; {where}")
    if _version(written, "quantization_config.version") <= _version(shipped, "compressed-tensors"):
        return Verdict("compressed-tensors", "ok", f"written by compressed-tensors {written}; {where}")
    redo = f"re-quantize with compressed-tensors=={shipped}"
    newer = f"written by compressed-tensors {written}, newer than the {shipped} that vLLM {vllm} ships"
    schema = COMPRESSED_TENSORS_SCHEMAS.get(shipped)
    if schema is None:
        fix = f"a vLLM that ships compressed-tensors {written}+, or {redo}"
        return Verdict("compressed-tensors", "warn", f"{newer}; qpipe has no schema of {shipped} to check; fix: {fix}")
    unknown = rejected(quantization, shipped)
    if unknown:
        fix = f"a vLLM that ships compressed-tensors {written}+ ({minimum_vllm_text(quantization)}), or {redo}"
        return Verdict("compressed-tensors", "fail", f"{newer}, which rejects {', '.join(unknown)}; fix: {fix}")
    text = f"{newer}; every args field and format it uses is one {shipped} knows, so it should load"
    return Verdict("compressed-tensors", "warn", text)


def rejected(quantization: dict[str, Any], shipped: str) -> list[str]:
    """Args fields and formats of the config that compressed-tensors `shipped` lacks ([] where qpipe has no schema
    of it, or the config is not compressed-tensors)."""
    schema = COMPRESSED_TENSORS_SCHEMAS.get(shipped)
    if schema is None or quantization.get("quant_method") != "compressed-tensors":
        return []
    fields, formats = schema.args_fields, schema.formats
    groups = (quantization.get("config_groups") or {}).values()
    used_fields = {key for g in groups for name in ARG_KEYS for key in (g.get(name) or {})}
    used_formats = {f for f in (quantization.get("format"), *(g.get("format") for g in groups)) if f}
    return [f"field {f!r}" for f in sorted(used_fields - fields)] + [
        f"format {f!r}" for f in sorted(used_formats - formats)
    ]


def _version(text: str, what: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise PipelineError(f"{what}: {text!r} is not a version (e.g. 0.26.0)") from None


def vllm_release(version: str) -> str:
    """A vLLM version as the table keys it: the release without local parts (`0.32.0+cpu` -> `0.32.0`)."""
    return _version(version, "--vllm").base_version


def minimum_vllm(quantization: dict[str, Any]) -> str | None:
    """The oldest vLLM of the table whose compressed-tensors rejects nothing of the config, None when all do."""
    for vllm in sorted(VLLM_COMPRESSED_TENSORS, key=Version):
        if not rejected(quantization, VLLM_COMPRESSED_TENSORS[vllm]):
            return vllm
    return None


def minimum_vllm_text(quantization: dict[str, Any]) -> str:
    found = minimum_vllm(quantization)
    known = ", ".join(sorted(VLLM_COMPRESSED_TENSORS, key=Version))
    return f"vLLM {found}+" if found else f"none of the vLLM versions qpipe's table knows ({known})"


def named_gpu(name: str) -> Gpu:
    """A GPU of the table by name (case, spaces and underscores ignored); unknown names list the known ones."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    if key not in GPUS:
        raise PipelineError(f"--gpu: unknown GPU {name!r}; use auto or one of {', '.join(GPUS)}")
    return GPUS[key]


def detected_gpu() -> Gpu | None:
    """GPU 0 as torch.cuda sees it (its own memory and capability, not the table's), None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Gpu(props.name, props.total_memory, (props.major, props.minor))


def resolve_gpu(name: str) -> Gpu:
    """`--gpu`: a table name, or `auto` for the GPU of this machine."""
    if name != "auto":
        return named_gpu(name)
    gpu = detected_gpu()
    if gpu is None:
        raise PipelineError(f"--gpu auto: no CUDA GPU visible here; name the target GPU: --gpu {'|'.join(GPUS)}")
    return gpu


def vllm_versions(vllm: str | None, installed: dict[str, str] | None) -> tuple[str, str] | Verdict:
    """(vLLM version, its compressed-tensors) of the named version (from the table) or the installed vLLM env
    (its marker); a skip verdict when neither is known."""
    if vllm is None:
        if installed is None:
            return Verdict("compressed-tensors", "skip", "no vLLM environment here; pass --vllm VERSION to check one")
        return installed["vllm"], installed["compressed_tensors"]
    release = vllm_release(vllm)
    if release not in VLLM_COMPRESSED_TENSORS:
        known = ", ".join(sorted(VLLM_COMPRESSED_TENSORS, key=Version))
        text = f"vLLM {vllm} is not in qpipe's table ({known}); its pin is in vLLM's requirements/common.txt"
        return Verdict("compressed-tensors", "skip", text)
    return vllm, VLLM_COMPRESSED_TENSORS[release]


@dataclass(frozen=True)
class Target:
    """Where and how the artifact is to be served."""

    gpu: Gpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings, as vLLM defaults
    utilization: float = DEFAULT_UTILIZATION
    vllm: str | None = None  # None: the installed vLLM environment
    tensor_parallel_size: int = 1
    kv_cache_bytes: int | None = None


def preflight(model_dir: Path, target: Target, installed: dict[str, str] | None) -> list[Verdict]:
    """Every rule's verdict for `model_dir` on `target`; `installed`: the vLLM env's versions, if there is one."""
    artifact = read_artifact(model_dir)
    max_model_len = target.max_model_len or artifact.max_positions
    if max_model_len is None:
        raise PipelineError(f"{model_dir}/config.json: no max_position_embeddings; pass --max-model-len")
    versions = vllm_versions(target.vllm, installed)
    return [
        compute_rule(artifact.quantization, target.gpu),
        memory_rule(
            artifact,
            target.gpu,
            max_model_len,
            target.utilization,
            target.tensor_parallel_size,
            target.kv_cache_bytes,
        ),
        versions if isinstance(versions, Verdict) else compressed_tensors_rule(artifact.quantization, *versions),
    ]


def exit_code(verdicts: list[Verdict]) -> int:
    """0 when vLLM will serve it as asked, 2 when a rule says it will not."""
    return 2 if any(v.status == "fail" for v in verdicts) else 0
