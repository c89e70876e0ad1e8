"""vLLM smoke-test worker; runs INSIDE the vLLM venv, never in the main env.

Usage: ``<vllm-env>/bin/python pipeline/vllm/worker.py [request.json]`` (stdin when no path is given).
It imports only the standard library, vllm and what vllm brings, so it runs by file path without
installing qpipe into the vLLM env. One JSON request in, one JSON result on stdout; logs on stderr.

Request keys: ``model`` (dir, required), ``prompts`` (list[str], required unless ``serving``), ``max_tokens``
(16), ``chat_template`` (false), ``kv_cache_gib`` (1.0; null: what ``gpu_memory_utilization`` leaves),
``max_model_len`` (1024), ``tensor_parallel_size`` (1), ``gpu_memory_utilization`` (null: vLLM's default),
``enforce_eager`` (true; false: CUDA graphs), ``trust_remote_code`` (false), ``seed`` (0), ``logprobs`` (1),
``serving`` (null, or ``{"prompt_tokens", "output_tokens", "concurrency": [...]}``: serving figures instead of
the smoke generations).
Result ``status`` is ``ok``, ``error`` or ``unsupported-on-this-platform`` (exit code 0, 1 or 2).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "max_tokens": 16,
    "chat_template": False,
    "kv_cache_gib": 1.0,
    "max_model_len": 1024,
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": None,
    "enforce_eager": True,
    "trust_remote_code": False,
    "seed": 0,
    "logprobs": 1,
    "serving": None,
}
EXIT_CODES = {"ok": 0, "error": 1, "unsupported-on-this-platform": 2}
GIB = 1 << 30
RSS_POLL_S = 0.1
CAPTURE_LIMIT = 4 << 20  # bytes of recent stderr kept for error analysis
DRAIN_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
# vLLM code that rejects a quantization method/scheme/kernel (the MoE kernel oracle too), and its compiled-op
# wrapper module.
QUANT_CODE = (
    "vllm/model_executor/layers/quantization/",
    "vllm/model_executor/kernels/",
    "vllm/model_executor/layers/fused_moe/oracle/",
)
PLATFORM_CODE = "vllm/platforms/"
VLLM_OPS_MODULE = "vllm/_custom_ops.py"
TORCH_OP_CALL = "torch/_ops.py"
# Offline (a bad local path must not become a hub download) and no telemetry.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# What vLLM's engine logs at start-up (stable wording since 0.8): KV cache capacity in tokens and sequences.
ENGINE_LOG_FIGURES = {
    "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
}
# "(EngineCore pid=12) ERROR 11-25 15:14:58 [core.py:1510] " prefixes on vLLM child-process lines.
LOG_PREFIX = re.compile(r"^\([\w.-]+ pid=\d+\) (?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\] )?")
FRAME_LINE = re.compile(r'^\s+File "(?P<file>[^"]+)", line \d+')
EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?$")


class RequestError(ValueError):
    """The request itself is invalid."""


class TerminatedError(Exception):
    """SIGTERM received: report it and let vLLM shut its engine processes down on exit."""


def _on_sigterm(signum: int, _frame: Any) -> None:
    """Turn SIGTERM into an exception so the worker still writes a result and vLLM cleans up."""
    raise TerminatedError(f"worker received signal {signum} (SIGTERM)")


@dataclass(frozen=True)
class Failure:
    """One raised exception: type name, message (one line) and the files of its stack, outermost first."""

    type: str
    message: str
    files: tuple[str, ...]

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        """Describe an exception raised in this process."""
        frames = traceback.extract_tb(exc.__traceback__)
        files = tuple(frame.filename.replace(os.sep, "/") for frame in frames)
        return cls(type(exc).__name__, " ".join(str(exc).split()), files)

    def one_line(self) -> str:
        """``Type: message`` on one line."""
        return f"{self.type}: {self.message}" if self.message else self.type


class OutputCapture:
    """Routes fds 1 and 2 through a pipe, copying everything to the real stderr and keeping the tail.

    vLLM's engine and worker processes inherit these fds, so their tracebacks (the real cause of an
    "Engine core initialization failed") are captured too. The real stdout is kept for the result.
    """

    def __init__(self) -> None:
        self.result_stream = os.fdopen(os.dup(1), "w")
        self._stderr = os.dup(2)
        self._read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        sys.stdout = sys.stderr  # Python-level prints go to the log channel too
        self._buffer = bytearray()
        self._total = 0  # bytes ever captured
        self._stage_start = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def begin_stage(self) -> None:
        """Start a new stage: later ``stage_text`` calls return only what is printed from now on."""
        self.drain()
        with self._lock:
            self._stage_start = self._total

    def stage_text(self) -> str:
        """What was printed since the current stage began (at most the kept tail)."""
        self.drain()
        with self._lock:
            kept = min(self._total - self._stage_start, len(self._buffer))
            return self._buffer[len(self._buffer) - kept :].decode(errors="replace")

    def drain(self) -> None:
        """Wait (bounded) until everything written to the pipe so far has been copied out."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while select.select([self._read_fd], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.05)

    def _pump(self) -> None:
        while True:
            select.select([self._read_fd], [], [])
            with self._lock:
                chunk = os.read(self._read_fd, 1 << 16)
                self._total += len(chunk)
                self._buffer += chunk
                del self._buffer[:-CAPTURE_LIMIT]
            if not chunk:
                return
            try:
                os.write(self._stderr, chunk)
            except OSError:  # caller stopped reading our stderr: keep draining so vLLM never blocks
                continue


class RssMonitor:
    """Samples the summed RSS of this process and all its descendants; keeps the peak."""

    def __init__(self) -> None:
        import psutil  # a vllm dependency

        self._proc = psutil.Process()
        self._error = psutil.Error
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Record the current tree RSS."""
        total = 0
        try:
            tree = [self._proc, *self._proc.children(recursive=True)]
        except self._error:
            return
        for proc in tree:
            try:
                total += proc.memory_info().rss
            except self._error:  # exited meanwhile
                continue
        self.peak = max(self.peak, total)

    def stop(self) -> int:
        """Stop sampling and return the peak tree RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(RSS_POLL_S):
            self.sample()


def read_request(argv: list[str]) -> dict[str, Any]:
    """Parse the request from the file named in ``argv`` or from stdin, and apply defaults."""
    raw = Path(argv[0]).read_text() if argv else sys.stdin.read()
    try:
        request = {**DEFAULTS, **json.loads(raw)}
    except (ValueError, TypeError) as exc:
        raise RequestError(f"request is not a JSON object: {exc}") from exc
    model = request.get("model")
    if not isinstance(model, str) or not (Path(model) / "config.json").is_file():
        raise RequestError(f"not a model directory (no config.json): {model}")
    prompts = request.get("prompts")
    if request["serving"] is None and (
        not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts)
    ):
        raise RequestError("'prompts' must be a non-empty list of strings")
    return request


def quantization_config(model_dir: str) -> dict[str, Any] | None:
    """The ``quantization_config`` block of the checkpoint's config.json."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")


def layer_quant_summary(model: Any) -> dict[str, int]:
    """Count the model's modules by quantization scheme (``layer.scheme``, with its kernels) or quant method."""
    counts: dict[str, int] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        scheme = getattr(module, "scheme", None)
        name = type(scheme if scheme is not None else method).__name__
        kernels = sorted(
            {type(v).__name__ for v in getattr(scheme, "__dict__", {}).values() if type(v).__name__.endswith("Kernel")}
        )
        if kernels:
            name = f"{name}[{','.join(kernels)}]"
        counts[name] = counts.get(name, 0) + 1
    return counts


def weight_figures(model: Any) -> dict[str, Any]:
    """The device, the bytes of the model's parameters and buffers on it, and of its input embedding (of which a
    decode step reads one row, so it does not count towards the bytes read per token)."""
    import torch

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    tensors = [*model.parameters(), *model.buffers()]
    embeddings = [m for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"]  # not the LM head
    device = tensors[0].device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "weights_bytes": nbytes(tensors),
        "embedding_bytes": sum(nbytes(m.parameters()) for m in embeddings),
    }


class InspectionExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``), so ``collective_rpc`` calls it by name and
    nothing is pickled. vLLM resolves it as ``__main__.InspectionExtension`` in its engine processes, which
    inherit (fork) or re-import (spawn) this file as their main module."""

    def qpipe_layer_schemes(self) -> dict[str, int]:
        return layer_quant_summary(self.get_model())  # type: ignore[attr-defined]  (a method of vLLM's worker)

    def qpipe_weight_figures(self) -> dict[str, Any]:
        return weight_figures(self.get_model())  # type: ignore[attr-defined]


def versions() -> dict[str, str | None]:
    """Versions of vllm (from the module, whatever its distribution name), torch and compressed-tensors."""
    import torch
    import vllm

    try:
        import compressed_tensors

        ct_version = compressed_tensors.__version__
    except ImportError:
        ct_version = None
    return {"vllm": vllm.__version__, "torch": torch.__version__, "compressed_tensors": ct_version}


def load_engine(request: dict[str, Any], result: dict[str, Any]) -> Any:
    """Construct ``vllm.LLM`` without a ``quantization=`` override and record what it detected."""
    from vllm import LLM

    started = time.perf_counter()
    utilization = request["gpu_memory_utilization"]
    sizing = {"gpu_memory_utilization": utilization} if utilization else {}
    if request["kv_cache_gib"] is not None:
        sizing["kv_cache_memory_bytes"] = int(request["kv_cache_gib"] * GIB)
    llm = LLM(
        model=request["model"],
        **sizing,
        enforce_eager=request["enforce_eager"],
        seed=request["seed"],
        max_model_len=request["max_model_len"],
        tensor_parallel_size=request["tensor_parallel_size"],
        trust_remote_code=request["trust_remote_code"],
        worker_extension_cls=f"{__name__}.{InspectionExtension.__name__}",
    )
    result["timings"]["load_s"] = round(time.perf_counter() - started, 3)
    model_config = llm.llm_engine.model_config
    result["quantization"] = {
        "method": model_config.quantization,
        "dtype": str(model_config.dtype),
        "layer_schemes": llm.collective_rpc("qpipe_layer_schemes")[0],
        "config": quantization_config(request["model"]),
    }
    return llm


def build_prompts(llm: Any, request: dict[str, Any]) -> list[Any]:
    """Token prompts, optionally rendered through the model's chat template."""
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    if request["chat_template"]:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("chat_template requested but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in request["prompts"]
        ]
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    else:
        ids = [tokenizer.encode(p) for p in request["prompts"]]
    return [TokensPrompt(prompt_token_ids=i) for i in ids]


def finite_or_str(value: float) -> float | str:
    """JSON-safe logprob: the float when finite, else ``"nan"``/``"inf"``/``"-inf"``."""
    return value if math.isfinite(value) else str(value)


def generation_record(prompt: str, output: Any) -> dict[str, Any]:
    """Token ids, text, chosen-token logprobs (plus top-k) and a non-finite flag for one prompt."""
    completion = output.outputs[0]
    chosen, top = [], []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs or [], strict=False):
        chosen.append(candidates[token_id].logprob)
        top.append({str(t): finite_or_str(lp.logprob) for t, lp in candidates.items()})
    return {
        "prompt": prompt,
        "prompt_tokens": len(output.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "logprobs": [finite_or_str(v) for v in chosen],
        "top_logprobs": top,
        "nonfinite_logprobs": not all(math.isfinite(v) for v in chosen),
    }


def generate(llm: Any, request: dict[str, Any], result: dict[str, Any]) -> None:
    """Warm up, time the first token of one prompt, then run the greedy batch (throughput, generations).

    The untimed warm-up matters: the first request that asks for logprobs pays a one-off ~2 s setup.
    """
    from vllm import SamplingParams

    prompts = build_prompts(llm, request)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=request["logprobs"])
    llm.generate(prompts[:1], params.clone(), use_tqdm=False)
    started = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    result["timings"]["ttft_s"] = round(time.perf_counter() - started, 4)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    records = [generation_record(p, o) for p, o in zip(request["prompts"], outputs, strict=True)]
    tokens = sum(len(r["token_ids"]) for r in records)
    result["timings"]["batch_s"] = round(elapsed, 3)
    result["throughput"] = {
        "prompts": len(records),
        "max_tokens": request["max_tokens"],
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 2),
    }
    result["generations"] = records
    result["nonfinite_logprobs"] = any(r["nonfinite_logprobs"] for r in records)


def engine_log_figures(text: str) -> dict[str, float]:
    """The KV cache capacity vLLM's engine logged at start-up (absent figures left out); weight memory comes from
    the model itself (`weight_figures`)."""
    figures: dict[str, float] = {}
    for key, pattern in ENGINE_LOG_FIGURES.items():
        if match := re.search(pattern, text):
            figures[key] = float(match.group(1).replace(",", ""))
    return figures


def timed_generate(llm: Any, prompts: list[Any], max_tokens: int) -> tuple[float, int]:
    """Wall seconds and output tokens of one greedy `generate` that produces exactly `max_tokens` per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def serve_figures(llm: Any, serving: dict[str, Any], seed: int, result: dict[str, Any]) -> None:
    """Batch-1 time to first token and decode speed, then output throughput at each concurrency: requests of
    `prompt_tokens` seeded random token ids each generating `output_tokens` (`ignore_eos`), all submitted at once."""
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    vocab = len(llm.get_tokenizer())
    length, output = serving["prompt_tokens"], serving["output_tokens"]

    def prompts(n: int) -> list[Any]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(length)]) for _ in range(n)]

    timed_generate(llm, prompts(2), 8)  # warm-up: first-request setup, sampler and graph paths
    ttft = sorted(timed_generate(llm, prompts(1), 1)[0] for _ in range(3))[1]
    wall, tokens = timed_generate(llm, prompts(1), output)
    result["batch1"] = {
        "ttft_s": round(ttft, 4),
        "decode_tokens_per_s": round((tokens - 1) / (wall - ttft), 2) if wall > ttft else None,
    }
    result["sweep"] = []
    for n in serving["concurrency"]:
        wall, tokens = timed_generate(llm, prompts(n), output)
        result["sweep"].append(
            {
                "requests": n,
                "wall_s": round(wall, 3),
                "output_tokens": tokens,
                "output_tokens_per_s": round(tokens / wall, 1),
                "total_tokens_per_s": round(n * (length + output) / wall, 1),
            }
        )


def parse_tracebacks(text: str) -> list[Failure]:
    """Failures printed as Python tracebacks in ``text``, in print order.

    vLLM's log prefix is stripped from each line; a multi-line message logged by a vLLM process (its
    following lines carry the same prefix) is joined into one line.
    """
    failures: list[Failure] = []
    files: list[str] | None = None
    continued_prefix = None  # prefix of the lines that continue the last failure's message
    for raw in text.splitlines():
        prefix_match = LOG_PREFIX.match(raw)
        prefix = prefix_match.group(0) if prefix_match else ""
        line = raw[len(prefix) :]
        if prefix and prefix == continued_prefix and not line.startswith("Traceback"):
            last = failures[-1]
            failures[-1] = Failure(last.type, " ".join([last.message, *line.split()]), last.files)
            continue
        continued_prefix = None
        if line.startswith("Traceback (most recent call last):"):
            files = []
        elif files is not None and (frame := FRAME_LINE.match(line)):
            files.append(frame["file"].replace(os.sep, "/"))
        elif files is not None and line.strip() and not line[0].isspace():
            match = EXCEPTION_LINE.match(line.strip())
            if match and files:
                exc_type = match["type"].rsplit(".", 1)[-1]
                failures.append(Failure(exc_type, match["message"] or "", tuple(files)))
                continued_prefix = prefix or None
            files = None
    return failures


def is_platform_unsupported(failure: Failure, loaded: bool) -> bool:
    """True when the failure means vLLM cannot run the checkpoint's quantization on this platform.

    Decided by where it was raised, not by its wording (which changes between releases): during load,
    a ValueError/NotImplementedError raised by vLLM's quantization/kernel/platform code; at any stage,
    a compiled op call that fails inside quantization code (op absent or a stub in this build, e.g. a
    kernel the AVX2 library lacks).
    """
    if not failure.files:
        return False
    innermost = failure.files[-1]
    if (
        not loaded
        and failure.type in ("ValueError", "NotImplementedError")
        and any(part in innermost for part in (*QUANT_CODE, PLATFORM_CODE))
    ):
        return True
    return (
        innermost.endswith(TORCH_OP_CALL)
        and any(f.endswith(VLLM_OPS_MODULE) for f in failure.files)
        and any(part in f for f in failure.files for part in QUANT_CODE)
    )


def error_result(exc: Exception, captured: str, result: dict[str, Any]) -> dict[str, Any]:
    """Classify a failure as ``error`` or ``unsupported-on-this-platform`` with a one-line message.

    vLLM's engine/worker processes only print the real cause; the exception raised here is generic, so
    the first traceback printed during the failing stage (the root cause) is preferred over it, unless
    the failure is the worker's own (bad request, SIGTERM).
    """
    if isinstance(exc, (RequestError, TerminatedError)):
        return {**result, "status": "error", "error": Failure.from_exception(exc).one_line()}
    loaded = "load_s" in result.get("timings", {})
    chain: list[BaseException] = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    failures = [*parse_tracebacks(captured), *(Failure.from_exception(e) for e in chain)]
    unsupported = [f for f in failures if is_platform_unsupported(f, loaded)]
    if unsupported:
        return {**result, "status": "unsupported-on-this-platform", "error": unsupported[0].one_line()}
    return {**result, "status": "error", "error": failures[0].one_line()}


def run(request: dict[str, Any], result: dict[str, Any], capture: OutputCapture) -> dict[str, Any]:
    """Load the model, generate, and fill ``result``."""
    os.environ.update(ENGINE_ENV)
    # The request decides the KV cache size; this legacy variable would silently override it on CPU.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    result["timings"] = {}
    started = time.perf_counter()
    import vllm  # noqa: F401  (timed: the import alone takes seconds)

    result["timings"]["import_s"] = round(time.perf_counter() - started, 3)
    result["versions"] = versions()
    capture.begin_stage()
    llm = load_engine(request, result)
    load_log = capture.stage_text()
    capture.begin_stage()
    if request["serving"] is not None:
        result["engine_log"] = engine_log_figures(load_log)
        result["memory"] = llm.collective_rpc("qpipe_weight_figures")[0]
        serve_figures(llm, request["serving"], request["seed"], result)
    else:
        generate(llm, request, result)
    return {**result, "status": "ok"}


def stop_with_parent() -> None:
    """Get SIGTERM when the process that started this one dies, even by SIGKILL, so that vLLM's engine (which
    holds the GPU) never outlives the qpipe run that started it (Linux: ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    """Entry point: JSON request in (file ``argv[0]`` or stdin), JSON result on the original stdout and in
    the file ``argv[1]`` when given; everything else on stderr."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    stop_with_parent()
    capture = OutputCapture()
    monitor = RssMonitor()
    result: dict[str, Any] = {}
    try:
        request = read_request(argv)
        result["model"] = str(request["model"])
        result = run(request, result, capture)
    except Exception as exc:  # every failure, whatever its type, becomes a JSON result
        result = error_result(exc, capture.stage_text(), result)
        traceback.print_exc()
    result["peak_rss_bytes"] = monitor.stop()
    capture.drain()
    if len(argv) > 1:  # a result file, as pipeline/run/processes.py passes it
        Path(argv[1]).write_text(json.dumps(result))
    capture.result_stream.write(json.dumps(result) + "\n")
    capture.result_stream.flush()
    return EXIT_CODES[result["status"]]


if __name__ == "__main__":  # vLLM's engine processes may re-import this module (spawn)
    sys.exit(main(sys.argv[1:]))
