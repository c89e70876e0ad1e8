"""Build the tiny offline demo model: a Qwen3-architecture LM trained briefly on the project corpus.

Everything happens locally and deterministically: a byte-level BPE tokenizer is
trained on :func:`pipeline.demo.corpus.training_texts`, a small ``Qwen3ForCausalLM``
is initialised from a fixed seed and trained for a fixed number of AdamW steps on
CPU (always CPU, one thread), and the result is saved in bfloat16 with ``save_pretrained``
into a cache directory whose name hashes the build parameters, so changing them triggers
a rebuild. ``demo-model.json`` beside the weights records how the build went.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from pipeline.demo import corpus as demo_corpus
from pipeline.paths import default_cache_root

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "qpipe-demo"
BUILDER_VERSION = 1  # bump whenever a code change alters the built model
BUILD_INFO_FILE = "demo-model.json"
# One thread: results were identical with 1 and 2 threads here, and 2 threads ran several times slower
# whenever other processes shared the two cores (OpenMP oversubscription).
TRAIN_THREADS = 1
FINAL_LOSS_WINDOW = 10  # final_loss is the mean over this many last steps
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class DemoModelSpec:
    """Every parameter that determines the demo model's weights."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_positions: int = 1024
    norm_gain_sigma: float = 1.5
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 150
    learning_rate: float = 3e-3
    warmup_steps: int = 15
    weight_decay: float = 0.0
    train_documents: int = demo_corpus.TRAIN_DOCUMENTS


def build_fingerprint(spec: DemoModelSpec = DemoModelSpec()) -> str:
    """Hash of builder version, build parameters and corpus; changes whenever the weights would."""
    payload = {
        "builder_version": BUILDER_VERSION,
        "spec": asdict(spec),
        "corpus": demo_corpus.corpus_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def demo_model_dir(cache_root: Path | None = None) -> Path:
    """Directory the demo model lives in (it may not be built yet)."""
    root = cache_root if cache_root is not None else default_cache_root()
    return root / f"{DEMO_MODEL_NAME}-{build_fingerprint()[:12]}"


def is_built(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished build (the info file is written last)."""
    return (model_dir / BUILD_INFO_FILE).is_file()


def ensure_demo_model(cache_root: Path | None = None) -> Path:
    """Return the demo model directory, building the model first if it is missing."""
    model_dir = demo_model_dir(cache_root)
    if not is_built(model_dir):
        build_demo_model(model_dir)
    return model_dir


def train_tokenizer(texts: list[str], spec: DemoModelSpec) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it with ChatML special tokens and template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=spec.max_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def spread_norm_gains(model: Qwen3ForCausalLM, sigma: float) -> None:
    """Draw the RMSNorm gains in front of Linear layers log-normally instead of all ones.

    Large pretrained LLMs feed their Linear layers a few dominant input channels; a model trained
    for minutes on CPU never develops them, and then activation-aware quantization (AWQ, GPTQ) has
    nothing to exploit. Spread gains recreate that structure (and also made the short training converge
    faster).
    """
    norms = []
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    with torch.no_grad():
        for norm in (*norms, model.model.norm):
            norm.weight.copy_(torch.randn_like(norm.weight).mul_(sigma).exp_())


class ModelDims(Protocol):
    """The dimensions that define a Qwen3-architecture model (the demo spec's and the synthetic shapes' fields)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def qwen3_config(dims: ModelDims, **overrides: Any) -> Qwen3Config:
    """A `Qwen3Config` with these dimensions and untied embeddings; `overrides` are further config fields."""
    fields = {
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "tie_word_embeddings": False,
    }
    return Qwen3Config(**{**fields, **overrides})


def make_model(spec: DemoModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    """A freshly initialised tiny Qwen3 model (weights depend only on the torch seed)."""
    config = qwen3_config(
        spec,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    spread_norm_gains(model, spec.norm_gain_sigma)
    return model


def token_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut them into ``[n, seq_len]`` blocks."""
    eos = tokenizer.eos_token_id
    ids = [tok for enc in tokenizer.backend_tokenizer.encode_batch(texts) for tok in (*enc.ids, eos)]
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def batch_order(n_blocks: int, spec: DemoModelSpec) -> Iterator[torch.Tensor]:
    """Seeded block indices for each training step, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            order = torch.cat([order, torch.randperm(n_blocks, generator=generator)])
        yield order[: spec.batch_size]
        order = order[spec.batch_size :]


def _lr_factor(step: int, spec: DemoModelSpec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(model: Qwen3ForCausalLM, blocks: torch.Tensor, spec: DemoModelSpec) -> list[float]:
    """Train in place with AdamW; returns the loss of every step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    model.train()
    losses: list[float] = []
    progress = tqdm(batch_order(len(blocks), spec), total=spec.steps, desc=f"train {DEMO_MODEL_NAME}")
    for indices in progress:
        batch = blocks[indices]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Seed torch, fix the thread count and force deterministic kernels; restore afterwards."""
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved_deterministic)
            torch.set_num_threads(saved_threads)


def _build_into(target: Path, spec: DemoModelSpec) -> dict[str, object]:
    """Train tokenizer and model, save them into ``target``; return the build record."""
    start = time.monotonic()
    texts = demo_corpus.training_texts(spec.train_documents)
    with deterministic_torch(spec.seed):
        tokenizer = train_tokenizer(texts, spec)
        blocks = token_blocks(texts, tokenizer, spec.seq_len)
        model = make_model(spec, tokenizer)
        losses = train(model, blocks, spec)
    tail = losses[-FINAL_LOSS_WINDOW:]
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {
        "name": DEMO_MODEL_NAME,
        "builder_version": BUILDER_VERSION,
        "fingerprint": build_fingerprint(spec),
        "seed": spec.seed,
        "spec": asdict(spec),
        "train_steps": len(losses),
        "train_tokens": len(losses) * spec.batch_size * spec.seq_len,
        "corpus_tokens": blocks.numel(),
        "initial_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "final_loss_steps": len(tail),
        "wall_time_s": round(time.monotonic() - start, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def build_demo_model(output_dir: Path, spec: DemoModelSpec = DemoModelSpec()) -> Path:
    """Build into a temporary sibling directory, then rename it to ``output_dir`` atomically."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        info = _build_into(tmp, spec)
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp creates it private
        os.rename(tmp, output_dir)
    except OSError:
        if not is_built(output_dir):
            raise
        log.info("another process finished %s first; discarding this build", output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo model ready in %s", output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: build the demo model (if needed) and print its directory."""
    parser = argparse.ArgumentParser(description="Build the offline qpipe demo model.")
    parser.add_argument("--output", type=Path, help="build into this directory instead of the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.output is None:
        model_dir = ensure_demo_model()
    elif is_built(args.output):
        model_dir = args.output
    else:
        model_dir = build_demo_model(args.output)
    print(model_dir)


if __name__ == "__main__":
    main()
