"""OpenAI-client requests against a running `vllm serve`; runs INSIDE the vLLM env (stdlib + openai, which vllm
ships), by file path, like worker.py.

Usage: ``<vllm-env>/bin/python pipeline/vllm/client.py REQUEST.json RESULT.json`` with ``OPENAI_API_KEY`` set.
Request: ``base_url``, ``model``, ``prompt``, ``max_tokens``, ``concurrency`` (list[int]). Result: ``completion``
and ``usage`` of one request, ``unauthenticated_status`` (the HTTP status of a request with a wrong key), and per
concurrency level the median time to first token and the output tokens/s of that many streamed requests sent at
once (``ignore_eos``, so each generates exactly ``max_tokens``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def streamed(client: Any, request: dict[str, Any]) -> tuple[float, int]:
    """Seconds to the first streamed chunk and the completion tokens the server counted, for one request.

    Chunks are not tokens: a token that ends inside a UTF-8 character streams as empty text, and a chunk may
    carry several tokens, so the count comes from the usage the server appends to the stream."""
    started = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(
        model=request["model"],
        prompt=request["prompt"],
        max_tokens=request["max_tokens"],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "min_tokens": request["max_tokens"]},
    )
    for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else float("nan")), tokens


def level(client: Any, request: dict[str, Any], n: int) -> dict[str, Any]:
    """`n` streamed requests at once: median TTFT, output tokens/s over the wall time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(lambda _: streamed(client, request), range(n)))
    wall = time.perf_counter() - started
    tokens = sum(t for _, t in results)
    return {
        "concurrency": n,
        "ttft_s": round(statistics.median(f for f, _ in results), 4),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
    }


def run(request: dict[str, Any]) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{request['base_url']}/v1", max_retries=0, timeout=120)
    reply = client.completions.create(
        model=request["model"], prompt=request["prompt"], max_tokens=request["max_tokens"], temperature=0
    )
    wrong_key = openai.OpenAI(base_url=f"{request['base_url']}/v1", api_key="not-the-key", max_retries=0)
    try:
        wrong_key.models.list()
        refused = 200
    except openai.APIStatusError as exc:
        refused = exc.status_code
    return {
        "completion": reply.choices[0].text,
        "usage": reply.usage.model_dump() if reply.usage else None,
        "unauthenticated_status": refused,
        "levels": [level(client, request, n) for n in request["concurrency"]],
    }


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    try:
        result = run(request)
    except Exception as exc:  # every failure becomes a one-line result
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    Path(argv[1]).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
