"""The int4 code census used for the multi-GPU saturation question (pipeline/bench/int4.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.bench.int4 import compare


def write_packed(model_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """A compressed-tensors-style pack-quantized checkpoint holding `weights` (signed int4 codes)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    model_dir.mkdir()
    tensors = {}
    for name, codes in weights.items():
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), 4)
        tensors[f"{name}.weight_shape"] = torch.tensor(codes.shape)
    save_file(tensors, model_dir / "model.safetensors")
    config = {"quantization_config": {"config_groups": {"group_0": {"weights": {"num_bits": 4}}}}}
    (model_dir / "config.json").write_text(json.dumps(config))


def test_histograms_saturation_and_agreement(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    spread = torch.randint(-8, 8, (16, 64), generator=generator)
    saturated = torch.where(torch.rand(16, 64, generator=generator) < 0.5, -8, 7)
    write_packed(tmp_path / "a", {"layer.q_proj": spread, "layer.o_proj": saturated})
    changed = spread.clone()
    changed[:4] = -spread[:4].clamp(min=-7)  # a quarter of the rows differ
    write_packed(tmp_path / "b", {"layer.q_proj": changed, "layer.o_proj": spread})

    report = compare(tmp_path / "a", tmp_path / "b")

    q = report["modules"]["layer.q_proj"]
    assert q["histogram"] == torch.bincount((spread + 8).flatten(), minlength=16).tolist()
    expected_equal = (spread == changed).float().mean().item()
    assert abs(q["equal_codes"] - expected_equal) < 1e-4 and q["equal_codes"] < 0.9
    summary = report["summary"]
    assert summary["modules"] == 2 and summary["max_end_share"] == 1.0
    assert summary["saturated"] == ["layer.o_proj"] and summary["other_saturated"] == []


def test_single_checkpoint_has_no_pairing(tmp_path: Path) -> None:
    write_packed(tmp_path / "a", {"m": torch.zeros(8, 32, dtype=torch.int8)})
    report = compare(tmp_path / "a")
    assert report["modules"]["m"]["histogram"][8] == 8 * 32
    assert "equal_codes_mean" not in report["summary"] and report["summary"]["saturated"] == []
