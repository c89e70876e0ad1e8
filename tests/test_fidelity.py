"""Next-token fidelity: zero against itself, positive against a perturbed or W4A16 copy, batch-invariant."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.eval.fidelity import held_out_fidelity, is_compressed_tensors, next_token_fidelity

TEXTS = [
    "The quantized model should predict the same next token as the original one.",
    "Calibration data decides the scales.",
    "Short.",
    "A longer sentence about weights, activations and the error that rounding them adds to every layer.",
]


@pytest.fixture(scope="module")
def perturbed_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with seeded Gaussian noise (5% of each tensor's std) on every weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std().nan_to_num())
    out = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def w4a16_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized data-free to W4A16 by llm-compressor and saved compressed (pack-quantized)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]))
    out = tmp_path_factory.mktemp("w4a16")
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_model_against_itself_is_identical(tiny_model_dir: Path) -> None:
    result = next_token_fidelity(tiny_model_dir, tiny_model_dir, TEXTS, max_length=64, batch_size=2)
    assert result["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert result["texts"] == len(TEXTS) and result["tokens"] > len(TEXTS)
    assert result["wall_s"] > 0
    per_text = result["per_text"]
    assert per_text["top1"] == per_text["tokens"] and sum(per_text["tokens"]) == result["tokens"]
    assert len(per_text["kl"]) == len(TEXTS) and max(abs(k) for k in per_text["kl"]) < 1e-4


def test_held_out_fidelity_loads_the_base_tokenizer_once(
    tiny_model_dir: Path, perturbed_model: Path, tokenizer_loads: list[str]
) -> None:
    """The held-out texts are chosen and tokenized with one load of the base tokenizer (a Qwen-sized one took
    1.3-1.5 s to load on a 2-core CPU)."""
    from pipeline.recipe.schema import EvalSpec

    result = held_out_fidelity(EvalSpec(fidelity_samples=4, fidelity_max_length=32), tiny_model_dir, perturbed_model)
    assert tokenizer_loads == [str(tiny_model_dir)]
    assert result["texts"] == 4 and result["kl_mean"] > 1e-4


def test_perturbed_copy_diverges(tiny_model_dir: Path, perturbed_model: Path) -> None:
    result = next_token_fidelity(tiny_model_dir, perturbed_model, TEXTS, max_length=64, batch_size=2)
    assert result["kl_mean"] > 1e-4
    assert 0.0 < result["top1_agreement"] < 1.0


def test_padding_and_truncation_do_not_change_the_result(tiny_model_dir: Path, perturbed_model: Path) -> None:
    one = next_token_fidelity(tiny_model_dir, perturbed_model, TEXTS, max_length=16, batch_size=1)
    four = next_token_fidelity(tiny_model_dir, perturbed_model, TEXTS, max_length=16, batch_size=4)
    assert one["tokens"] == four["tokens"] <= 16 * len(TEXTS)
    assert four["kl_mean"] == pytest.approx(one["kl_mean"], rel=1e-3)
    assert four["top1_agreement"] == one["top1_agreement"]
    # per text too: each padded row's positions are summed into its own text
    assert four["per_text"]["tokens"] == one["per_text"]["tokens"] and len(set(one["per_text"]["tokens"])) > 1
    assert four["per_text"]["kl"] == pytest.approx(one["per_text"]["kl"], rel=1e-3, abs=1e-6)


def test_compressed_w4a16_checkpoint_loads_on_cpu(tiny_model_dir: Path, w4a16_model: Path) -> None:
    assert is_compressed_tensors(w4a16_model) and not is_compressed_tensors(tiny_model_dir)
    result = next_token_fidelity(tiny_model_dir, w4a16_model, TEXTS, max_length=64, batch_size=2)
    assert 0.0 < result["kl_mean"] < 1.0
    assert result["top1_agreement"] > 0.5
