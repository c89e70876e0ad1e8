"""Speed settings for llm-compressor calibration, chosen from the model's size and free GPU memory.

With ``quantize.tuning: auto`` (the default) and a CUDA GPU present, the quantize stage:

* loads the whole model onto the GPU when the recipe calibrates and the weights fit beside the most
  calibration can need (``model_placement``), so the sequential pipeline's per-layer onloading copies
  nothing; otherwise the model is loaded on the host and onloaded layer by layer as before. The weights go
  through pinned buffers (``pipeline/backends/pinned_load.py``): the 8B shape's 16 GB in 0.8-1.1 s instead of
  transformers' 2.5-3.0 s on an H200 host;
* batches calibration samples of equal length (``batch_size`` from the token budget below). Batches are
  formed only from samples of identical length, so no token is truncated or padded away: GPTQ's Hessian,
  AWQ's activation means and losses see exactly the token set of batch size 1, summed in another order;
* keeps the sequential pipeline's cached activations on the GPU (``sequential_offload_device="cuda"``)
  when they fit, instead of copying every layer's inputs to the host and back;
* accumulates GPTQ Hessians ``2 XᵀX`` from the bf16/fp16 activations with bf16 tensor-core products and
  fp32 accumulation (each product of two bf16 numbers is exact in fp32), computes it once per distinct input
  (q/k/v and gate/up share theirs), and only its upper strips (``GRAM_BLOCK`` columns at a time), mirroring
  the rest: the product is symmetric, so about 60 % of the full product's work for the 8B MLP's 12288 inputs;
* runs attention through PyTorch's fused causal kernel (flash attention) where llm-compressor forces
  eager attention, whenever the mask handed to attention is exactly the causal mask (always the case for
  the unpadded batches above); any other mask falls back to the model's eager attention.
* computes the model's RMSNorm layers in one fused pass, keeping transformers' own order of the weight's product
  and cast (normalized in fp32, cast to the activations' dtype, then times the weight): liger-kernel's Triton
  kernel (``liger_kernels``, the ``gpu`` extra) where it is installed, else PyTorch's fused normalization
  (``torch.nn.functional.rms_norm``) and the weight's product after it, instead of transformers' seven
  elementwise passes. Each norm class is checked once against its own forward on the first real batch; a class
  that computes something else (Gemma's ``1 + weight``) keeps its own;
* applies rotary position embeddings with liger-kernel's RoPE kernel (``fused_rope``, with ``liger_kernels``): one
  pass over the queries and keys instead of transformers' ten, whose products with the broadcast cos/sin run on
  PyTorch's slow strided path. Checked once like the norms against the model's own ``apply_rotary_pos_emb``;
* scores AWQ's scale candidates on a subsample of the calibration batches (every ``awq_search_stride``-th,
  about ``AWQ_SEARCH_TOKENS`` tokens) instead of all of them: the grid search re-runs each parent module
  once per candidate, which is most of AWQ's time, while the activation means that shape the candidates
  still see every token. AWQ batches hold at most ``AWQ_SEARCH_TOKENS`` tokens so the subsample is whole
  batches. On N distributed ranks llm-compressor sums the ranks' losses, so each rank scores
  ``AWQ_SEARCH_TOKENS / N``: the same tokens in all as on one GPU, and the search splits across the ranks;
* factorizes GPTQ's Hessians with one Cholesky factorization and an inverse of the factor by halves instead of
  llm-compressor's two factorizations and an inversion (the same factor, computed in fp64), once per
  distinct Hessian (q/k/v and gate/up share theirs): that was about 8 of the 13 s of GPTQ's solves for the 8B
  shape on an H200, and is 2.5 s now;
* runs the fp32 products of GPTQ's blockwise updates (each 128-column block's error times the next columns of
  the inverse factor) on TF32 tensor cores (``tf32_updates``) instead of fp32 CUDA cores. The factorization runs
  in fp64, which TF32 does not touch;
* solves GPTQ's modules of different input widths side by side (``concurrent_solves``, when the whole model is on
  the GPU): each group in a thread and on a CUDA stream of its own, q/k/v/o and gate/up beside down_proj on the 8B
  shape. llm-compressor's blockwise kernel walks one column at a time over a few hundred thread blocks, so one
  module's solve leaves much of the GPU idle; each group computes what it would in turn;
* skips the sequential pipeline's propagation pass (``propagate_error=False``) unless the method is GPTQ. That
  pass re-runs each layer after its epoch so the next layer sees the compressed layer's outputs, but
  quantization stays disabled while calibrating and only GPTQ writes quantized weights then: after AWQ's
  smoothing (scales folded into neighbouring weights) the layer computes the same outputs up to bf16 rounding,
  which the calibration pass already produced. It is also the original AWQ's order (the next layer's inputs
  come from the layer before its scales are applied);
* with that pass on (GPTQ, weight-only or dynamic activations), skips the product of the last quantized Linear
  each layer runs (``down_proj``) in the calibration pass from the layer's second batch on: the Hessian needs only
  its input, and that pass's outputs are dropped (the propagation pass computes the layer's real outputs). About
  a quarter of a decoder layer's weights. Static activation scales are observed in that pass, so they keep it.

Without a GPU, with ``tuning: off``, or for data-free schemes the plan is disabled and nothing changes.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.backends import patches
from pipeline.formats import SCHEMES
from pipeline.recipe.schema import QuantizeSpec
from pipeline.run.context import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

GIB = 2**30
MAX_BATCH_TOKENS = 32768  # calibration tokens per batch: 16 x 2048 (GPTQ) or 64 x 512 (AWQ) already saturate the GEMMs
MEMORY_FRACTION = 0.9  # of free GPU memory the plan may count on
RESERVED_BYTES = 2 * GIB  # allocator fragmentation, cuBLAS workspaces, the lm_head/embedding onload
AWQ_SEARCH_TOKENS = 16384  # calibration tokens AWQ's grid search scores each scale candidate on (32 x 512)
INVERSE_LEAF = 2048  # triangular blocks up to this size are inverted by one triangular solve
GRAM_BLOCK = 2048  # columns per strip of the symmetric Hessian product: wide enough to keep the GEMMs efficient


class TuningPlan(BaseModel):
    """What the tuned path changes for one quantize call, and why."""

    model_config = ConfigDict(frozen=True)

    enabled: bool
    reason: str
    gpu: str | None = None
    batch_size: int = 1
    sequential_offload_device: str = "cpu"
    fast_hessian: bool = False
    fused_attention: bool = False
    fused_norm: bool = False
    fused_rope: bool = False
    liger_kernels: bool = False
    awq_search_stride: int = 1
    fast_factorization: bool = False
    tf32_updates: bool = False
    concurrent_solves: bool = False
    propagate_error: bool = True
    skip_tail: bool = False
    gram_block: int = GRAM_BLOCK
    free_gib: float | None = None
    estimated_gib: float | None = None

    @model_validator(mode="after")
    def _factor_out_of_tf32(self) -> TuningPlan:
        if self.tf32_updates and not self.fast_factorization:
            raise ValueError("tf32_updates needs fast_factorization: llm-compressor's own factorization runs in fp32")
        if self.fused_rope and not self.liger_kernels:
            raise ValueError("fused_rope needs liger_kernels: the RoPE kernel is liger-kernel's")
        return self


def disabled(reason: str) -> TuningPlan:
    """A plan that changes nothing."""
    return TuningPlan(enabled=False, reason=reason)


def layer_bytes_per_token(config: Any) -> int:
    """Working memory of one decoder layer's forward per token (bf16 activations, fused attention)."""
    return 2 * (12 * config.hidden_size + 4 * config.intermediate_size)


def cache_bytes(config: Any, total_tokens: int, method: str) -> int:
    """Activations kept for a whole layer: the pipeline's inputs and outputs, plus AWQ's cached parent inputs."""
    width = 2 * config.hidden_size
    if method == "awq":
        width += 2 * config.hidden_size + config.intermediate_size
    return 2 * total_tokens * width


def solver_bytes(config: Any, method: str) -> int:
    """GPTQ's largest Hessian, its XᵀX product and the solve's working copy, plus the factorization's four
    temporaries and two cached Hessian/factor pairs (fp32); nothing for other methods."""
    if method != "gptq":
        return 0
    width = max(config.hidden_size, config.intermediate_size)
    return (3 + 4 + 4) * 4 * width * width


def gpu_budget(free_bytes: int) -> int:
    """The bytes placement and plan may count on: `MEMORY_FRACTION` of the free GPU memory less `RESERVED_BYTES`."""
    return int(free_bytes * MEMORY_FRACTION) - RESERVED_BYTES


class Placement(BaseModel):
    """Where the backend loads the model's weights, and why."""

    model_config = ConfigDict(frozen=True)

    device: str  # "cuda" (the whole model resident) or "cpu" (onloaded layer by layer)
    reason: str
    weights_gib: float | None = None
    free_gib: float | None = None


def loaded_weight_bytes(path: Path, config: Any, dtype: str) -> int:
    """Bytes the checkpoint's weights take once loaded in `dtype`: its weight files (safetensors' headers are
    a rounding error), rescaled when `dtype` is not the stored one."""
    stored = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(path).glob(pattern))
    stored_dtype = getattr(config, "dtype", None)
    if dtype == "auto" or not isinstance(stored_dtype, torch.dtype):
        return stored
    return stored * getattr(torch, dtype).itemsize // stored_dtype.itemsize


def calibration_headroom(config: Any, method: str) -> int:
    """The most the tuned path's calibration can need beside resident weights: the largest batch it forms and
    GPTQ's Hessians. The activation cache is not counted: the plan moves it to the host when it does not fit."""
    return solver_bytes(config, method) + MAX_BATCH_TOKENS * layer_bytes_per_token(config)


def model_placement(config: Any, weight_bytes: int, spec: QuantizeSpec, *, free_bytes: int | None = None) -> Placement:
    """`cuda` when the tuned path is on, the recipe calibrates (the forward passes that onloading slows) and the
    weights fit the GPU beside `calibration_headroom`; else `cpu`."""
    if spec.tuning == "off":
        return Placement(device="cpu", reason="quantize.tuning is off")
    if not torch.cuda.is_available():
        return Placement(device="cpu", reason="no CUDA GPU")
    if not spec.calibrates:
        return Placement(device="cpu", reason="data-free: the engine visits each layer once")
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info()
    fits = weight_bytes + calibration_headroom(config, spec.method) <= gpu_budget(free_bytes)
    return Placement(
        device="cuda" if fits else "cpu",
        reason="weights fit the GPU beside calibration" if fits else "weights do not fit the GPU beside calibration",
        weights_gib=round(weight_bytes / GIB, 1),
        free_gib=round(free_bytes / GIB, 1),
    )


def placement_for(path: Path, spec: QuantizeSpec, dtype: str, trust_remote_code: bool) -> Placement:
    """`model_placement` for the checkpoint at `path` loaded in `dtype`, read from its config and file sizes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model_placement(config, loaded_weight_bytes(path, config, dtype), spec)


def gpu_resident(model: Any) -> bool:
    """Whether every parameter and buffer is on a GPU (none offloaded to the host or to disk)."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def liger_installed() -> bool:
    """Whether liger-kernel (the `gpu` extra: fused Triton kernels for transformers' layers) can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None


def world_size() -> int:
    """Ranks of the initialized process group (1 outside a distributed run)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def plan_tuning(
    model: Any,
    lengths: list[int] | None,
    spec: QuantizeSpec,
    *,
    free_bytes: int | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    ranks: int | None = None,
) -> TuningPlan:
    """The tuned settings for quantizing `model` on calibration samples of `lengths` tokens (this rank's share
    when `ranks`, by default the process group's size, is above 1)."""
    if spec.tuning == "off":
        return disabled("quantize.tuning is off")
    if not torch.cuda.is_available():
        return disabled("no CUDA GPU: the default path runs unchanged")
    if not lengths:
        return disabled("no calibration data: nothing to batch")
    config = model.config
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info()
    budget = gpu_budget(free_bytes)
    seq_len = max(lengths)
    search_tokens = max(1, AWQ_SEARCH_TOKENS // (ranks or world_size()))
    static_activations = SCHEMES[spec.scheme].activations == "static"
    if spec.batch_size > 1:
        batch = spec.batch_size
    elif static_activations:
        batch = 1  # activation observers average over batches: batching would change the scales
    else:
        batch_tokens = min(max_batch_tokens, search_tokens) if spec.method == "awq" else max_batch_tokens
        batch = max(1, min(len(lengths), batch_tokens // seq_len))
    fixed = solver_bytes(config, spec.method)
    cache = cache_bytes(config, sum(lengths), spec.method)
    per_token = layer_bytes_per_token(config)

    def needed(batch_size: int, on_gpu_cache: bool) -> int:
        return fixed + batch_size * seq_len * per_token + (cache if on_gpu_cache else 0)

    on_gpu_cache = needed(batch, True) <= budget
    while batch > 1 and needed(batch, on_gpu_cache) > budget:
        batch //= 2
    liger = liger_installed()
    if not liger:
        log.info("liger-kernel is not installed (pip install 'qpipe[gpu]'): RoPE and RMSNorm run without its kernels")
    return TuningPlan(
        enabled=True,
        reason="CUDA GPU present and quantize.tuning is auto",
        gpu=torch.cuda.get_device_name(),
        batch_size=batch,
        sequential_offload_device="cuda" if on_gpu_cache else "cpu",
        fast_hessian=spec.method == "gptq",
        fused_attention=True,
        fused_norm=True,
        fused_rope=liger,
        liger_kernels=liger,
        awq_search_stride=max(1, sum(lengths) // search_tokens) if spec.method == "awq" else 1,
        fast_factorization=spec.method == "gptq",
        tf32_updates=spec.method == "gptq",
        concurrent_solves=spec.method == "gptq" and gpu_resident(model),
        propagate_error=spec.method == "gptq",
        skip_tail=spec.method == "gptq" and not static_activations,
        free_gib=round(free_bytes / GIB, 1),
        estimated_gib=round(needed(batch, on_gpu_cache) / GIB, 1),
    )


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices, longest first (the engine's order), in batches of at most `batch_size` equal lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and lengths[last[0]] == lengths[index]:
            last.append(index)
        else:
            batches.append([index])
    return batches


def calibration_loader(calibration: Any, batch_size: int) -> torch.utils.data.DataLoader:
    """A DataLoader over `calibration` whose batches hold samples of one length (no padding, no truncation)."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    lengths = [len(ids) for ids in calibration["input_ids"]]
    return DataLoader(
        calibration, batch_sampler=equal_length_batches(lengths, batch_size), collate_fn=default_data_collator
    )


def oneshot_overrides(plan: TuningPlan, calibration: Any) -> dict[str, Any]:
    """`oneshot` keyword arguments that the plan replaces (empty when disabled)."""
    if not plan.enabled:
        return {}
    overrides: dict[str, Any] = {
        "sequential_offload_device": plan.sequential_offload_device,
        "propagate_error": plan.propagate_error,
    }
    if plan.batch_size > 1:
        overrides["dataset"] = calibration_loader(calibration, plan.batch_size)
    return overrides


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀb in fp32 (bf16/fp16 tensor-core products accumulate in fp32 on a GPU)."""
    return a.t() @ b if a.dtype == torch.float32 else torch.mm(a.t(), b, out_dtype=torch.float32)


def symmetric_gram(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """XᵀX (fp32) of a (tokens, n) matrix from its upper strips: each `block` rows are one product with the
    columns from the strip's own on, and the part below the diagonal is mirrored. For k strips that is
    (k + 1) / 2k of the full product's multiply-adds."""
    if not x.is_cuda:
        x = x.float()
    n = x.shape[1]
    out = torch.empty(n, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        strip = _product(x[:, start:stop], x[:, start:])
        out[start:stop, start:] = strip
        out[stop:, start:stop] = strip[:, stop - start :].t()
    return out


class GramCache:
    """XᵀX (fp32) of the last input seen, so modules sharing one input tensor compute it once."""

    def __init__(self, block: int = GRAM_BLOCK) -> None:
        self._block = block
        self._input: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._value: torch.Tensor | None = None

    def __call__(self, inp: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self._input is not None and self._input() is inp and self._version == inp._version:
            assert self._value is not None
            return self._value
        value = symmetric_gram(inp.to(device=device).reshape(-1, inp.shape[-1]), self._block)
        self._input, self._version, self._value = weakref.ref(inp), inp._version, value
        return value

    def clear(self) -> None:
        self._input, self._value = None, None


def fast_accumulate_hessian(gram: GramCache, fallback: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for llm-compressor's `accumulate_hessian`: H += 2·XᵀX from low-precision inputs."""

    def accumulate(
        inp: torch.Tensor, module: torch.nn.Module, hessian: torch.Tensor, num_samples: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(module, torch.nn.Linear) or inp.dtype not in (torch.bfloat16, torch.float16):
            return fallback(inp, module, hessian, num_samples)
        num_samples += 1 if inp.dim() == 2 else inp.shape[0]
        hessian.add_(gram(inp, hessian.device), alpha=2.0)
        return hessian, num_samples

    return accumulate


def lower_inverse(lower: torch.Tensor, leaf: int = INVERSE_LEAF) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L by halves, [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [-B⁻¹·C·A⁻¹, B⁻¹]], down to blocks
    of `leaf` that one triangular solve inverts: about two thirds of the multiply-adds of a solve against the
    identity, and in matrix products."""
    n = lower.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = n // 2
    a_inv = lower_inverse(lower[:half, :half], leaf)
    b_inv = lower_inverse(lower[half:, half:], leaf)
    out = torch.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = b_inv
    out[half:, :half] = -(b_inv @ (lower[half:, :half] @ a_inv))
    return out


def upper_inverse_factor(hessian: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) that GPTQ's updates use, in H's dtype, or None if H is not
    positive definite. With J the reversal matrix and chol(JHJ) = L: H⁻¹ = J·L⁻ᵀ·L⁻¹·J, so U = J·L⁻¹·J.

    Computed in fp64: on an H200 (FP64 tensor cores) as fast as in fp32 (3.14 against 3.00 s for the 8B shape's
    36 layers, docs/BENCHMARKS.md) at 1/25 of the error, and out of reach of the TF32 setting of the updates."""
    lower, info = torch.linalg.cholesky_ex(hessian.double().flip(-2, -1))
    if info.item() != 0:
        return None
    return lower_inverse(lower).flip(-2, -1).to(hessian.dtype)


class FactorCache:
    """The factors of the last `size` damped Hessians, so modules sharing one (q/k/v, gate/up) factorize once.

    A layer's batches come as q/o, k/v, gate/up, down: two entries cover every reuse. The entries are the calling
    thread's: each of `concurrent_solves`'s threads runs on a CUDA stream of its own, and reuses only the factors
    its own stream computed."""

    size = 2

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _entries(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if not hasattr(self._local, "entries"):
            self._local.entries = []
        return self._local.entries

    def __call__(self, hessian: torch.Tensor) -> torch.Tensor | None:
        for index, (seen, factor) in enumerate(self._entries):
            if seen.shape == hessian.shape and torch.equal(seen, hessian):
                self._entries.append(self._entries.pop(index))
                return factor
        factor = upper_inverse_factor(hessian)
        self._entries.append((hessian.clone(), factor))
        del self._entries[: -self.size]
        return factor

    def clear(self) -> None:
        self._local = threading.local()


def fast_factorize_hessian(cache: FactorCache) -> Callable[..., torch.Tensor]:
    """A drop-in for llm-compressor's `factorize_hessian`: the same dead-column handling, damping and RTN
    fallback (identity factor) for a Hessian that is not positive definite, with factors from `cache`."""

    def factorize(
        weights: torch.Tensor, hessians: torch.Tensor, percdamp: float, used_rtn_fallback: torch.Tensor
    ) -> torch.Tensor:
        diag = torch.diagonal(hessians, dim1=-2, dim2=-1)
        dead = diag == 0
        if dead.any():  # an input channel no calibration token used: its weights are dropped
            diag.masked_fill_(dead, 1.0)
            weights.masked_fill_(dead.unsqueeze(1), 0)
        diag.add_(percdamp * diag.mean(dim=-1, keepdim=True))
        for index in range(hessians.shape[0]):
            factor = cache(hessians[index])
            if factor is None:
                hessians[index] = torch.eye(hessians.shape[-1], dtype=hessians.dtype, device=hessians.device)
                used_rtn_fallback[index] = True
            else:
                hessians[index] = factor
        return hessians

    return factorize


@contextmanager
def matmul_precision(mode: str) -> Iterator[None]:
    """torch's precision for fp32 matrix products on CUDA ("ieee" or "tf32") for the block, then the previous."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = mode
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def tf32_block_updates(compress_module_list: Callable[..., Any]) -> Callable[..., Any]:
    """llm-compressor's GPTQ solve of a layer's modules with its fp32 products on TF32: the blockwise updates
    W[:, i2:] -= Err·H⁻¹[i1:i2, i2:] carry a block's rounding error into the columns still to be quantized, a
    correction that the 4-bit rounding of those columns then absorbs. The factor H⁻¹ comes from
    `upper_inverse_factor`, in fp64, which TF32 does not touch. The setting is process-wide: it is made here,
    before `concurrent_solves` starts its threads, which never change it."""

    def compress(modifier: Any, modules: list[torch.nn.Module]) -> None:
        with matmul_precision("tf32"):
            compress_module_list(modifier, modules)

    return compress


def width_groups(modules: list[torch.nn.Module]) -> list[list[torch.nn.Module]]:
    """Modules by their weight's input width, each group in the given order. GPTQ reuses a factor only for an
    equal Hessian, which has an equal width, so no group needs anything another computes."""
    groups: dict[int, list[torch.nn.Module]] = {}
    for module in modules:
        groups.setdefault(module.weight.shape[-1], []).append(module)
    return list(groups.values())


@contextmanager
def side_stream(main: torch.cuda.Stream | None) -> Iterator[None]:
    """The block on a new CUDA stream that starts after the work queued on `main` so far, and that `main`'s later
    work waits for; with no stream (CPU) the block runs as it is."""
    if main is None:
        yield
        return
    stream = torch.cuda.Stream(main.device)
    stream.wait_stream(main)
    with torch.cuda.device(main.device), torch.cuda.stream(stream):
        yield
    main.wait_stream(stream)


def load_cuda_linalg(device: torch.device) -> None:
    """torch loads its CUDA linear-algebra library on the first such call, and a second thread making a first call
    at the same time fails ("lazy wrapper should be called at most once", torch 2.11): make one before threads."""
    torch.linalg.cholesky_ex(torch.ones(1, 1, device=device))


def concurrent_solves(compress_module_list: Callable[..., Any]) -> Callable[..., Any]:
    """llm-compressor's GPTQ solve of a layer's modules with each `width_groups` group (on the 8B shape q/k/v/o
    and gate/up, against down_proj) in a thread and on a CUDA stream of its own. Its Triton block kernel walks
    128 columns one at a time over a few hundred thread blocks, which leaves much of the GPU idle, so the groups
    overlap. Each group computes what it would in turn."""

    def compress(modifier: Any, modules: list[torch.nn.Module]) -> None:
        from compressed_tensors.offload import disable_offloading

        groups = width_groups(modules)
        if len(groups) < 2:
            compress_module_list(modifier, modules)
            return
        device = modules[0].weight.device
        main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if main is not None:
            load_cuda_linalg(device)
        compressed = modifier._num_compressed_modules  # the threads' `+=` on it could interleave

        def solve(group: list[torch.nn.Module]) -> None:
            with side_stream(main):
                compress_module_list(modifier, group)

        # compressed-tensors' offloading switch is process-wide: set once here, the threads' own use changes nothing
        with disable_offloading(), ThreadPoolExecutor(len(groups)) as pool:
            for _ in pool.map(solve, groups):  # re-raises a thread's error
                pass
        modifier._num_compressed_modules = compressed + len(modules)

    return compress


def strided_awq_samples(stride: int) -> Callable[[Any, torch.nn.Module], list[torch.Tensor]]:
    """A drop-in for `AWQModifier._run_samples` that runs the parent module on every `stride`-th cached batch.

    Both the unquantized reference outputs and each candidate's outputs come from it, so the loss compares
    the same tokens. (llm-compressor's optional loss masks are indexed by batch; qpipe never sets them.)"""

    @torch.no_grad()
    def run_samples(modifier: Any, module: torch.nn.Module) -> list[torch.Tensor]:
        cache = modifier._parent_args_cache[module]
        outputs = [module(**cache.fetch(index)) for index in range(0, len(cache), stride)]
        return [output[0] if isinstance(output, tuple) else output for output in outputs]

    return run_samples


def is_causal_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether a (batch, 1, q, kv) attention mask is exactly the plain causal mask (no padding, no window)."""
    if q_len != kv_len or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        expected = allowed
    else:
        expected = torch.where(allowed, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
    return torch.equal(mask, expected.expand_as(mask))


def fused_causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The eager attention function's contract, computed by `scaled_dot_product_attention` when it can be."""
    traced = not isinstance(query, torch.Tensor)  # torch.fx proxies: keep the traced graph the engine expects
    if traced or (attention_mask is not None and not is_causal_mask(attention_mask, query.shape[2], key.shape[2])):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        dropout_p=dropout,
        is_causal=attention_mask is not None,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


STAND_IN_TOLERANCE = 2**-7  # relative L2 error, about two bf16 steps: a fused kernel rounds in another order


def matches(fused: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `fused` is `reference` up to rounding: same dtype and shape, and a relative L2 error of at most
    `STAND_IN_TOLERANCE`. Relative to the whole tensor, not elementwise: where transformers rounds each product
    to bf16 before a difference that cancels (RoPE's `q1·cos - q2·sin`), one element can be off by a bf16 step of
    its inputs, many steps of its own value."""
    if fused.dtype != reference.dtype or fused.shape != reference.shape:
        return False
    error = torch.linalg.vector_norm((fused - reference).float())
    return bool(error <= STAND_IN_TOLERANCE * torch.linalg.vector_norm(reference.float()))


def checked_stand_in(
    name: str, original: Callable[..., Any], fused: Callable[..., Any], plain: Callable[..., bool]
) -> Callable[..., Any]:
    """`original` computed by `fused` on the calls that `plain` accepts (positional arguments only). The first such
    call computes both (the original first: a fused kernel may work in place) and keeps `fused` for good only if
    its result `matches` the original's (a tensor or a tuple of tensors); one that differs or raises leaves the
    original, for that call and every later one."""
    passed: list[bool] = []

    def settle(args: tuple[Any, ...]) -> Any:
        reference = original(*args)
        try:
            result = fused(*args)
        except Exception as exc:  # a shape or dtype the kernel does not take: the original stays
            log.info("%s: its fused stand-in failed (%s): kept as it is", name, exc)
            passed.append(False)
            return reference
        results = result if isinstance(result, tuple) else (result,)
        references = reference if isinstance(reference, tuple) else (reference,)
        passed.append(len(results) == len(references) and all(map(matches, results, references)))
        if not passed[0]:
            log.info("%s computes something else than its fused stand-in: kept as it is", name)
        return result if passed[0] else reference

    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs or passed == [False] or not plain(*args):
            return original(*args, **kwargs)
        return fused(*args) if passed else settle(args)

    return call


def _low_precision(tensor: Any) -> bool:
    """A real bf16/fp16 tensor: not a traced proxy, not a meta tensor."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type != "meta"
        and tensor.dtype in (torch.bfloat16, torch.float16)
    )


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rms_norm(x)`: PyTorch's fused normalization (fp32 inside, one cast), then the weight's product."""
    return weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)


def liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same in one liger-kernel Triton kernel ("llama" casting: normalized in fp32, cast, times the weight)."""
    from liger_kernel.transformers.functional import liger_rms_norm as kernel

    return kernel(x.contiguous(), weight, eps, casting_mode="llama")


def _fusable_norm(module: torch.nn.Module) -> bool:
    """A transformers RMSNorm: named so, with one weight per channel and its epsilon in `variance_epsilon`."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 1
    )


def rms_norm_classes(model: torch.nn.Module) -> list[type[torch.nn.Module]]:
    """The classes of `model`'s RMSNorm layers that `fused_rms_norm` may stand in for."""
    found = {type(module) for module in model.modules() if _fusable_norm(module)}
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def fused_rms_norm(
    original: Callable[..., torch.Tensor], kernel: Callable[..., torch.Tensor] = torch_rms_norm
) -> Callable[..., torch.Tensor]:
    """A drop-in for one RMSNorm class's `forward`: `kernel(x, weight, eps)`, which normalizes in fp32 and casts to
    x's dtype once before the weight's product, as transformers' Llama-style norms do in seven passes. Checked on
    its first real call against `original` (`checked_stand_in`); a gate or other input keeps `original`."""

    def fused(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return kernel(hidden_states, self.weight, self.variance_epsilon)

    def plain(self: torch.nn.Module, hidden_states: Any, *more: Any) -> bool:
        return not more and _low_precision(hidden_states)

    return checked_stand_in(original.__qualname__, original, fused, plain)


def rotary_modules(model: torch.nn.Module) -> list[ModuleType]:
    """The transformers modeling modules of `model`'s classes that define `apply_rotary_pos_emb`."""
    found = {sys.modules.get(type(module).__module__) for module in model.modules()}
    return sorted(
        (m for m in found if m is not None and callable(getattr(m, "apply_rotary_pos_emb", None))),
        key=lambda m: m.__name__,
    )


def liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """liger-kernel's RoPE: one Triton pass that rotates q and k in place (transformers' attention forwards rebind
    both to the results), where transformers makes ten, its products with the broadcast cos/sin on PyTorch's slow
    strided path."""
    from liger_kernel.transformers.functional import liger_rope as kernel

    return kernel(q, k, cos, sin)


def fused_rotary(original: Callable[..., Any], kernel: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., Any]:
    """A drop-in for a modeling module's `apply_rotary_pos_emb(q, k, cos, sin)` computed by `kernel`. Checked on its
    first real call against `original` (`checked_stand_in`); position ids, another unsqueeze dimension or a traced
    call keep `original`."""

    def plain(*args: Any) -> bool:
        return len(args) == 4 and all(_low_precision(t) for t in args)

    return checked_stand_in(f"{original.__module__}.apply_rotary_pos_emb", original, kernel, plain)


@contextmanager
def zero_product(linear: torch.nn.Linear) -> Iterator[None]:
    """`linear` returns zeros of its output's shape instead of its product; its hooks still run."""
    own = linear.__dict__.get("forward")  # an instance-level forward (offloading wrappers) to restore

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros((*x.shape[:-1], linear.out_features))

    linear.forward = forward
    try:
        yield
    finally:
        if own is None:
            del linear.forward
        else:
            linear.forward = own


def _quantized_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and hasattr(module, "quantization_scheme")


def tail_skipping(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for llm-compressor's `Subgraph.forward` for runs with the propagation pass: in the calibration
    pass (hooks on), the first batch records which quantized Linear the subgraph runs last, and later batches run
    it as `zero_product`. Nothing after it is observed (it is the last), and the pass's outputs are dropped."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    tails: dict[int, torch.nn.Linear | None] = {}

    def run(subgraph: Any, *args: Any, **kwargs: Any) -> Any:
        if HooksMixin._HOOKS_DISABLED:  # the propagation pass computes the real outputs
            return forward(subgraph, *args, **kwargs)
        key = id(subgraph)
        if key not in tails:
            order: list[torch.nn.Linear] = []
            record = torch.nn.modules.module.register_module_forward_hook(
                lambda module, inputs, output: order.append(module) if _quantized_linear(module) else None
            )
            try:
                return forward(subgraph, *args, **kwargs)
            finally:
                record.remove()
                tails[key] = order[-1] if order else None
        tail = tails[key]
        if tail is None:
            return forward(subgraph, *args, **kwargs)
        with zero_product(tail):
            return forward(subgraph, *args, **kwargs)

    return run


@contextmanager
def tuned_engine(plan: TuningPlan, model: torch.nn.Module) -> Iterator[None]:
    """The plan's engine changes (Hessians and their factors, attention, norms, rotary embeddings, AWQ's search,
    the calibration pass's last product) for one `oneshot` call on `model`."""
    with ExitStack() as stack:
        if plan.enabled and plan.fast_hessian:
            gram = GramCache(plan.gram_block)
            stack.callback(gram.clear)
            stack.enter_context(patches.llmcompressor_hessian(partial(fast_accumulate_hessian, gram)))
        if plan.enabled and plan.fused_attention:
            stack.enter_context(patches.transformers_eager_attention(fused_causal_attention))
        if plan.enabled and plan.fused_norm:
            kernel = liger_rms_norm if plan.liger_kernels else torch_rms_norm
            for cls in rms_norm_classes(model):
                stack.enter_context(patches.transformers_norm_forward(cls, fused_rms_norm(cls.forward, kernel)))
        if plan.enabled and plan.fused_rope:
            for modeling in rotary_modules(model):
                stack.enter_context(patches.transformers_rotary(modeling, partial(fused_rotary, kernel=liger_rope)))
        if plan.enabled and plan.fast_factorization:
            factors = FactorCache()
            stack.callback(factors.clear)
            stack.enter_context(patches.llmcompressor_factorization(fast_factorize_hessian(factors)))
        if plan.enabled and plan.concurrent_solves:
            stack.enter_context(patches.llmcompressor_compress_modules(concurrent_solves))
        if plan.enabled and plan.tf32_updates:  # wraps the threads above: the precision is set before they start
            stack.enter_context(patches.llmcompressor_compress_modules(tf32_block_updates))
        if plan.enabled and plan.awq_search_stride > 1:
            stack.enter_context(patches.llmcompressor_awq_samples(strided_awq_samples(plan.awq_search_stride)))
        if plan.enabled and plan.skip_tail and plan.propagate_error:
            stack.enter_context(patches.llmcompressor_subgraph_forward(tail_skipping))
        yield
