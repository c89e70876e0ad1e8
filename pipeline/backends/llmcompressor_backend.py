"""llm-compressor backend: `oneshot` with modifiers built from the recipe; writes compressed-tensors."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from pipeline.backends import patches
from pipeline.backends.pinned_load import pinned_loading
from pipeline.backends.tuning import (
    Placement,
    TuningPlan,
    gpu_resident,
    oneshot_overrides,
    placement_for,
    plan_tuning,
    tuned_engine,
    world_size,
)
from pipeline.recipe.schema import QuantizeSpec

# Safetensors shards of at most this size (llm-compressor's default is 20 GB): an 8B int4 model is three files
# that the export stage hashes side by side (one 6 GB file took 5 s to hash on an H200 host) and loaders read
# in parallel.
SHARD_SIZE = "2GB"
SHARD_NAME = re.compile(r"-(\d{5})-of-\d{5}\.safetensors$")  # transformers' shard files: model-00002-of-00004


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


def shard_of_rank(filename: str, rank: int, world_size: int) -> bool:
    """Whether `rank` writes this shard: shard k of a sharded save goes to rank (k - 1) mod N, so every rank
    copies and writes about 1/N of the model; an unsharded file goes to rank 0."""
    match = SHARD_NAME.search(filename)
    return (int(match.group(1)) - 1) % world_size == rank if match else rank == 0


def rank_shard_writer(write: Callable[..., Any], rank: int, world_size: int, out_dir: Path) -> Callable[..., Any]:
    """A stand-in for safetensors' `save_file` that writes only this rank's shards, into `out_dir` (ranks other
    than 0 run transformers' save in a scratch folder, whose other files are dropped)."""

    def save_file(tensors: dict[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
        name = Path(filename).name
        if shard_of_rank(name, rank, world_size):
            write(tensors, str(out_dir / name), metadata=metadata)

    return save_file


def save_compressed(
    model: Any, out_dir: Path, *, replica: bool | None = None, max_shard_size: str | None = None
) -> dict[str, float]:
    """llm-compressor's compressed save (a collective one in a distributed run: every rank calls it).

    `replica` (default: the model is GPU-resident) says this process holds the whole model in memory of its own,
    as each rank of a GPU-resident run does. Such a model is compressed first, on its own (see
    `pipeline.backends.dist_worker` for why ranks must; `compress_s` is that step), and in a process group every
    rank then writes its share of the shards (`shard_of_rank`), rank 0 the rest of the folder: copying tensors
    into new host memory is most of a save, and it runs at about 1.4 GB/s per process on the H200 hosts (faster
    across processes, not across threads: docs/BENCHMARKS.md). `max_shard_size`: `SHARD_SIZE` by default."""
    parts: dict[str, float] = {}
    max_shard_size = max_shard_size or SHARD_SIZE
    replica = gpu_resident(model) if replica is None else replica
    if replica:
        started = time.perf_counter()
        compress_in_place(model)
        parts["compress_s"] = round(time.perf_counter() - started, 2)
    ranks = world_size()
    if replica and ranks > 1:
        _save_rank_share(model, out_dir, torch.distributed.get_rank(), ranks, max_shard_size)
    else:  # in a process group every rank calls it and llm-compressor writes on rank 0
        model.save_pretrained(str(out_dir), save_compressed=True, max_shard_size=max_shard_size)
    return parts


def _save_rank_share(model: Any, out_dir: Path, rank: int, world_size: int, max_shard_size: str) -> None:
    """This rank's shards into `out_dir`, and on rank 0 the rest of the folder; rank 0 alone writes all when
    the shard split does not apply to this transformers."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = rank_shard_writer(save_file, rank, world_size, out_dir)
    with patches.shards_on_every_rank(writer) as split, tempfile.TemporaryDirectory() as scratch:
        # ranks other than 0 save into a scratch folder: only their shards go to `out_dir`
        target = scratch if split and rank > 0 else str(out_dir)
        model.save_pretrained(target, save_compressed=True, max_shard_size=max_shard_size)


class Backend:
    """Quantizes in memory with `oneshot`; `save` writes compressed safetensors + quantization_config."""

    def __init__(self) -> None:
        self.tuning: TuningPlan | None = None  # the plan of the last `quantize` call
        self.placement: Placement | None = None  # where the last `load` put the weights

    def load(
        self, path: Path, spec: QuantizeSpec, dtype: str, trust_remote_code: bool, tokenizer: Any
    ) -> tuple[Any, Any]:
        """On the GPU when `placement_for` says the model fits there, else on the host (onloaded per layer)."""
        from transformers import AutoModelForCausalLM

        self.placement = placement_for(path, spec, dtype, trust_remote_code)
        where = {"device_map": "cuda"} if self.placement.device == "cuda" else {}
        with pinned_loading() if where else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, **where
            )
        return model, tokenizer

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
