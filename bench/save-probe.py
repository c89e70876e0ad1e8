"""Where an 8B int4 save's seconds go: copies of the compressed state dict into fresh host memory, then the save.

Loads the checkpoint onto GPU 0, quantizes it data-free (W4A16, so the compressed tensors have the GPTQ/AWQ
artifact's shapes), compresses it, then times two host copies of its state dict (`seq`, one tensor at a time, as
safetensors does) and two `save_compressed` calls. Run it once with and once without `THP_MEM_ALLOC_ENABLE=1`
(PyTorch's CPU allocator on transparent huge pages) to see how much of the copy is first-touch page faults.

    PYTHONPATH=. python bench/save-probe.py CHECKPOINT
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

from pipeline.backends import llmcompressor_backend

OUT = Path("/tmp/save-probe")


def main(checkpoint: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="bfloat16", device_map="cuda:0")
    oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])])
    llmcompressor_backend.compress_in_place(model)
    state = model.state_dict()
    copy_s: list[float] = []
    save_s: list[float] = []
    for _ in range(2):
        started = time.perf_counter()
        copies = [tensor.to("cpu") for tensor in state.values()]
        copy_s.append(round(time.perf_counter() - started, 2))
        del copies
    for _ in range(2):
        shutil.rmtree(OUT, ignore_errors=True)
        started = time.perf_counter()
        llmcompressor_backend.save_compressed(model, OUT)
        save_s.append(round(time.perf_counter() - started, 2))
    marks = {"thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "seq": copy_s, "save": save_s}
    thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    print("probe", json.dumps(marks), thp_mode, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
