"""Next-token fidelity of a quantized model against its base: mean KL(base || quant) and top-1 agreement.

One model is resident at a time: the base model's log-probs are computed and kept, the base is freed, then
the quantized model is loaded and compared batch by batch. On a GPU both run there in the checkpoint's dtype,
so the peak is about one model plus the kept log-probs (an 8B model: ~16 GiB + ~2.5 GiB), not two float32
copies in host memory; on a CPU they run in float32 (bf16 matmuls are slow on CPUs without native bf16).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.recipe.schema import CalibrateSpec, EvalSpec
from pipeline.run.resources import default_device, release_accelerator_memory


def is_compressed_tensors(model_dir: Path) -> bool:
    """Whether ``model_dir``'s config.json declares a compressed-tensors quantization."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def load_causal_lm(
    model_dir: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> Any:
    """Load a causal LM for inference on `device`; compressed-tensors checkpoints are dequantized at load time.

    `dtype` "auto" keeps the checkpoint's own dtype."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if is_compressed_tensors(model_dir):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, device_map=device, trust_remote_code=trust_remote_code, **kwargs
    ).eval()


def next_token_fidelity(
    base_model_dir: Path,
    quant_model_dir: Path,
    texts: list[str],
    max_length: int,
    batch_size: int,
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Mean next-token KL(base || quant) and top-1 agreement over all non-pad positions of ``texts``, and both
    summed per text (`per_text`) for the token-level gate's interval.

    Both models see the same token ids (from the base tokenizer: `tokenizer` if the caller loaded it already; it
    is set to pad on the right); log-softmax and KL are computed in float32. `device` defaults to the GPU when
    there is one.
    """
    import torch
    from transformers import AutoTokenizer

    start = time.perf_counter()
    device = device or default_device()
    dtype = "auto" if device != "cpu" else "float32"
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    batches = [
        tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        for i in range(0, len(texts), batch_size)
    ]
    base_logps = _all_log_probs(load_causal_lm(base_model_dir, dtype, device, trust_remote_code), batches)
    release_accelerator_memory()
    quant = load_causal_lm(quant_model_dir, dtype, device, trust_remote_code)
    kl: list[float] = []
    agree: list[float] = []
    tokens: list[int] = []
    with torch.inference_mode():
        for batch, base_logp in zip(batches, base_logps, strict=True):
            quant_logp = _log_probs(quant, batch)
            kl += per_text(kl_per_position(base_logp, quant_logp), batch)
            agree += per_text(base_logp.argmax(-1) == quant_logp.argmax(-1), batch)
            tokens += batch["attention_mask"].sum(1).tolist()
    del quant, base_logps
    release_accelerator_memory()
    if sum(tokens) == 0:
        raise ValueError("next_token_fidelity: the texts produced no tokens")
    return {
        "kl_mean": sum(kl) / sum(tokens),
        "top1_agreement": sum(agree) / sum(tokens),
        "tokens": sum(tokens),
        "texts": len(texts),
        "per_text": {"kl": kl, "top1": [round(a) for a in agree], "tokens": tokens},
        "device": device,
        "wall_s": round(time.perf_counter() - start, 3),
    }


def per_text(per_position: Any, batch: Any) -> list[float]:
    """Sums of a per-position figure over each text of the batch (positions in `_log_probs`' order: row-major over
    the non-pad positions), so the gate can resample texts, the unit whose tokens are not independent."""
    import torch

    mask = batch["attention_mask"].bool()
    rows = mask.nonzero()[:, 0].to(per_position.device)
    sums = torch.zeros(mask.shape[0], dtype=torch.float64, device=per_position.device)
    return sums.index_add_(0, rows, per_position.double()).tolist()


def kl_per_position(reference: Any, other: Any) -> Any:
    """KL(reference || other) at each position, from log-probs of shape (tokens, vocab)."""
    return (reference.exp() * (reference - other)).sum(-1)


def kl_total(reference: Any, other: Any) -> float:
    """KL(reference || other) summed over positions."""
    return float(kl_per_position(reference, other).sum())


def mean_kl(reference: list[Any], other: list[Any]) -> float:
    """Mean per-token KL(reference || other) over matching lists of (tokens, vocab) log-probs."""
    total = sum(kl_total(ref, oth) for ref, oth in zip(reference, other, strict=True))
    return total / sum(ref.shape[0] for ref in reference)


def _all_log_probs(model: Any, batches: list[Any]) -> list[Any]:
    """The model's log-probs for every batch (kept on the model's device); the caller frees the model."""
    import torch

    with torch.inference_mode():
        return [_log_probs(model, batch) for batch in batches]


def _log_probs(model: Any, batch: Any) -> Any:
    """Float32 log-softmax of the logits at the non-pad positions, shape (tokens, vocab)."""
    import torch

    device = model.device
    mask = batch["attention_mask"].bool().to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return torch.log_softmax(logits[mask].float(), dim=-1)


def held_out_fidelity(
    spec: EvalSpec, base_model_dir: Path, quant_model_dir: Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """`next_token_fidelity` on the eval stage's held-out texts (`eval.fidelity_dataset`, `fidelity_samples`,
    `fidelity_max_length`), as the gate measures it."""
    from transformers import AutoTokenizer

    from pipeline.run.text_data import select_texts

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir, trust_remote_code=trust_remote_code)
    texts = select_texts(CalibrateSpec(dataset=spec.fidelity_dataset, num_samples=spec.fidelity_samples), tokenizer)
    return next_token_fidelity(
        base_model_dir,
        quant_model_dir,
        texts,
        spec.fidelity_max_length,
        batch_size=4,
        trust_remote_code=trust_remote_code,
        tokenizer=tokenizer,
    )
