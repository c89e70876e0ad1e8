"""Next-token fidelity of a quantized model against its base: mean KL(base || quant) and top-1 agreement."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def is_compressed_tensors(model_dir: Path) -> bool:
    """Whether ``model_dir``'s config.json declares a compressed-tensors quantization."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def load_causal_lm(model_dir: Path, dtype: str = "float32") -> Any:
    """Load a causal LM for CPU inference; compressed-tensors checkpoints are dequantized at load time."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if is_compressed_tensors(model_dir):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", **kwargs).eval()


def next_token_fidelity(
    base_model_dir: Path,
    quant_model_dir: Path,
    texts: list[str],
    max_length: int,
    batch_size: int,
    dtype: str = "float32",
) -> dict[str, float | int]:
    """Mean next-token KL(base || quant) and top-1 agreement over all non-pad positions of ``texts``.

    Both models see the same token ids (from the base tokenizer); logits are compared in float32.
    """
    import torch
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    base = load_causal_lm(base_model_dir, dtype)
    quant = load_causal_lm(quant_model_dir, dtype)
    kl_sum, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            mask = batch["attention_mask"].bool()
            base_logp = _log_probs(base, batch, mask)
            quant_logp = _log_probs(quant, batch, mask)
            kl_sum += torch.sum(base_logp.exp() * (base_logp - quant_logp)).item()
            agree += int((base_logp.argmax(-1) == quant_logp.argmax(-1)).sum())
            tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("next_token_fidelity: the texts produced no tokens")
    return {
        "kl_mean": kl_sum / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
        "texts": len(texts),
        "wall_s": round(time.perf_counter() - start, 3),
    }


def _log_probs(model: Any, batch: Any, mask: Any) -> Any:
    """Float32 log-softmax of the logits at the non-pad positions, shape (tokens, vocab)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[mask].float(), dim=-1)
