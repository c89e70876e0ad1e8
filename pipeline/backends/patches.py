"""Every change qpipe makes to another library's internals, in one place and version-guarded.

Each swap names the distribution and the versions it was written against. Outside them the library is left
as it is and one warning says which change was skipped, so a newer release degrades to the library's own
behaviour (slower, or a documented limitation) instead of failing inside a private function.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.run.context import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)
LLMCOMPRESSOR = ("llmcompressor", "==0.14.*")
TRANSFORMERS = ("transformers", ">=5.0,<6")
GPTQMODEL = ("gptqmodel", "==7.6.*")


def written_for(library: tuple[str, str], what: str) -> bool:
    """Whether the installed `library` (distribution, version specifier) is one `what` was written for."""
    distribution, versions = library
    installed = importlib.metadata.version(distribution)
    if Version(installed) in SpecifierSet(versions):
        return True
    log.warning(
        "%s %s is outside %s, which %s was written for: running without it", distribution, installed, versions, what
    )
    return False


@contextmanager
def swap_attribute(owner: Any, name: str, value: Any, library: tuple[str, str]) -> Iterator[None]:
    """`owner.name = value` for the block, restored afterwards."""
    what = f"the swap of {getattr(owner, '__name__', owner)}.{name}"
    if not hasattr(owner, name) or not written_for(library, what):
        yield
        return
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def swap_item(mapping: MutableMapping[str, Any], key: str, value: Any, library: tuple[str, str]) -> Iterator[None]:
    """`mapping[key] = value` for the block; afterwards the previous value, or no key if there was none."""
    if not written_for(library, f"the swap of {key!r} in {type(mapping).__name__}"):
        yield
        return
    missing = object()
    original = mapping.get(key, missing)
    mapping[key] = value
    try:
        yield
    finally:
        if original is missing:
            del mapping[key]
        else:
            mapping[key] = original


def transformers_without_sklearn() -> None:
    """For the rest of the process, transformers sees scikit-learn as absent. Its generation module, which every
    model class imports, imports scikit-learn's metrics (about 1 s; installed for lm-eval) for one use: assisted
    decoding's confidence threshold, which qpipe never runs in its own processes. Call it before transformers
    imports a model class."""
    import transformers.utils
    from transformers.utils import import_utils

    if not written_for(TRANSFORMERS, "skipping scikit-learn's import"):
        return
    transformers.utils.is_sklearn_available = import_utils.is_sklearn_available = _absent


def _absent() -> bool:
    return False


def llmcompressor_hessian(accumulate: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """GPTQ's Hessian accumulation (`llmcompressor.modifiers.gptq.base.accumulate_hessian`) replaced by
    `accumulate(original)`."""
    from llmcompressor.modifiers.gptq import base

    return swap_attribute(base, "accumulate_hessian", accumulate(base.accumulate_hessian), LLMCOMPRESSOR)


def llmcompressor_factorization(factorize: Callable[..., Any]) -> Any:
    """GPTQ's Hessian factorization (`factorize_hessian`, as `quantize_weight` imported it) replaced by
    `factorize`."""
    from llmcompressor.modifiers.gptq import gptq_quantize

    return swap_attribute(gptq_quantize, "factorize_hessian", factorize, LLMCOMPRESSOR)


def llmcompressor_compress_modules(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """GPTQ's solve of a layer's calibrated modules (`GPTQModifier.compress_module_list(modifier, modules)`)
    replaced by `wrap(original)`."""
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    return swap_attribute(GPTQModifier, "compress_module_list", wrap(GPTQModifier.compress_module_list), LLMCOMPRESSOR)


def llmcompressor_awq_samples(run_samples: Callable[..., Any]) -> Any:
    """AWQ's `_run_samples` (the parent module's forward over every cached batch, run once per grid point of its
    scale search) replaced by `run_samples(modifier, module)`."""
    from llmcompressor.modifiers.transform.awq.base import AWQModifier

    return swap_attribute(AWQModifier, "_run_samples", run_samples, LLMCOMPRESSOR)


def llmcompressor_subgraph_forward(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """The sequential pipeline's `Subgraph.forward` (one traced layer on one batch) replaced by `wrap(original)`."""
    from llmcompressor.pipelines.sequential.helpers import Subgraph

    return swap_attribute(Subgraph, "forward", wrap(Subgraph.forward), LLMCOMPRESSOR)


def llmcompressor_no_pinning() -> Any:
    """AWQ's activation cache pins host memory, which CPU-only torch refuses; without an accelerator
    there is no copy to speed up, so pinning becomes a no-op."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    return swap_attribute(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None, LLMCOMPRESSOR)


def transformers_eager_attention(function: Callable[..., Any]) -> Any:
    """transformers' "eager" attention (which llm-compressor forces while calibrating) routed to `function`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return swap_item(ALL_ATTENTION_FUNCTIONS._local_mapping, "eager", function, TRANSFORMERS)


def transformers_weight_copy(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """transformers' copy of one checkpoint tensor onto its device while loading (`core_model_loading.
    _materialize_copy`, which its loader threads call) replaced by `wrap(original)`."""
    from transformers import core_model_loading

    original = core_model_loading._materialize_copy
    return swap_attribute(core_model_loading, "_materialize_copy", wrap(original), TRANSFORMERS)


def transformers_norm_forward(cls: type, forward: Callable[..., Any]) -> Any:
    """A transformers RMSNorm class's `forward` replaced by `forward`."""
    return swap_attribute(cls, "forward", forward, TRANSFORMERS)


def transformers_rotary(modeling: ModuleType, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """A transformers modeling module's `apply_rotary_pos_emb`, which its attention classes look up when called,
    replaced by `wrap(original)`."""
    return swap_attribute(modeling, "apply_rotary_pos_emb", wrap(modeling.apply_rotary_pos_emb), TRANSFORMERS)


@contextmanager
def shards_on_every_rank(write: Callable[..., Any]) -> Iterator[bool]:
    """llm-compressor's compressed save, and the transformers save inside it, writing on every rank of a process
    group (both write on rank 0 only), each shard through `write(tensors, filename, metadata=...)` instead of
    safetensors' `save_file`, which `write` may skip. Yields whether all three swaps apply: with some alone a
    rank would write nothing, or every rank all."""
    from llmcompressor.transformers.compression import compressed_tensors_utils
    from transformers import modeling_utils
    from transformers.distributed.mixin import DistributedMixin

    swaps = [
        (modeling_utils, "safe_save_file", write, TRANSFORMERS),
        (DistributedMixin, "should_save_on_this_rank", lambda self, is_main_process: is_main_process, TRANSFORMERS),
        (compressed_tensors_utils, "is_source_process", lambda: True, LLMCOMPRESSOR),
    ]
    what = "the shard writes on every rank"
    if not all(hasattr(owner, name) for owner, name, _, _ in swaps) or not all(
        written_for(library, what) for library in (TRANSFORMERS, LLMCOMPRESSOR)
    ):
        yield False
        return
    with ExitStack() as stack:
        for owner, name, value, library in swaps:
            stack.enter_context(swap_attribute(owner, name, value, library))
        yield True


def gptqmodel_log_dir(path: Path) -> Any:
    """GPTQModel writes per-layer logs to `logs/` of the working directory; they go to `path` instead."""
    from gptqmodel.looper import loop_processor

    return swap_attribute(loop_processor, "_PROJECT_LOG_DIR", path, GPTQMODEL)
