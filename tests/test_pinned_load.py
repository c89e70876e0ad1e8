"""Weights onto the GPU through pinned buffers: the tensors of transformers' own load; host loads left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.backends import pinned_load


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.state_dict().items()}


def test_host_loads_stay_transformers_own(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a host load went through the pinned copy")

    monkeypatch.setattr(pinned_load, "pinned_copy", refuse)
    with pinned_load.pinned_loading():
        loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameters(loaded).keys() == parameters(plain).keys()
    assert all(torch.equal(a, parameters(plain)[k]) for k, a in parameters(loaded).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_pinned_load_copies_every_byte(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned_load, "STAGING_BYTES", 1000)  # many chunks, the last of each tensor partial
    with pinned_load.pinned_loading():
        loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="cuda")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    assert all(torch.equal(a, parameters(plain)[k]) for k, a in parameters(loaded).items())
