"""Per-module code histograms of a pack-quantized (compressed-tensors) checkpoint, and how two checkpoints agree.

It answers whether a run saturated modules (most codes at the two ends of the range, which distributed
calibration over gloo showed on CPU) and how far a 2-GPU artifact is from the 1-GPU one, code by code:

``python -m pipeline.bench.int4 MODEL_DIR [OTHER_MODEL_DIR] --out FILE.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

SATURATED = 0.5  # a module with more than this share of its codes at the two ends of the range


def weight_bits(model_dir: Path) -> int:
    """The weight bit width of the checkpoint's (first) quantization group."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    groups = config["quantization_config"]["config_groups"]
    return int(next(iter(groups.values()))["weights"]["num_bits"])


def packed_modules(model_dir: Path) -> dict[str, Path]:
    """Every module with a packed weight, and the safetensors file that holds it."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(".weight_packed"):
                    found[key.removesuffix(".weight_packed")] = file
    return found


def module_codes(file: Path, name: str, bits: int, device: str) -> torch.Tensor:
    """The unsigned codes of one module's packed weight: one module in memory at a time, however large the model."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
        codes = unpack_from_int32(f.get_tensor(f"{name}.weight_packed").to(device), bits, shape)
    return codes.to(torch.int16) + (1 << (bits - 1))


def histogram(codes: torch.Tensor, bits: int) -> list[int]:
    """Count of every code 0 .. 2**bits - 1."""
    return torch.bincount(codes.flatten().long(), minlength=1 << bits).tolist()


def end_share(counts: list[int]) -> float:
    """Share of codes at the two ends of the range."""
    return (counts[0] + counts[-1]) / sum(counts)


def compare(first: Path, second: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Histograms and end shares per module of `first` (and `second`), and the share of equal codes."""
    bits = weight_bits(first)
    others = packed_modules(second) if second is not None else {}
    modules: dict[str, Any] = {}
    for name, file in packed_modules(first).items():
        codes = module_codes(file, name, bits, device)
        counts = histogram(codes, bits)
        row: dict[str, Any] = {"histogram": counts, "end_share": round(end_share(counts), 4)}
        if name in others:
            other = module_codes(others[name], name, bits, device)
            other_counts = histogram(other, bits)
            row["other_histogram"] = other_counts
            row["other_end_share"] = round(end_share(other_counts), 4)
            row["equal_codes"] = round((codes == other).float().mean().item(), 4)
        modules[name] = row
    return {"bits": bits, "summary": summarize(modules, second is not None), "modules": modules}


def summarize(modules: dict[str, Any], paired: bool) -> dict[str, Any]:
    """The figures the multi-GPU question needs: the worst end share, saturated modules, code agreement."""
    summary: dict[str, Any] = {
        "modules": len(modules),
        "max_end_share": max(m["end_share"] for m in modules.values()),
        "saturated": sorted(n for n, m in modules.items() if m["end_share"] > SATURATED),
    }
    if paired:
        equal = [m["equal_codes"] for m in modules.values() if "equal_codes" in m]
        summary.update(
            other_max_end_share=max(m["other_end_share"] for m in modules.values() if "other_end_share" in m),
            other_saturated=sorted(n for n, m in modules.items() if m.get("other_end_share", 0) > SATURATED),
            equal_codes_mean=round(sum(equal) / len(equal), 4),
            equal_codes_min=min(equal),
        )
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.int4", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("other_dir", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = compare(args.model_dir, args.other_dir, device)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
