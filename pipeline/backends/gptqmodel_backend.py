"""GPTQModel backend: GPTQ and AWQ in their native checkpoint formats (`quant_method: gptq` / `awq`).

GPTQModel (ModelCloud) is the maintained successor of AutoGPTQ and AutoAWQ; transformers, vLLM, SGLang and
TGI load its output as `quantization="gptq"` / `"awq"`. It loads the model itself (its own wrapper around
the transformers model), so this backend implements `load` as well as `quantize` and `save`.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.backends import patches
from pipeline.formats import DEFAULT_GROUP_SIZE, SCHEMES
from pipeline.recipe.schema import QuantizeSpec


def cpu_workers() -> str:
    """GPTQModel's CPU thread pool needs at least two workers (one per virtual pool); its default is
    half the cores, which is one on a 2-core machine and fails ("requests 2 workers but parent has 1")."""
    return str(max(2, (os.cpu_count() or 2) // 2))


def import_gptqmodel() -> Any:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", cpu_workers())
    import gptqmodel

    return gptqmodel


def quantize_config(spec: QuantizeSpec) -> Any:
    """GPTQModel's config for the recipe: bits and symmetry from the scheme, group size, GPTQ damping.

    Finished layers are offloaded to disk on GPU (the engine's default, for large models); on CPU they stay
    in memory so that `save` can cast a model calibrated in float32 back to the checkpoint's dtype."""
    import torch
    from gptqmodel.quantization.config import AWQConfig, GPTQConfig

    scheme = SCHEMES[spec.scheme]
    common = {
        "bits": scheme.weight_bits,
        "group_size": spec.group_size or DEFAULT_GROUP_SIZE,
        "sym": scheme.symmetric if spec.symmetric is None else spec.symmetric,
        "offload_to_disk": torch.cuda.is_available(),
    }
    if spec.method == "awq":
        return AWQConfig(**common)
    extra = {"damp_percent": spec.dampening_frac} if spec.dampening_frac is not None else {}
    return GPTQConfig(**common, **extra)


def calibration_rows(calibration: Any) -> list[dict[str, list[int]]]:
    """The tokenized calibration set as the list of {input_ids, attention_mask} GPTQModel takes."""
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration["input_ids"]]


def packed_rows(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """AWQ's scale search concatenates the captured activations of all batches only when they have one
    length; with samples of varying length it keeps the last batch alone (250 of 5158 tokens on the demo
    model: KL 0.0101 vs 0.0035 for llm-compressor's AWQ). The samples are packed end to end into rows of
    the longest sample's length; the tail shorter than one row is dropped."""
    length = max(len(r["input_ids"]) for r in rows)
    tokens = [t for r in rows for t in r["input_ids"]]
    chunks = [tokens[i : i + length] for i in range(0, len(tokens) - length + 1, length)]
    return [{"input_ids": c, "attention_mask": [1] * length} for c in chunks]


def kernel_backend(spec: QuantizeSpec) -> Any:
    """AWQ picks a CUDA GEMM kernel by default, even on CPU; the torch kernel runs everywhere."""
    import torch
    from gptqmodel.utils.backend import BACKEND

    if spec.method == "awq" and not torch.cuda.is_available():
        return BACKEND.AWQ_TORCH
    return BACKEND.AUTO


class Backend:
    """GPTQ (format `gptq`) or AWQ (format `gemm`) through GPTQModel."""

    def load(
        self, path: Path, spec: QuantizeSpec, dtype: str, trust_remote_code: bool, tokenizer: Any
    ) -> tuple[Any, Any]:
        """GPTQModel loads the model with a tokenizer wrapper of its own, which its `quantize` expects."""
        import torch

        gptqmodel = import_gptqmodel()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if spec.method == "awq" and dtype == "float32":
            dtype = "bfloat16"  # GPTQModel packs AWQ layers from 16-bit weights only
        model = gptqmodel.GPTQModel.load(
            str(path),
            quantize_config(spec),
            dtype=getattr(torch, dtype) if dtype != "auto" else "auto",
            device=device,
            trust_remote_code=trust_remote_code,
        )
        return model, model.tokenizer

    def quantize(
        self, model: Any, tokenizer: Any, calibration: Any, spec: QuantizeSpec, seed: int, log_dir: Path | None = None
    ) -> Any:
        """`log_dir`: where GPTQModel's per-layer logs go (its default is `logs/` of the working directory)."""
        import torch

        torch.manual_seed(seed)
        rows = calibration_rows(calibration)
        with patches.gptqmodel_log_dir(log_dir) if log_dir is not None else nullcontext():
            model.quantize(
                packed_rows(rows) if spec.method == "awq" else rows,
                batch_size=spec.batch_size,
                backend=kernel_backend(spec),
                calibration_sort=None,  # keep the calibrate stage's seeded order
            )
        return model

    def save(self, model: Any, tokenizer: Any, out_dir: Path, dtype: Any = None) -> None:
        """`dtype`: the checkpoint's own dtype; vLLM's GPTQ/AWQ kernels take 16-bit activations."""
        if dtype is not None and model.model.dtype != dtype:
            model.model.to(dtype)
        model.save(str(out_dir))  # writes the tokenizer too

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]:
        from gptqmodel.version import __version__

        config = quantize_config(spec)
        return {
            "engine": f"gptqmodel {__version__}",
            "format": spec.method,
            "checkpoint_format": str(config.format.value),
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
        }
