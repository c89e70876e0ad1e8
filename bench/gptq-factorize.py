"""Time and check three ways to get GPTQ's update factor: the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU).

llm-compressor 0.14 (`gptq.helpers.factorize_hessian`) computes L = chol(H), H⁻¹ = cholesky_inverse(L), then
U = chol(H⁻¹, upper): two factorizations and an inversion. With J the reversal matrix, chol(JHJ) = Lf gives
H⁻¹ = J Lf⁻ᵀ Lf⁻¹ J, so U = J Lf⁻¹ J: one factorization and one triangular solve ("flip"); "blocked" inverts
Lf by halves with matrix products (`pipeline.backends.tuning.lower_inverse`, what the tuned path runs);
"blocked64" is the same in fp64.

Per layer of the Qwen3-8B shape GPTQ factorizes six 4096-wide Hessians (q/o, k/v, gate/up in pairs) and one
12288-wide one (down_proj). Usage (repository root): python bench/gptq-factorize.py [--layers 36] > result.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.backends import tuning


def damped_hessians(batch: int, n: int, tokens: int, seed: int) -> torch.Tensor:
    """Normalised 2·XᵀX/tokens of bf16 activations with a few loud channels, damped as GPTQ does (1 %)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    out = torch.empty(batch, n, n, device="cuda")
    for index in range(batch):
        x = torch.randn(tokens, n, device="cuda", generator=generator)
        x[:, :: max(1, n // 64)] *= 20.0
        x = x.bfloat16()
        out[index] = torch.mm(x.t(), x, out_dtype=torch.float32).mul_(2.0 / tokens)
    diag = torch.diagonal(out, dim1=-2, dim2=-1)
    diag.add_(0.01 * diag.mean(dim=-1, keepdim=True))
    return out


def llmcompressor_factor(h: torch.Tensor) -> torch.Tensor:
    """llm-compressor 0.14's per-item path (batches under 16): chol, cholesky_inverse, chol(upper)."""
    h = h.clone()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for index in range(h.shape[0]):
        torch.linalg.cholesky_ex(h[index], check_errors=False, out=(h[index], info))
        torch.cholesky_inverse(h[index], out=h[index])
        torch.linalg.cholesky(h[index], upper=True, out=h[index])
    return h


def flip_factor(h: torch.Tensor) -> torch.Tensor:
    """U = J·chol(J·H·J)⁻¹·J, batched."""
    lower, _ = torch.linalg.cholesky_ex(h.flip(-2, -1), check_errors=False)
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)


def blocked_factor(h: torch.Tensor) -> torch.Tensor:
    """The tuned path's: "flip" with L⁻¹ by halves (`tuning.lower_inverse`), one matrix at a time."""
    return torch.stack([tuning.upper_inverse_factor(item) for item in h])


def blocked64_factor(h: torch.Tensor) -> torch.Tensor:
    """ "blocked" computed in fp64 (FP64 tensor cores on Hopper) and rounded to fp32: no fp32 product in it."""
    return torch.stack([tuning.upper_inverse_factor(item.double()).float() for item in h])


def reference(h: torch.Tensor) -> torch.Tensor:
    """The fp64 factor the fp32 ones are compared with."""
    h64 = h.double()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h64)), upper=True)


def timed(function, h: torch.Tensor, repeats: int = 3) -> tuple[float, torch.Tensor]:
    function(h)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = function(h)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    shapes = [(2, 4096), (2, 4096), (2, 4096), (1, 12288)]  # one layer: q/o, k/v, gate/up, down
    rows = []
    per_layer = {"llmcompressor": 0.0, "flip": 0.0, "blocked": 0.0, "blocked64": 0.0}
    for seed, (batch, n) in enumerate(shapes):
        h = damped_hessians(batch, n, tokens=2 * n, seed=seed)
        ref = reference(h)
        row: dict[str, object] = {"batch": batch, "n": n}
        variants = (
            ("llmcompressor", llmcompressor_factor),
            ("flip", flip_factor),
            ("blocked", blocked_factor),
            ("blocked64", blocked64_factor),
        )
        for name, function in variants:
            seconds, factor = timed(function, h)
            per_layer[name] += seconds
            error = ((factor.double() - ref).norm() / ref.norm()).item()
            row[name] = {"seconds": round(seconds, 4), "rel_error_vs_fp64": error}
        rows.append(row)
        del h, ref
        torch.cuda.empty_cache()
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "shapes": rows,
                "per_model_s": {name: round(value * args.layers, 2) for name, value in per_layer.items()},
                "layers": args.layers,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
