"""llm-compressor backend: `oneshot` with modifiers built from the recipe; writes compressed-tensors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.backends.tuning import TuningPlan, oneshot_overrides, plan_tuning, tuned_engine
from pipeline.recipe.schema import QuantizeSpec


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


@contextmanager
def cpu_pinning_disabled() -> Iterator[None]:
    """llm-compressor 0.14 AWQ pins cached activations for faster host-to-device copies, which fails
    ("Cannot access accelerator device when none is available") on CPU-only torch. Without an
    accelerator there is no copy to speed up, so pinning becomes a no-op for the duration."""
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


class Backend:
    """Quantizes in memory with `oneshot`; `save` writes compressed safetensors + quantization_config."""

    def __init__(self) -> None:
        self.tuning: TuningPlan | None = None  # the plan of the last `quantize` call

    def load(self, path: Path, spec: QuantizeSpec, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def describe(self, spec: QuantizeSpec) -> dict[str, Any]:
        info = {"modifiers": [type(m).__name__ for m in build_modifiers(spec)], "format": "compressed-tensors"}
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
        plan: TuningPlan | None = None,
    ) -> Any:
        """Run `oneshot`; `plan` overrides the tuned settings `plan_tuning` would choose (benchmarks)."""
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
        with cpu_pinning_disabled(), tuned_engine(self.tuning):
            return oneshot(model=model, processor=tokenizer, recipe=build_modifiers(spec), **kwargs)

    def save(self, model: Any, tokenizer: Any, out_dir: Path, dtype: Any = None) -> None:
        """`dtype`: the checkpoint's own dtype, whatever dtype calibration ran in."""
        if dtype is not None:
            model.to(dtype)
        from llmcompressor.core import active_session

        model.save_pretrained(str(out_dir), save_compressed=True)
        tokenizer.save_pretrained(str(out_dir))
        active_session().reset()  # its lifecycle holds the model; saving (which writes recipe.yaml) was its last use
