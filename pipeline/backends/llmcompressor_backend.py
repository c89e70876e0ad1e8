"""llm-compressor backend: `oneshot` with modifiers built from the recipe; writes compressed-tensors."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from pipeline.backends import patches
from pipeline.backends.tuning import (
    Placement,
    TuningPlan,
    oneshot_overrides,
    placement_for,
    plan_tuning,
    tuned_engine,
)
from pipeline.recipe.schema import QuantizeSpec

# Safetensors shards of at most this size (llm-compressor's default is 20 GB): an 8B int4 model is three files
# that the export stage hashes side by side (one 6 GB file took 5 s to hash on an H200 host) and loaders read
# in parallel.
SHARD_SIZE = "2GB"


def scheme_arguments(spec: QuantizeSpec) -> dict[str, Any]:
    """`scheme=` for a plain preset, or `config_groups=` when single arguments are overridden."""
    common = {"targets": spec.targets, "ignore": spec.ignore}
    if spec.group_size is None and spec.symmetric is None:
        return {**common, "scheme": spec.scheme}
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(spec.scheme, spec.targets)
    if spec.group_size is not None:
        scheme.weights.group_size = spec.group_size
    if spec.symmetric is not None:
        scheme.weights.symmetric = spec.symmetric
    return {**common, "config_groups": {"group_0": scheme}}


def build_modifiers(spec: QuantizeSpec) -> list[Any]:
    """The llm-compressor modifier list for method + scheme (+ optional SmoothQuant)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    modifiers: list[Any] = []
    if spec.smoothquant_strength is not None:
        modifiers.append(SmoothQuantModifier(smoothing_strength=spec.smoothquant_strength))
    if spec.method == "awq":
        modifiers.append(AWQModifier())
    if spec.method == "gptq":
        extra: dict[str, Any] = {}
        if spec.dampening_frac is not None:
            extra["dampening_frac"] = spec.dampening_frac
        if spec.actorder is not None:
            extra["actorder"] = spec.actorder
        modifiers.append(GPTQModifier(**scheme_arguments(spec), **extra))
    else:
        modifiers.append(QuantizationModifier(**scheme_arguments(spec)))
    return modifiers


def cpu_pinning_disabled() -> AbstractContextManager[None]:
    """llm-compressor's AWQ pins cached activations, which fails on CPU-only torch; a no-op with an accelerator."""
    return nullcontext() if torch.accelerator.is_available() else patches.llmcompressor_no_pinning()


def compress_in_place(model: Any) -> None:
    """Compress the model's quantized modules now, as llm-compressor's save would first; modules already
    compressed are skipped, so the save's own pass then finds nothing left to do."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import as_single_threaded

    with as_single_threaded():
        ModelCompressor.from_pretrained_model(model).compress_model(model, skip_compressed=True)


def gpu_resident(model: Any) -> bool:
    """Whether every parameter and buffer is on a GPU (none offloaded to the host or to disk)."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def save_compressed(model: Any, out_dir: Path) -> dict[str, float]:
    """llm-compressor's compressed save (a collective one in a distributed run: every rank calls it, rank 0
    writes). A GPU-resident model is compressed first, on its own (see `pipeline.backends.dist_worker` for why
    ranks must); returns that step's seconds as `compress_s`, nothing when it did not run."""
    parts: dict[str, float] = {}
    if gpu_resident(model):
        started = time.perf_counter()
        compress_in_place(model)
        parts["compress_s"] = round(time.perf_counter() - started, 2)
    model.save_pretrained(str(out_dir), save_compressed=True, max_shard_size=SHARD_SIZE)
    return parts


class Backend:
    """Quantizes in memory with `oneshot`; `save` writes compressed safetensors + quantization_config."""

    def __init__(self) -> None:
        self.tuning: TuningPlan | None = None  # the plan of the last `quantize` call
        self.placement: Placement | None = None  # where the last `load` put the weights

    def load(self, path: Path, spec: QuantizeSpec, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
        """On the GPU when `placement_for` says the model fits there, else on the host (onloaded per layer)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.placement = placement_for(path, spec, dtype, trust_remote_code)
        where = {"device_map": "cuda"} if self.placement.device == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **where)
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]:
        info = {"modifiers": [type(m).__name__ for m in build_modifiers(spec)], "format": "compressed-tensors"}
        if self.placement is not None:
            info["placement"] = self.placement.model_dump()
        if self.tuning is not None:
            info["tuning"] = self.tuning.model_dump()
        return info

    def quantize(
        self,
        model: Any,
        tokenizer: Any,
        calibration: Any,
        spec: QuantizeSpec,
        seed: int,
        log_dir: Path | None = None,
        plan: TuningPlan | None = None,
    ) -> Any:
        """Run `oneshot`; `plan` overrides the tuned settings `plan_tuning` would choose (benchmarks).
        `log_dir` is unused: llm-compressor writes no files of its own."""
        from llmcompressor import oneshot

        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {}
        lengths = None
        if calibration is not None:
            lengths = [len(ids) for ids in calibration["input_ids"]]
            kwargs = {
                "dataset": calibration,
                "num_calibration_samples": len(calibration),
                "shuffle_calibration_samples": False,  # the calibrate stage already shuffled with the seed
                "batch_size": spec.batch_size,
                "max_seq_length": max(lengths),
            }
        self.tuning = plan or plan_tuning(model, lengths, spec)
        kwargs.update(oneshot_overrides(self.tuning, calibration))
        with cpu_pinning_disabled(), tuned_engine(self.tuning, model):
            return oneshot(model=model, processor=tokenizer, recipe=build_modifiers(spec), **kwargs)

    def save(self, model: Any, tokenizer: Any, out_dir: Path, dtype: Any = None) -> None:
        """`dtype`: the checkpoint's own dtype, whatever dtype calibration ran in."""
        if dtype is not None:
            model.to(dtype)
        from llmcompressor.core import active_session

        save_compressed(model, out_dir)
        tokenizer.save_pretrained(str(out_dir))
        active_session().reset()  # its lifecycle holds the model; saving (which writes recipe.yaml) was its last use
