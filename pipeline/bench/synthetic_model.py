"""Seeded random-weight models of a named architecture, built from a config (no download), for benchmarks.

Timing on random weights is valid for speed; quality is checked by comparing quantized paths on the same
weights. For the benchmark the model is built directly on the target device and only ``config.json`` and a
small offline tokenizer are written to disk, because ``oneshot`` wants ``name_or_path`` to be a folder holding a
config and a processor object when a dataset is given. ``save_checkpoint`` writes a whole Hugging Face
directory instead (``qpipe synth-model``), so every stage can run on a real-size checkpoint as users' would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt

INIT_STD = 0.02  # transformers' default initializer_range, so activations stay in range through depth
TOKENIZER_WORDS = 256


class ModelShape(BaseModel):
    """Dimensions of a Qwen3-architecture causal LM."""

    model_config = ConfigDict(frozen=True)

    name: str
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    vocab_size: PositiveInt

    def parameter_count(self) -> int:
        """Parameters of the model (untied embeddings)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size + 2 * self.head_dim
        return self.num_layers * (attn + mlp + norms) + 2 * self.vocab_size * self.hidden_size + self.hidden_size


QWEN3_8B = ModelShape(
    name="qwen3-8b",
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
)


def scaled_shape(base: ModelShape, layers: int | None = None, scale: float = 1.0) -> ModelShape:
    """`base` with fewer layers and/or widths times `scale` (multiples of 128, so 128-groups fit; CPU tests)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1]; got {scale}")

    def dim(value: int, multiple: int) -> int:
        return max(multiple, round(value * scale / multiple) * multiple)

    heads = max(1, round(base.num_heads * scale))
    kv_heads = max(1, round(base.num_kv_heads * scale))
    while heads % kv_heads:
        kv_heads -= 1
    name = base.name
    if layers is not None and layers != base.num_layers:
        name += f"-{layers}l"
    if scale != 1:
        name += f"-x{scale:g}"
    return ModelShape(
        name=name,
        hidden_size=dim(base.hidden_size, 128),
        intermediate_size=dim(base.intermediate_size, 128),
        num_layers=layers or base.num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=base.head_dim,
        vocab_size=dim(base.vocab_size, 64),
    )


def qwen3_config(shape: ModelShape) -> Any:
    """A `Qwen3Config` for `shape` (untied embeddings, no KV cache during calibration)."""
    from pipeline.demo.model import qwen3_config as config_for

    return config_for(shape, max_position_embeddings=40960, use_cache=False)


def synthetic_tokenizer() -> Any:
    """A small offline word-level tokenizer (the benchmark feeds token ids directly; oneshot wants an object)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(TOKENIZER_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def write_model_dir(shape: ModelShape, directory: Path) -> Path:
    """Write `config.json` and the tokenizer for `shape` into `directory` (weights stay in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    qwen3_config(shape).save_pretrained(str(directory))
    synthetic_tokenizer().save_pretrained(str(directory))
    return directory


@torch.no_grad()
def build_model(
    shape: ModelShape, seed: int, device: str | torch.device, model_dir: Path, dtype: torch.dtype = torch.bfloat16
) -> Any:
    """A `Qwen3ForCausalLM` of `shape` with seeded N(0, 0.02) weights and unit norms, built on `device`.

    The same (shape, seed, device) gives bit-identical weights. `model_dir` (see `write_model_dir`) becomes
    the model's `name_or_path`.
    """
    from transformers import AutoModelForCausalLM

    config = qwen3_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():
        if param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, INIT_STD, generator=generator)
    model.eval()
    model.name_or_path = str(model_dir)
    model.config._name_or_path = str(model_dir)
    return model


def random_token_ids(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Seeded uniform random token ids, shape (num_samples, seq_len), on CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)


def calibration_dataset(token_ids: torch.Tensor) -> Any:
    """A tokenized `datasets.Dataset` (input_ids + attention_mask), as the calibrate stage produces."""
    from datasets import Dataset

    ids = token_ids.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


SYNTH_INFO_FILE = "synthetic-model.json"


def save_checkpoint(shape: ModelShape, directory: Path, seed: int, device: str) -> Path:
    """Write a Hugging Face checkpoint of `shape` with seeded random bf16 weights into `directory` (atomically).

    The tokenizer is the demo model's byte-level BPE with its chat template (trained in seconds from the embedded
    corpus), so MMLU and calibration text tokenize into real ids that lm-eval, llm-compressor and vLLM accept;
    the embedding rows past its vocabulary are never looked up, as in real checkpoints with padded vocabularies.
    """
    import json

    from transformers import GenerationConfig

    from pipeline.demo import corpus as demo_corpus
    from pipeline.demo.model import DemoModelSpec, train_tokenizer
    from pipeline.run.files import atomic_directory

    tokenizer = train_tokenizer(demo_corpus.training_texts(DemoModelSpec.train_documents), DemoModelSpec())
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"vocab_size {shape.vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    with atomic_directory(directory) as tmp:
        model = build_model(shape, seed, device, tmp)
        model.config.use_cache = True  # a checkpoint for inference; calibration turns it off itself
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "shape": shape.model_dump(),
            "seed": seed,
            "parameters": shape.parameter_count(),
            "init_std": INIT_STD,
        }
        (tmp / SYNTH_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        del model
    return directory
