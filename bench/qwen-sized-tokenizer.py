"""Write a byte-level BPE tokenizer of Qwen's size (151,643 tokens, 200 special tokens, a ~14 MB tokenizer.json).

Its merges are random, so it tokenizes badly; it stands in for a real tokenizer's loading and serializing cost,
which the synthetic checkpoints' word-level tokenizer (milliseconds to load) does not have. Nothing downloads.
Usage (repository root): python bench/qwen-sized-tokenizer.py OUT_DIR; copy OUT_DIR's tokenizer.json and
tokenizer_config.json into a synthetic checkpoint whose vocabulary is Qwen's (151,936), as `qpipe synth-model`'s
full-width shape has.
"""

from __future__ import annotations

import argparse
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 151643
SPECIAL = 200


def random_bpe(seed: int) -> Tokenizer:
    """Byte-level BPE whose merges join a random token with one of the first few hundred, until VOCAB tokens."""
    rng = random.Random(seed)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokens, merges = list(vocab), []
    while len(vocab) < VOCAB:
        left = rng.choice(tokens[-5000:] if len(tokens) > 5000 and rng.random() < 0.5 else tokens)
        right = rng.choice(tokens[:300])
        token = left + right
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        tokens.append(token)
        merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=random_bpe(args.seed),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[f"<|extra_{i}|>" for i in range(SPECIAL)],
    )
    fast.save_pretrained(args.out)
    print(f"{len(fast)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
