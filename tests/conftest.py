"""Shared fixtures: tiny offline tokenizer and model (unit tests), embedded demo model (end-to-end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from demo_runs import RECIPES, artifact_dir, run_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with a chat template, trained in a second on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"word{i} thing{i % 7} value {i * 3}" for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(words, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(out)
    return out


@pytest.fixture()
def tokenizer_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `AutoTokenizer.from_pretrained` is called with during the test, in order."""
    from transformers import AutoTokenizer

    loads: list[str] = []
    load = AutoTokenizer.from_pretrained.__func__

    def counted(cls: type, path: str | Path, *args: object, **kwargs: object) -> object:
        loads.append(str(path))
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    return loads


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The embedded demo model, built once per machine (cached under $QPIPE_CACHE or ~/.cache/qpipe)."""
    from pipeline.demo.model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 2-layer Qwen3 (hidden 128: W4A16's group size fits) with the tiny tokenizer; < 1 s."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> dict[str, Path]:
    """Every bundled recipe run once on the demo model (calibrate, quantize, export; small calibration)."""
    output = tmp_path_factory.mktemp("artifacts")
    for name in RECIPES:
        assert run_recipe(name, output) == 0, name
    return {name: artifact_dir(output, name) for name in RECIPES}


@pytest.fixture(scope="session")
def vllm_ready() -> Path:
    """The vLLM environment's python; skips when `make vllm-env` has not run."""
    from pipeline.recipe.schema import SmokeSpec
    from pipeline.vllm.environment import vllm_env_path, vllm_python

    if not (vllm_env_path() / "qpipe-vllm.json").is_file():
        pytest.skip("no vLLM environment: run `make vllm-env` (make test does)")
    return vllm_python(SmokeSpec())
