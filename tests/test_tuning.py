"""The tuned quantize path: plan choices, exact batching, Hessian and attention kernels, and equal results on CPU."""

from __future__ import annotations

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pipeline.backends import tuning
from pipeline.backends.tuning import (
    GIB,
    FactorCache,
    GramCache,
    TuningPlan,
    calibration_loader,
    equal_length_batches,
    fast_accumulate_hessian,
    fast_factorize_hessian,
    fused_causal_attention,
    fused_rms_norm,
    fused_rotary,
    is_causal_mask,
    loaded_weight_bytes,
    lower_inverse,
    model_placement,
    oneshot_overrides,
    plan_tuning,
    symmetric_gram,
    tf32_block_updates,
    tuned_engine,
    upper_inverse_factor,
    width_groups,
)
from pipeline.bench.synthetic_model import QWEN3_8B, qwen3_config, scaled_shape
from pipeline.recipe.schema import QuantizeSpec

GPTQ = QuantizeSpec(method="gptq", scheme="W4A16")
AWQ = QuantizeSpec(method="awq", scheme="W4A16_ASYM")
MODEL_8B = SimpleNamespace(config=qwen3_config(QWEN3_8B), parameters=list, buffers=list)  # weights not loaded


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU")


def test_plan_is_a_no_op_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmcompressor.modifiers.gptq import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_tuning(MODEL_8B, [2048] * 128, GPTQ)
    assert not plan.enabled and "no CUDA GPU" in plan.reason
    assert oneshot_overrides(plan, calibration=None) == {}
    original = base.accumulate_hessian
    with tuned_engine(plan, torch.nn.Linear(2, 2)):
        assert base.accumulate_hessian is original


def test_plan_off_and_data_free(fake_gpu: None) -> None:
    assert not plan_tuning(MODEL_8B, [2048] * 128, GPTQ.model_copy(update={"tuning": "off"})).enabled
    assert not plan_tuning(MODEL_8B, None, QuantizeSpec(method="rtn", scheme="FP8_DYNAMIC")).enabled


def test_plan_for_8b_on_an_80gb_gpu(fake_gpu: None) -> None:
    gptq = plan_tuning(MODEL_8B, [2048] * 128, GPTQ, free_bytes=63 * GIB)
    assert (gptq.batch_size, gptq.sequential_offload_device) == (16, "cuda")
    assert gptq.fast_hessian and gptq.fused_attention and gptq.gpu == "Fake GPU"
    assert gptq.awq_search_stride == 1
    awq = plan_tuning(MODEL_8B, [512] * 128, AWQ, free_bytes=63 * GIB)
    assert (awq.batch_size, awq.sequential_offload_device, awq.fast_hessian) == (32, "cuda", False)
    assert awq.awq_search_stride == 4  # the search scores one batch of four: 16,384 of 65,536 tokens
    assert gptq.fast_factorization and gptq.propagate_error  # GPTQ's next layer must see its quantized outputs
    assert not awq.fast_factorization and not awq.propagate_error
    assert oneshot_overrides(awq.model_copy(update={"batch_size": 1}), calibration=None)["propagate_error"] is False


def test_plan_fuses_rope_only_with_liger_kernel(fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel (the `gpu` extra) brings the RoPE kernel and the norms' one-kernel form; without it the norms
    keep PyTorch's and the rotary embedding stays transformers'."""
    for installed in (True, False):
        monkeypatch.setattr(tuning, "liger_installed", lambda installed=installed: installed)
        plan = plan_tuning(MODEL_8B, [2048] * 128, GPTQ, free_bytes=63 * GIB)
        assert (plan.fused_rope, plan.liger_kernels, plan.fused_norm) == (installed, installed, True)
    with pytest.raises(ValueError, match="fused_rope needs liger_kernels"):
        TuningPlan(enabled=True, reason="test", fused_rope=True)


def test_awq_search_subsample_keeps_small_calibration_whole(fake_gpu: None) -> None:
    """Under `AWQ_SEARCH_TOKENS` tokens every batch is scored; long samples get batches of the search size."""
    mixed = plan_tuning(MODEL_8B, [25 + i % 250 for i in range(128)], AWQ, free_bytes=63 * GIB)
    assert mixed.awq_search_stride == 1
    long = plan_tuning(MODEL_8B, [2048] * 128, AWQ, free_bytes=63 * GIB)
    assert (long.batch_size, long.awq_search_stride) == (8, 16)


def test_awq_search_splits_across_ranks(fake_gpu: None) -> None:
    """Two ranks with 64 of the 128 samples each score 8,192 tokens apiece (llm-compressor sums their losses): the
    16,384 tokens one GPU scores, in half the search time per rank."""
    one = plan_tuning(MODEL_8B, [512] * 128, AWQ, free_bytes=63 * GIB, ranks=1)
    two = plan_tuning(MODEL_8B, [512] * 64, AWQ, free_bytes=63 * GIB, ranks=2)
    assert (one.batch_size, one.awq_search_stride) == (32, 4)
    assert (two.batch_size, two.awq_search_stride) == (16, 4)
    assert 2 * two.batch_size * 512 == one.batch_size * 512 == tuning.AWQ_SEARCH_TOKENS
    gptq = plan_tuning(MODEL_8B, [2048] * 64, GPTQ, free_bytes=63 * GIB, ranks=2)
    assert gptq.batch_size == 16  # GPTQ's batches do not depend on the ranks


def test_strided_awq_samples_runs_every_stride_th_batch() -> None:
    """Under the plan, AWQ's reference and candidate outputs come from batches 0, stride, 2·stride, ..."""
    from llmcompressor.modifiers.transform.awq.base import AWQModifier

    class Batches:
        def __len__(self) -> int:
            return 7

        def fetch(self, index: int) -> dict[str, int]:
            return {"index": index}

    def parent(index: int) -> tuple[torch.Tensor, None]:
        return torch.full((1,), float(index)), None

    modifier = SimpleNamespace(_parent_args_cache={parent: Batches()})
    original = AWQModifier._run_samples
    with tuned_engine(TuningPlan(enabled=True, reason="test", awq_search_stride=3), torch.nn.Linear(2, 2)):
        outputs = AWQModifier._run_samples(modifier, parent)
    assert [float(output) for output in outputs] == [0.0, 3.0, 6.0]
    assert AWQModifier._run_samples is original


def test_plan_solves_side_by_side_only_for_a_model_on_the_gpu(fake_gpu: None) -> None:
    """Concurrent solves need every weight on the GPU; TF32 updates need the fp64 factorization beside them."""
    on_gpu = SimpleNamespace(config=MODEL_8B.config, parameters=lambda: [SimpleNamespace(is_cuda=True)], buffers=list)
    resident = plan_tuning(on_gpu, [2048] * 128, GPTQ, free_bytes=63 * GIB)
    hosted = plan_tuning(MODEL_8B, [2048] * 128, GPTQ, free_bytes=63 * GIB)
    assert (resident.concurrent_solves, resident.tf32_updates) == (True, True)
    assert (hosted.concurrent_solves, hosted.tf32_updates) == (False, True)
    assert not plan_tuning(on_gpu, [512] * 128, AWQ, free_bytes=63 * GIB).concurrent_solves
    with pytest.raises(ValueError, match="needs fast_factorization"):
        resident.model_validate({**resident.model_dump(), "fast_factorization": False})


def test_plan_shrinks_to_fit_small_memory(fake_gpu: None) -> None:
    plan = plan_tuning(MODEL_8B, [2048] * 128, GPTQ, free_bytes=8 * GIB)
    assert plan.sequential_offload_device == "cpu"
    assert 1 <= plan.batch_size < 16
    assert plan.estimated_gib is not None and plan.estimated_gib <= 8 * tuning.MEMORY_FRACTION


def test_plan_keeps_batch_one_for_static_activations_and_honours_explicit_batch(fake_gpu: None) -> None:
    static = QuantizeSpec(method="rtn", scheme="FP8")
    assert plan_tuning(MODEL_8B, [512] * 64, static, free_bytes=63 * GIB).batch_size == 1
    static_gptq = plan_tuning(MODEL_8B, [512] * 64, QuantizeSpec(method="gptq", scheme="FP8"), free_bytes=63 * GIB)
    assert static_gptq.propagate_error and not static_gptq.skip_tail  # its activation scales see the whole pass
    assert plan_tuning(MODEL_8B, [2048] * 128, GPTQ, free_bytes=63 * GIB).skip_tail
    explicit = GPTQ.model_copy(update={"batch_size": 4})
    assert plan_tuning(MODEL_8B, [2048] * 128, explicit, free_bytes=63 * GIB).batch_size == 4


def test_placement_keeps_a_fitting_model_on_the_gpu(fake_gpu: None) -> None:
    config = MODEL_8B.config
    on_gpu = model_placement(config, 16 * GIB, GPTQ, free_bytes=139 * GIB)
    assert (on_gpu.device, on_gpu.weights_gib, on_gpu.free_gib) == ("cuda", 16.0, 139.0)
    # the same weights beside too little room for the largest batch and the Hessians: onloaded per layer
    assert model_placement(config, 16 * GIB, GPTQ, free_bytes=20 * GIB).device == "cpu"
    assert model_placement(config, 140 * GIB, GPTQ, free_bytes=139 * GIB).device == "cpu"  # a 70B in bf16
    off = GPTQ.model_copy(update={"tuning": "off"})
    assert model_placement(config, 16 * GIB, off, free_bytes=139 * GIB).device == "cpu"
    data_free = QuantizeSpec(method="rtn", scheme="FP8_DYNAMIC")
    assert model_placement(config, 16 * GIB, data_free, free_bytes=139 * GIB).device == "cpu"
    static = QuantizeSpec(method="rtn", scheme="FP8")  # static activations calibrate
    assert model_placement(config, 16 * GIB, static, free_bytes=139 * GIB).device == "cuda"


def test_placement_is_host_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = model_placement(MODEL_8B.config, 1, GPTQ)
    assert placement.device == "cpu" and "no CUDA GPU" in placement.reason


def test_loaded_weight_bytes_scales_with_the_compute_dtype(tmp_path: Path) -> None:
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 500)
    (tmp_path / "config.json").write_text("{}")
    config = SimpleNamespace(dtype=torch.bfloat16)
    assert loaded_weight_bytes(tmp_path, config, "auto") == 1500
    assert loaded_weight_bytes(tmp_path, config, "float32") == 3000
    assert loaded_weight_bytes(tmp_path, config, "bfloat16") == 1500


def test_equal_length_batches_never_mix_lengths() -> None:
    lengths = [3, 5, 5, 3, 5, 2, 5]
    batches = equal_length_batches(lengths, batch_size=2)
    assert batches == [[1, 2], [4, 6], [0, 3], [5]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_calibration_loader_keeps_every_token() -> None:
    from datasets import Dataset

    rows = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    batches = list(calibration_loader(data, batch_size=8))
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 4]), torch.Size([2, 3])]
    tokens = sorted(t for b in batches for t in b["input_ids"].flatten().tolist())
    assert tokens == sorted(t for r in rows for t in r)
    assert all(bool(b["attention_mask"].all()) for b in batches)


@pytest.mark.parametrize("shape", [(3, 17, 64), (17, 64)])
def test_fast_hessian_matches_llmcompressor(shape: tuple[int, ...]) -> None:
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    torch.manual_seed(0)
    module = torch.nn.Linear(64, 8)
    inp = torch.randn(*shape).to(torch.bfloat16)
    ref_h, ref_n = accumulate_hessian(inp, module, torch.zeros(64, 64), torch.zeros(()))
    accumulate = fast_accumulate_hessian(GramCache(), accumulate_hessian)
    fast_h, fast_n = accumulate(inp, module, torch.zeros(64, 64), torch.zeros(()))
    assert fast_n == ref_n
    torch.testing.assert_close(fast_h, ref_h, rtol=1e-5, atol=1e-4)


def test_fast_hessian_falls_back_for_fp32_and_reuses_shared_inputs() -> None:
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    module = torch.nn.Linear(16, 4)
    calls: list[Any] = []
    accumulate = fast_accumulate_hessian(GramCache(), lambda *a: calls.append(a) or (a[2], a[3]))
    accumulate(torch.randn(2, 5, 16), module, torch.zeros(16, 16), torch.zeros(()))
    assert len(calls) == 1  # fp32 activations take the engine's own path

    gram = GramCache()
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    first = gram(x, x.device)
    assert gram(x, x.device) is first  # q/k/v (or gate/up) share one product
    x.mul_(2)
    assert gram(x, x.device) is not first  # an in-place change invalidates it
    ref_h, _ = accumulate_hessian(x, module, torch.zeros(16, 16), torch.zeros(()))
    torch.testing.assert_close(2 * gram(x, x.device), ref_h, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("n", "block"), [(40, 16), (40, 40), (40, 64)])
def test_symmetric_gram_is_the_full_product(n: int, block: int) -> None:
    """Upper strips plus their mirror: XᵀX to float tolerance, and exactly symmetric (strips of 16 over 40
    columns leave a narrow last one)."""
    torch.manual_seed(0)
    x = torch.randn(50, n).to(torch.bfloat16)
    gram = symmetric_gram(x, block)
    full = x.float().t() @ x.float()
    assert gram.dtype == torch.float32 and torch.equal(gram, gram.t())
    torch.testing.assert_close(gram, full, rtol=1e-5, atol=1e-4)


def test_fast_factorization_matches_llmcompressor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same update factors, dead-column handling and RTN fallback as llm-compressor's `factorize_hessian`;
    a Hessian seen twice (q/k/v share one) is factorized once."""
    from llmcompressor.modifiers.gptq.helpers import factorize_hessian

    torch.manual_seed(0)
    x = torch.randn(256, 32, dtype=torch.float64)
    shared = (x.T @ x / 256).float()
    shared[5, :] = shared[:, 5] = 0  # an input channel no token used
    hessians = torch.stack([shared, shared.clone(), -torch.eye(32)])  # the last is not positive definite
    weights = torch.randn(3, 4, 32)
    ref_weights, ref_fallback = weights.clone(), torch.zeros(3, dtype=torch.bool)
    ref = factorize_hessian(ref_weights, hessians.clone(), 0.01, ref_fallback)

    factorizations: list[torch.Size] = []
    cholesky = torch.linalg.cholesky_ex
    counted = lambda h, **kw: factorizations.append(h.shape) or cholesky(h, **kw)  # noqa: E731
    monkeypatch.setattr(torch.linalg, "cholesky_ex", counted)
    fallback = torch.zeros(3, dtype=torch.bool)
    fast = fast_factorize_hessian(FactorCache())(weights, hessians.clone(), 0.01, fallback)
    assert len(factorizations) == 2
    assert fallback.tolist() == ref_fallback.tolist() == [False, False, True]
    assert torch.equal(weights, ref_weights) and not weights[:2, :, 5].any()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_tf32_updates_cover_the_solve_and_restore_the_precision() -> None:
    seen: list[str] = []

    def solve(modifier: Any, modules: list[torch.nn.Module]) -> None:
        seen.append(torch.backends.cuda.matmul.fp32_precision)

    before = torch.backends.cuda.matmul.fp32_precision
    tf32_block_updates(solve)(None, [])
    assert seen == ["tf32"] and torch.backends.cuda.matmul.fp32_precision == before


def test_factor_is_computed_in_fp64() -> None:
    """U of an fp32 Hessian is the exact factor rounded to fp32 (computed in fp32, it had 2.3 times that error here),
    so TF32 products, which change fp32 arithmetic only, cannot reach it."""
    torch.manual_seed(0)
    x = torch.randn(256, 48, dtype=torch.float64)
    hessian = (x.T @ x / 256 + 0.01 * torch.eye(48, dtype=torch.float64)).float()
    exact = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian.double())), upper=True)
    factor = upper_inverse_factor(hessian)

    def error(u: torch.Tensor) -> float:
        return ((u.double() - exact).norm() / exact.norm()).item()

    assert factor is not None and factor.dtype == torch.float32
    assert error(factor) <= 1.01 * error(exact.float())


@pytest.mark.parametrize(("n", "leaf"), [(37, 8), (64, 16), (20, 32)])
def test_lower_inverse_by_halves(n: int, leaf: int) -> None:
    """The blocked inverse of a well-conditioned lower-triangular matrix (odd sizes split unevenly) is L⁻¹."""
    torch.manual_seed(0)
    x = torch.randn(2 * n, n, dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
    inverse = lower_inverse(lower, leaf)
    assert torch.equal(inverse, inverse.tril())
    torch.testing.assert_close(inverse @ lower, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)


def test_factor_cache_reuses_only_the_calling_threads_factors() -> None:
    """A factor computed in another thread (on another CUDA stream, under `concurrent_solves`) is not reused."""
    cache, hessian = FactorCache(), torch.eye(4) * 2
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(cache, hessian).result()
    mine = cache(hessian)
    assert mine is not theirs and cache(hessian.clone()) is mine
    torch.testing.assert_close(mine, theirs)


def test_width_groups_keep_the_order_within_each_width() -> None:
    modules = [torch.nn.Linear(i, 2) for i in (4, 4, 8, 4, 8)]
    assert width_groups(modules) == [[modules[0], modules[1], modules[3]], [modules[2], modules[4]]]


def test_factor_cache_keeps_the_last_two_hessians() -> None:
    cache = FactorCache()
    eyes = [torch.eye(4) * (i + 1) for i in range(3)]
    factors = [cache(h) for h in eyes]
    assert cache(eyes[2].clone()) is factors[2] and cache(eyes[1]) is factors[1]
    assert cache(eyes[0]) is not factors[0]  # evicted by the third
    torch.testing.assert_close(factors[1], torch.eye(4) / 2**0.5)


def _causal_float_mask(batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    return mask.expand(batch, 1, length, length).clone()


def test_is_causal_mask() -> None:
    mask = _causal_float_mask(2, 6, torch.float32)
    assert is_causal_mask(mask, 6, 6)
    assert is_causal_mask(torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6), 6, 6)
    padded = mask.clone()
    padded[1, :, :, 0] = torch.finfo(torch.float32).min  # a left-padded sample
    assert not is_causal_mask(padded, 6, 6)
    assert not is_causal_mask(mask[..., :5], 6, 5)


def test_fused_attention_matches_eager() -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, eager_attention_forward

    config = qwen3_config(scaled_shape(QWEN3_8B, 1, 1 / 32).model_copy(update={"num_heads": 4, "num_kv_heads": 2}))
    module = Qwen3Attention(config, layer_idx=0).eval()
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 128), torch.randn(2, 2, 9, 128), torch.randn(2, 2, 9, 128)
    mask = _causal_float_mask(2, 9, torch.float32)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    out, weights = fused_causal_attention(module, q, k, v, mask, scaling=module.scaling)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    padded = mask.clone()
    padded[0, :, :, 0] = torch.finfo(torch.float32).min
    ref, _ = eager_attention_forward(module, q, k, v, padded, scaling=module.scaling)
    out, _ = fused_causal_attention(module, q, k, v, padded, scaling=module.scaling)
    assert torch.equal(out, ref)  # any other mask runs the model's own eager attention


class CountingNorm(torch.nn.Module):
    """transformers' Llama-style RMSNorm (`gemma`: Gemma's `1 + weight`), counting its own forwards."""

    def __init__(self, width: int, gemma: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width, dtype=torch.bfloat16) * 0.1 + (0 if gemma else 1))
        self.variance_epsilon = 1e-6
        self.gemma = gemma
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        weight = 1 + self.weight if self.gemma else self.weight
        return weight * hidden_states.to(dtype)


def test_fused_rms_norm_stands_in_once_checked() -> None:
    """A Llama-style norm: the first bf16 call checks the fused result against the class's own forward, later
    calls run only the fused kernel, and both agree to a bf16 step; fp32 inputs keep the class's forward."""
    torch.manual_seed(0)
    norm = CountingNorm(64)
    forward = fused_rms_norm(CountingNorm.forward)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 4
    assert tuning.matches(forward(norm, x), CountingNorm.forward(norm, x))
    calls = norm.calls
    forward(norm, x * 2)
    assert norm.calls == calls  # checked once: the fused kernel alone from then on
    forward(norm, x.float())
    assert norm.calls == calls + 1


def test_fused_rms_norm_leaves_a_norm_with_more_inputs_to_itself() -> None:
    """A norm called with more than the hidden states (a gate) runs its own forward."""

    class GatedNorm(CountingNorm):
        def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
            out = super().forward(hidden_states)
            return out if gate is None else out * gate

    norm = GatedNorm(8)
    forward = fused_rms_norm(GatedNorm.forward)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    gate = torch.full_like(x, 2.0)
    assert torch.equal(forward(norm, x, gate), GatedNorm.forward(norm, x, gate))
    assert torch.equal(forward(norm, x, gate=gate), GatedNorm.forward(norm, x, gate=gate))


def test_fused_rms_norm_keeps_a_norm_that_computes_something_else() -> None:
    """Gemma's `1 + weight` norm fails the check and keeps its own forward, bit for bit, from then on."""
    torch.manual_seed(0)
    norm = CountingNorm(64, gemma=True)
    forward = fused_rms_norm(CountingNorm.forward)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for _ in range(2):
        assert torch.equal(forward(norm, x), CountingNorm.forward(norm, x))


def test_tuned_engine_swaps_the_models_norm_classes() -> None:
    """Only RMSNorm classes of the model are swapped, and only inside the block."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3RMSNorm

    model = Qwen3ForCausalLM(qwen3_config(scaled_shape(QWEN3_8B, 1, 1 / 32)))
    assert tuning.rms_norm_classes(model) == [Qwen3RMSNorm]
    original = Qwen3RMSNorm.forward
    with tuned_engine(TuningPlan(enabled=True, reason="test", fused_norm=True), model):
        assert Qwen3RMSNorm.forward is not original
    assert Qwen3RMSNorm.forward is original
    with tuned_engine(TuningPlan(enabled=True, reason="test"), model):
        assert Qwen3RMSNorm.forward is original


def _rotary_inputs() -> tuple[torch.Tensor, ...]:
    """q, k (GQA: 4 and 2 heads) and cos/sin as a Qwen3 attention layer hands them to `apply_rotary_pos_emb`."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = qwen3_config(scaled_shape(QWEN3_8B, 1, 1 / 32))
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 128, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 5, 2, 128, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = Qwen3RotaryEmbedding(config)(q, torch.arange(5).expand(2, 5))
    return q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16)


def test_a_stand_in_matches_up_to_rounding_not_beyond() -> None:
    """One bf16 step on a few elements, even where it is large relative to the element (a cancelling difference),
    passes; a shifted weight (Gemma's `1 + weight`), another dtype or shape do not."""
    torch.manual_seed(0)
    reference = torch.randn(64, 128, dtype=torch.bfloat16)
    rounded = reference.clone()
    rounded[0, :8] = (reference[0, :8].float() * (1 + 2**-7)).to(torch.bfloat16)
    rounded[1, 0] = reference[1, 0] * 1.03 + 0.004
    assert not torch.equal(rounded, reference) and tuning.matches(rounded, reference)
    assert not tuning.matches(reference + 1, reference)
    assert not tuning.matches(reference.float(), reference)
    assert not tuning.matches(reference[:32], reference)


def test_fused_rotary_stands_in_once_checked() -> None:
    """The first plain call checks the kernel against the model's own function; later calls run the kernel alone;
    position ids or fp32 tensors go to the model's own function."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    calls: list[str] = []

    def original(*args: Any, **kwargs: Any) -> Any:
        calls.append("original")
        return apply_rotary_pos_emb(*args, **kwargs)

    def kernel(*args: Any) -> Any:
        calls.append("kernel")
        return apply_rotary_pos_emb(*args)

    apply = fused_rotary(original, kernel)
    q, k, cos, sin = _rotary_inputs()
    for got, want in zip(apply(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    apply(q, k, cos, sin)
    assert calls == ["original", "kernel", "kernel"]
    apply(q, k, cos, sin, unsqueeze_dim=1)
    apply(q.float(), k.float(), cos.float(), sin.float())
    assert calls[3:] == ["original", "original"]


def test_fused_rotary_keeps_a_function_that_computes_something_else() -> None:
    """A kernel that disagrees on the first call, or fails on it, is dropped: the model's own results, then and from
    then on."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    kernel_calls: list[str] = []

    def unrotated(q: torch.Tensor, k: torch.Tensor, *_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_calls.append("unrotated")
        return q, k

    def failing(*_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_calls.append("failing")
        raise ValueError("head_dim must be a power of two")

    q, k, cos, sin = _rotary_inputs()
    for kernel in (unrotated, failing):
        apply = fused_rotary(apply_rotary_pos_emb, kernel)
        for _ in range(2):
            for got, want in zip(apply(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
                assert torch.equal(got, want)
    assert kernel_calls == ["unrotated", "failing"]


def test_tuned_engine_swaps_the_models_rotary_function() -> None:
    """The model's modeling module gets the stand-in inside the block, its own function afterwards."""
    from transformers.models.qwen3 import modeling_qwen3

    model = modeling_qwen3.Qwen3ForCausalLM(qwen3_config(scaled_shape(QWEN3_8B, 1, 1 / 32)))
    assert tuning.rotary_modules(model) == [modeling_qwen3]
    original = modeling_qwen3.apply_rotary_pos_emb
    with tuned_engine(TuningPlan(enabled=True, reason="test", fused_rope=True, liger_kernels=True), model):
        assert modeling_qwen3.apply_rotary_pos_emb is not original
    assert modeling_qwen3.apply_rotary_pos_emb is original


@pytest.mark.skipif(not torch.cuda.is_available() or not tuning.liger_installed(), reason="needs a GPU and liger")
def test_liger_kernels_compute_what_transformers_does_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel's RoPE and RMSNorm against Qwen3's own on CUDA, bf16, and a tuned forward of a two-layer model
    through both kernels against the plain one."""
    from transformers.models.qwen3 import modeling_qwen3

    q, k, cos, sin = (t.cuda() for t in _rotary_inputs())
    want = modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)
    for got, expected in zip(tuning.liger_rope(q.clone(), k.clone(), cos, sin), want, strict=True):
        assert tuning.matches(got, expected)
    norm = modeling_qwen3.Qwen3RMSNorm(4096).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(3, 7, 4096, device="cuda", dtype=torch.bfloat16) * 3
    assert tuning.matches(tuning.liger_rms_norm(x, norm.weight, 1e-6), norm(x))

    calls: list[str] = []
    for name in ("liger_rope", "liger_rms_norm"):
        kernel = getattr(tuning, name)
        monkeypatch.setattr(tuning, name, lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
    model = modeling_qwen3.Qwen3ForCausalLM(qwen3_config(scaled_shape(QWEN3_8B, 2, 1 / 8))).cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    plan = TuningPlan(enabled=True, reason="test", fused_norm=True, fused_rope=True, liger_kernels=True)
    with torch.no_grad():
        plain = model(ids).logits.float()
        with tuned_engine(plan, model):
            for _ in range(2):  # the first forward checks each stand-in, the second runs the kernels alone
                tuned = model(ids).logits.float()
    assert calls.count("liger_rope") == 2 * 2 and calls.count("liger_rms_norm") == 2 * (2 * 4 + 1)
    assert (tuned - plain).abs().max() < 0.05 * plain.abs().max()


def _quantize(
    model: Any, tokenizer: Any, calibration: Any, eval_ids: torch.Tensor, spec: QuantizeSpec, plan: Any
) -> Any:
    from pipeline.backends.llmcompressor_backend import Backend
    from pipeline.bench.benchmark import log_probs, quantized_weights

    reference = log_probs(model, eval_ids)
    Backend().quantize(model, tokenizer, calibration, spec, seed=0, plan=plan)
    return SimpleNamespace(
        reference=reference, logp=log_probs(model, eval_ids), weights=quantized_weights(model), model=model
    )


def _compare(default: Any, tuned: Any) -> tuple[float, float, float]:
    """KL vs unquantized of both runs and the fraction of quantized weights that are identical."""
    from pipeline.eval.fidelity import mean_kl

    equal = sum(int((default.weights[n] == w).sum()) for n, w in tuned.weights.items())
    total = sum(w.numel() for w in tuned.weights.values())
    return mean_kl(default.reference, default.logp), mean_kl(tuned.reference, tuned.logp), equal / total


def _tiny_run(spec: QuantizeSpec, plan: TuningPlan | None, dtype: torch.dtype, layers: int = 1) -> Any:
    from datasets import Dataset

    from pipeline.bench.synthetic_model import build_model, random_token_ids, synthetic_tokenizer, write_model_dir

    shape = scaled_shape(QWEN3_8B, layers, 1 / 32)
    model_dir = write_model_dir(shape, Path(tempfile.mkdtemp(prefix="qpipe-test-")) / "m")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, shape.vocab_size, (n,), generator=generator).tolist() for n in [24] * 6 + [16] * 3]
    calibration = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    model = build_model(shape, 0, "cpu", model_dir, dtype=dtype)
    tokenizer = synthetic_tokenizer()
    return _quantize(model, tokenizer, calibration, random_token_ids(2, 24, shape.vocab_size, 1), spec, plan)


def test_exact_batching_and_gram_hessian_reproduce_the_default_weights() -> None:
    """Equal-length batches of 4 and the Gram-product Hessian (bf16 activations): the same GPTQ weights.

    The Hessian is the same sum of outer products taken in another order (one matmul over the batch instead of
    per-sample updates), so it is bit-identical only where the CPU's BLAS happens to sum in the same order; on
    an AVX-512 CPU 0.99994 of the weights matched. A reordered sum can move a weight that sits on a rounding
    boundary by one int4 step, so: at most 0.1 % of the weights differ and KL stays within 1 %."""
    plan = TuningPlan(enabled=True, reason="test", batch_size=4, fast_hessian=True)
    default = _tiny_run(GPTQ.model_copy(update={"tuning": "off"}), None, torch.bfloat16)
    tuned = _tiny_run(GPTQ, plan, torch.bfloat16)
    kl_default, kl_tuned, equal = _compare(default, tuned)
    assert equal >= 0.999
    assert abs(kl_tuned - kl_default) <= 0.01 * kl_default


def test_fast_factorization_keeps_the_gptq_weights() -> None:
    """Inside a real `oneshot`: the flipped, shared factorization gives the weights of llm-compressor's own, but
    for a weight on a rounding boundary (the factors differ in the last bits)."""
    plan = TuningPlan(enabled=True, reason="test", batch_size=4, fast_hessian=True)
    default = _tiny_run(GPTQ, plan, torch.float32)
    fast = _tiny_run(GPTQ, plan.model_copy(update={"fast_factorization": True}), torch.float32)
    kl_default, kl_fast, equal = _compare(default, fast)
    assert equal >= 0.999
    assert abs(kl_fast - kl_default) <= 0.01 * kl_default


def test_save_writes_shards_the_export_can_hash_side_by_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`SHARD_SIZE` reaches transformers through llm-compressor's save wrapper: several shards and their index."""
    from pipeline.backends import llmcompressor_backend
    from pipeline.bench.synthetic_model import synthetic_tokenizer
    from pipeline.run.manifest import hash_tree

    run = _tiny_run(GPTQ, None, torch.float32)
    monkeypatch.setattr(llmcompressor_backend, "SHARD_SIZE", "1MB")
    llmcompressor_backend.Backend().save(run.model, synthetic_tokenizer(), tmp_path)
    shards = {p.name for p in tmp_path.glob("model-*.safetensors")}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert shards <= set(hash_tree(tmp_path))


def test_compressing_first_writes_the_same_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GPU-resident model's save (compressed in place first, as distributed ranks must) writes the files
    llm-compressor's own save writes, byte for byte. Two identical runs, so the second model is still
    uncompressed when `compress_in_place` reaches it."""
    from pipeline.backends import llmcompressor_backend

    own, first = (_tiny_run(GPTQ, None, torch.float32) for _ in range(2))
    monkeypatch.setattr(llmcompressor_backend, "SHARD_SIZE", "1MB")
    assert llmcompressor_backend.save_compressed(own.model, tmp_path / "own") == {}  # on the host: nothing extra
    monkeypatch.setattr(llmcompressor_backend, "gpu_resident", lambda model: True)
    parts = llmcompressor_backend.save_compressed(first.model, tmp_path / "copy")
    assert set(parts) == {"compress_s"}
    files = {p.name: p.read_bytes() for p in (tmp_path / "own").iterdir()}
    assert len(files) > 3 and files == {p.name: p.read_bytes() for p in (tmp_path / "copy").iterdir()}


def test_concurrent_solves_give_the_weights_of_solves_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a real `oneshot`: every layer's modules are solved in one thread per input width (two here), every
    module once, under the TF32 setting made before the threads start, and the weights are those of the solves in
    turn (but for a weight on a rounding boundary, where a BLAS called from another thread summed in another
    order)."""
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    calls: list[tuple[str, int]] = []
    compress = GPTQModifier.compress_module_list

    def recorded(modifier: Any, modules: list[torch.nn.Module]) -> None:
        calls.extend((threading.current_thread().name, m.weight.shape[-1]) for m in modules)
        precisions.add(torch.backends.cuda.matmul.fp32_precision)
        compress(modifier, modules)

    precisions: set[str] = set()
    monkeypatch.setattr(GPTQModifier, "compress_module_list", recorded)
    plan = TuningPlan(
        enabled=True, reason="test", batch_size=4, fast_hessian=True, fast_factorization=True, tf32_updates=True
    )
    in_turn = _tiny_run(GPTQ, plan, torch.float32, layers=2)
    assert {thread for thread, _ in calls} == {threading.main_thread().name}
    modules = len(calls)
    calls.clear()
    side_by_side = _tiny_run(GPTQ, plan.model_copy(update={"concurrent_solves": True}), torch.float32, layers=2)
    threads = {width: {thread for thread, w in calls if w == width} for _, width in calls}
    assert len(calls) == modules and len(threads) == 2
    assert all(threading.main_thread().name not in names for names in threads.values())
    assert precisions == {"tf32"}  # set before the threads start, for every one of them
    kl_in_turn, kl_side_by_side, equal = _compare(in_turn, side_by_side)
    assert equal >= 0.999
    assert abs(kl_side_by_side - kl_in_turn) <= 0.01 * kl_in_turn


def _counted_runs(
    spec: QuantizeSpec, plan: TuningPlan, field: str, values: tuple[Any, ...], counter: list[int]
) -> list[Any]:
    """Two-layer `_tiny_run`s with `plan.<field>` set to each of `values`; each run's `count` is how many entries
    `counter` (filled by a monkeypatched call) gained during it."""
    runs = []
    for value in values:
        counter.clear()
        runs.append(_tiny_run(spec, plan.model_copy(update={field: value}), torch.float32, layers=2))
        runs[-1].count = len(counter)
    return runs


def test_awq_without_propagation_pass_runs_each_layer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`propagate_error=False` drops the second forward of every subgraph, and AWQ's result stays within 5 % KL
    of the run with it (two layers, so the second layer's inputs come from the first's outputs)."""
    from llmcompressor.pipelines.sequential.helpers import Subgraph

    forwards: list[int] = []
    forward = Subgraph.forward
    monkeypatch.setattr(Subgraph, "forward", lambda self, *a, **kw: forwards.append(1) or forward(self, *a, **kw))
    plan = TuningPlan(enabled=True, reason="test", batch_size=4)
    with_pass, without = _counted_runs(AWQ, plan, "propagate_error", (True, False), forwards)
    assert with_pass.count == 2 * without.count
    kl_with, kl_without, _ = _compare(with_pass, without)
    assert abs(kl_without - kl_with) <= 0.05 * kl_with


@pytest.mark.parametrize("stride", [1, 2])
def test_awq_search_scores_every_stride_th_batch_inside_oneshot(stride: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real `oneshot`, the loss that ranks AWQ's candidates sees batches 0, stride, ... of the 3 cached ones
    (9 samples in batches of 4, 2 and 3)."""
    from llmcompressor.modifiers.transform.awq.base import AWQModifier

    scored: list[int] = []
    compute_loss = AWQModifier._compute_loss

    def counting_loss(self: Any, fp16_outputs: list[torch.Tensor], int_w_outputs: list[torch.Tensor]) -> float:
        scored.append(sum(output.shape[0] for output in fp16_outputs))
        return compute_loss(self, fp16_outputs, int_w_outputs)

    monkeypatch.setattr(AWQModifier, "_compute_loss", counting_loss)
    plan = TuningPlan(enabled=True, reason="test", batch_size=4, awq_search_stride=stride)
    _tiny_run(AWQ, plan, torch.float32)
    assert scored and set(scored) == {9 if stride == 1 else 4 + 3}


def test_calibration_pass_skips_the_last_product_with_identical_gptq_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two layers, three batches: the calibration pass computes `down_proj` only on each layer's first batch, the
    propagation pass on all three; the Hessians, so every quantized weight, stay the same bit for bit."""
    intermediate = scaled_shape(QWEN3_8B, 2, 1 / 32).intermediate_size
    products: list[int] = []
    linear_forward = torch.nn.Linear.forward

    def counting(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.in_features == intermediate:
            products.append(1)
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    plan = TuningPlan(enabled=True, reason="test", batch_size=4, fast_hessian=True)
    full, skipped = _counted_runs(GPTQ, plan, "skip_tail", (False, True), products)
    assert _compare(full, skipped)[2] == 1.0
    log_prob_products = 2 * 2 * 2  # two log-prob passes (before, after) over two samples, per layer
    assert full.count - log_prob_products == 2 * (3 + 3)
    assert skipped.count - log_prob_products == 2 * (1 + 3)


def _full_plan(spec: QuantizeSpec) -> TuningPlan:
    """What `plan_tuning` turns on for `spec` on a GPU, at batch 4 and without AWQ's search subsample."""
    gptq = spec.method == "gptq"
    return TuningPlan(
        enabled=True,
        reason="test",
        batch_size=4,
        fast_hessian=gptq,
        fused_attention=True,
        fused_norm=True,
        fast_factorization=gptq,
        tf32_updates=gptq,
        propagate_error=gptq,
        skip_tail=gptq,
        gram_block=16,
    )


@pytest.mark.parametrize("spec", [GPTQ, AWQ], ids=["gptq", "awq"])
def test_full_tuned_plan_keeps_kl_on_cpu(spec: QuantizeSpec) -> None:
    """Everything the GPU plan turns on for a calibration set this small (AWQ's search subsample starts at twice
    `AWQ_SEARCH_TOKENS`), forced on CPU: KL vs the unquantized model within 5 % of the default's."""
    plan = _full_plan(spec)
    default = _tiny_run(spec.model_copy(update={"tuning": "off"}), None, torch.float32)
    tuned = _tiny_run(spec, plan, torch.float32)
    kl_default, kl_tuned, _ = _compare(default, tuned)
    assert kl_default > 0
    assert abs(kl_tuned - kl_default) <= 0.05 * kl_default


@pytest.mark.e2e
@pytest.mark.parametrize(("spec", "samples"), [(GPTQ, 16), (AWQ, 8)], ids=["gptq", "awq"])
def test_tuned_plan_on_the_demo_model(demo_model_dir: Path, spec: QuantizeSpec, samples: int) -> None:
    """The demo model on its own calibration texts: tuned KL within 5 % of the default path's."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.corpus import heldout_records
    from pipeline.recipe.load import resolve_data_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    lines = resolve_data_path("calibration/demo-calibration.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines[:samples]]
    encoded = tokenizer(texts, truncation=True, max_length=64)
    calibration = Dataset.from_dict(dict(encoded))
    held = tokenizer([r["text"] for r in heldout_records()[:16]], truncation=True, max_length=64)["input_ids"]
    eval_ids = torch.tensor([ids for ids in held if len(ids) == 64][:4])
    plan = _full_plan(spec)
    runs = []
    for run_spec, run_plan in ((spec.model_copy(update={"tuning": "off"}), None), (spec, plan)):
        model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)  # bf16 matmuls crawl on CPU
        runs.append(_quantize(model, tokenizer, calibration, eval_ids, run_spec, run_plan))
    kl_default, kl_tuned, equal = _compare(*runs)
    print(f"demo {spec.method}: KL default {kl_default:.5g} tuned {kl_tuned:.5g}, weights equal {equal:.2%}")
    assert abs(kl_tuned - kl_default) <= 0.05 * kl_default
