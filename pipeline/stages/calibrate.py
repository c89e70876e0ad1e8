"""Calibrate stage: load, shuffle, render and tokenize the calibration set; cache it in the run dir."""

from __future__ import annotations

from typing import Any

from pipeline.recipe.schema import Recipe
from pipeline.run.context import RunContext
from pipeline.run.files import atomic_directory
from pipeline.run.manifest import fingerprint
from pipeline.run.text_data import dataset_identity, select_texts


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary/merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items()))
    return fingerprint(body, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None))


def calibration_fingerprint(recipe: Recipe, tokenizer: Any) -> str:
    spec = recipe.calibrate
    return fingerprint("calibrate/v1", dataset_identity(spec), tokenizer_fingerprint(tokenizer), spec.model_dump())


def run_calibrate(recipe: Recipe, ctx: RunContext) -> dict[str, Any]:
    """Tokenize N samples x max length and save them (datasets format) under <run>/calibration/."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    spec = recipe.calibrate
    tokenizer = AutoTokenizer.from_pretrained(ctx.source.path, trust_remote_code=recipe.model.trust_remote_code)
    texts = select_texts(spec, tokenizer)
    if len(texts) < spec.num_samples:
        ctx.log.warning("calibrate: only %d samples available (asked for %d)", len(texts), spec.num_samples)
    chat = spec.uses_chat_template
    encoded = tokenizer(texts, truncation=True, max_length=spec.max_seq_length, add_special_tokens=not chat)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    with atomic_directory(ctx.calibration_dir) as tmp:
        dataset.save_to_disk(str(tmp))
    lengths = [len(ids) for ids in encoded["input_ids"]]
    return {
        "dataset": dataset_identity(spec),
        "samples": len(lengths),
        "tokens": sum(lengths),
        "min_len": min(lengths),
        "mean_len": round(sum(lengths) / len(lengths), 1),
        "max_len": max(lengths),
        "chat_template": chat,
        "path": "calibration",
    }
