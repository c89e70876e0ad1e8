"""AWQ's scale search on a calibration subsample, on the demo model on CPU (docs/BENCHMARKS.md, "AWQ's search").

Quantizes the demo model (fp32) with AWQ W4A16_ASYM on 128 packed 512-token samples of MMLU test text, once
with llm-compressor's defaults (`tuning: off`) and once per search stride with the tuned plan forced on (batches
of 32, so strides 1/2/4 score 4/2/1 of the 4 batches), and prints each run's KL against the unquantized model on
held-out demo text, its `oneshot` time and the share of quantized weights equal to the default run's.

    .venv/bin/python bench/awq-search-demo.py ../shared/data/mmlu     # ~12 min on 2 cores
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.backends.llmcompressor_backend import Backend
from pipeline.backends.tuning import TuningPlan
from pipeline.bench.benchmark import compare_weights, log_probs, quantized_weights
from pipeline.demo.corpus import heldout_records
from pipeline.demo.model import ensure_demo_model
from pipeline.eval.fidelity import mean_kl
from pipeline.recipe.schema import CalibrateSpec, QuantizeSpec
from pipeline.stages.calibrate import packed_samples

SAMPLES, LENGTH = 128, 512
AWQ = QuantizeSpec(method="awq", scheme="W4A16_ASYM")


def packed_mmlu(mmlu_dir: Path, tokenizer: Any, scratch: Path) -> Dataset:
    """MMLU test questions with their choices (as `bench/gpu-e2e.sh corpus` writes them), packed by the calibrate
    stage's own `packed_samples` into SAMPLES x LENGTH tokens."""
    corpus = scratch / "mmlu-text.jsonl"
    with corpus.open("w", encoding="utf-8") as out:
        for path in sorted((mmlu_dir / "test").glob("*.csv")):
            for question, *choices, answer in csv.reader(path.open(encoding="utf-8")):
                options = "\n".join(f"{k}. {c}" for k, c in zip("ABCD", choices, strict=True))
                out.write(json.dumps({"text": f"{question}\n{options}\nAnswer: {answer}"}) + "\n")
    spec = CalibrateSpec(dataset=str(corpus), pack=True, num_samples=SAMPLES, max_seq_length=LENGTH)
    samples, _ = packed_samples(spec, tokenizer)
    return Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * LENGTH] * len(samples)})


def main(mmlu_dir: Path) -> None:
    model_dir = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        calibration = packed_mmlu(mmlu_dir, tokenizer, Path(scratch))
    held = tokenizer([r["text"] for r in heldout_records()[:64]], truncation=True, max_length=64)["input_ids"]
    eval_ids = torch.tensor([ids for ids in held if len(ids) == 64][:16])
    runs = [("default", AWQ.model_copy(update={"tuning": "off"}), None)] + [
        (
            f"search 1/{s}",
            AWQ,
            TuningPlan(enabled=True, reason="demo", batch_size=32, fused_attention=True, awq_search_stride=s),
        )
        for s in (1, 2, 4)
    ]
    default_weights = None
    for name, spec, plan in runs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference = log_probs(model, eval_ids)
        start = time.perf_counter()
        Backend().quantize(model, tokenizer, calibration, spec, seed=0, plan=plan)
        seconds = time.perf_counter() - start
        default_weights = default_weights or quantized_weights(model)
        equal = compare_weights(default_weights, model)["weights_equal_fraction"]
        kl = mean_kl(reference, log_probs(model, eval_ids))
        print(json.dumps({"run": name, "kl": kl, "oneshot_s": round(seconds, 1), "equal_to_default": equal}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
