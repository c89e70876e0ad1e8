"""Calibrate stage: load, shuffle, render and tokenize the calibration set; cache it in the run dir."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.recipe.schema import CalibrateSpec, Recipe
from pipeline.run.context import RunContext
from pipeline.run.files import atomic_directory
from pipeline.run.manifest import fingerprint
from pipeline.run.model_source import ModelSource, tokenizer_fingerprint
from pipeline.run.text_data import dataset_identity, iter_texts, select_texts


def calibration_fingerprint(recipe: Recipe, source: ModelSource) -> str:
    spec = recipe.calibrate
    return fingerprint("calibrate/v2", dataset_identity(spec), tokenizer_fingerprint(source), spec.model_dump())


def truncated_samples(spec: CalibrateSpec, tokenizer: Any) -> tuple[list[list[int]], int]:
    """The first N texts, each one sample cut at max_seq_length (lengths vary with the text)."""
    texts = select_texts(spec, tokenizer)
    encoded = tokenizer(
        texts, truncation=True, max_length=spec.max_seq_length, add_special_tokens=not spec.uses_chat_template
    )
    return encoded["input_ids"], len(texts)


def packed_samples(spec: CalibrateSpec, tokenizer: Any) -> tuple[list[list[int]], int]:
    """Texts tokenized and concatenated with EOS after each, cut into N samples of exactly max_seq_length tokens
    (the GPTQ paper's protocol on C4): as many texts are taken as the token budget needs; a last, shorter piece
    is dropped."""
    if tokenizer.eos_token_id is None:
        raise PipelineError("calibrate.pack: the tokenizer has no EOS token to separate the texts; set pack: false")
    length, budget = spec.max_seq_length, spec.num_samples * spec.max_seq_length
    stream: list[int] = []
    texts = 0
    for text in iter_texts(spec, tokenizer):
        stream += tokenizer(text, add_special_tokens=not spec.uses_chat_template)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        texts += 1
        if len(stream) >= budget:
            break
    if len(stream) < length:
        raise PipelineError(
            f"calibrate.pack: {spec.dataset} holds {len(stream)} tokens, fewer than one sample of "
            f"max_seq_length {length}; lower calibrate.max_seq_length, add data or set pack: false"
        )
    return [stream[i : i + length] for i in range(0, min(len(stream), budget) - length + 1, length)], texts


def run_calibrate(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Tokenize N samples (one text each, or packed) and save them (datasets format) under <run>/calibration/."""
    from datasets import Dataset

    spec = recipe.calibrate
    tokenizer = ctx.tokenizer()
    samples, texts = (packed_samples if spec.pack else truncated_samples)(spec, tokenizer)
    if len(samples) < spec.num_samples:
        ctx.log.warning("calibrate: only %d samples available (asked for %d)", len(samples), spec.num_samples)
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(ids) for ids in samples]})
    with atomic_directory(ctx.calibration_dir) as tmp:
        dataset.save_to_disk(str(tmp))
    lengths = [len(ids) for ids in samples]
    return {
        "dataset": dataset_identity(spec),
        "texts": texts,
        "packed": spec.pack,
        "samples": len(lengths),
        "tokens": sum(lengths),
        "min_len": min(lengths),
        "mean_len": round(sum(lengths) / len(lengths), 1),
        "max_len": max(lengths),
        "chat_template": spec.uses_chat_template,
        "path": "calibration",
    }
