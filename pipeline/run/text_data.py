"""Text sets from local files (.jsonl/.json/.parquet/.txt) or hub datasets: seeded selection and rendering.

Used by calibration and by the eval stage's held-out fidelity set."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.recipe.load import resolve_data_path
from pipeline.recipe.schema import CalibrateSpec
from pipeline.run.files import sha256_file
from pipeline.run.hub import hub_unreachable

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def _local_files(spec: CalibrateSpec) -> list[Path] | None:
    """The local files behind `calibrate.dataset`, or None when it names a hub dataset."""
    path = resolve_data_path(spec.dataset)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS)
        if not files:
            raise PipelineError(
                f"calibrate.dataset: {path} holds no {'/'.join(LOCAL_BUILDERS)} files; add some or fix the path"
            )
        if len({LOCAL_BUILDERS[p.suffix] for p in files}) > 1:
            raise PipelineError(f"calibrate.dataset: {path} mixes file types; keep one type per folder")
        return files
    if path.is_file():
        if path.suffix not in LOCAL_BUILDERS:
            raise PipelineError(
                f"calibrate.dataset: {path.name}: unsupported file type; use .jsonl, .json, .parquet or .txt"
            )
        return [path]
    if path.suffix in LOCAL_BUILDERS or spec.dataset.startswith((".", "/", "~")):
        raise PipelineError(f"calibrate.dataset: {spec.dataset} does not exist; fix the path")
    return None


def dataset_identity(spec: CalibrateSpec) -> dict[str, Any]:
    """What the calibration data is: file contents' hashes, or hub id + subset + split."""
    files = _local_files(spec)
    if files is None:
        return {"hub": spec.dataset, "subset": spec.subset, "split": spec.split}
    return {"files": {str(p): sha256_file(p) for p in files}}


def check_local_file(path: Path) -> None:
    """One line naming the file and the fix for what the `datasets` builders report as tracebacks: an empty
    file, and a JSON Lines line that is not a JSON object (with its line number). One streaming pass."""
    has_content = _check_jsonl(path) if path.suffix == ".jsonl" else _has_content(path)
    if not has_content:
        raise PipelineError(f"calibrate.dataset: {path} is empty; add samples or point at another file")


def _has_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace, read in blocks until the first such byte."""
    with path.open("rb") as handle:
        return any(block.strip() for block in iter(lambda: handle.read(1 << 20), b""))


def _check_jsonl(path: Path) -> bool:
    """Every non-blank line must be a JSON object; whether there was any."""
    seen = False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise PipelineError(
                    f"calibrate.dataset: {path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise PipelineError(
                    f"calibrate.dataset: {path} line {number} is not a JSON object; write one object per line"
                )
            seen = True
    return seen


def _load_raw(spec: CalibrateSpec) -> Any:
    import datasets

    files = _local_files(spec)
    for path in files or ():
        check_local_file(path)
    try:
        if files is None:
            _require_hub(spec.dataset)
            return datasets.load_dataset(spec.dataset, spec.subset, split=spec.split)
        builder = LOCAL_BUILDERS[files[0].suffix]
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ or exc  # DatasetGenerationError wraps the builder's own error
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise PipelineError(f"calibrate.dataset: cannot load {spec.dataset} ({first}); check the id or path") from None


def _require_hub(dataset: str) -> None:
    """One line within seconds, instead of `datasets`' retries, when a hub data set cannot be fetched."""
    reason = hub_unreachable(dataset, "dataset")
    if reason is not None:
        raise PipelineError(
            f"calibrate.dataset: the Hugging Face hub is unreachable for {dataset} ({reason}); point "
            "calibrate.dataset at local files (.jsonl/.json/.parquet/.txt) or set HF_HUB_OFFLINE=1 to use a cached copy"
        )


def _render(spec: CalibrateSpec, tokenizer: Any, record: dict[str, Any]) -> str:
    if not spec.uses_chat_template:
        return record[spec.text_field]
    if spec.messages_field:
        messages = record[spec.messages_field]
    else:
        messages = [{"role": "user", "content": record[spec.text_field]}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _no_chat_template_fix(spec: CalibrateSpec) -> str:
    """Chat messages cannot fall back to plain text, so their fix is another column (or other data)."""
    if spec.messages_field:
        return (
            f"calibrate.messages_field: the model's tokenizer has no chat template to render {spec.messages_field!r}; "
            "set messages_field: null and text_field to a plain-text column (ultrachat_200k: prompt), or other data"
        )
    return "calibrate.chat_template: the model's tokenizer has no chat template; set it to false"


def select_texts(spec: CalibrateSpec, tokenizer: Any) -> list[str]:
    """Seeded shuffle, first N usable records, rendered to text."""
    return list(itertools.islice(iter_texts(spec, tokenizer), spec.num_samples))


def iter_texts(spec: CalibrateSpec, tokenizer: Any) -> Iterator[str]:
    """Every usable record in seeded-shuffle order, rendered to text as it is taken (packing takes as many as
    its token budget needs)."""
    raw = _load_raw(spec)
    field = spec.messages_field or spec.text_field
    if field not in raw.column_names:
        key = "messages_field" if spec.messages_field else "text_field"
        raise PipelineError(
            f"calibrate.{key}: {field!r} is not a column of {spec.dataset} (columns: {', '.join(raw.column_names)})"
        )
    if spec.uses_chat_template and not getattr(tokenizer, "chat_template", None):
        raise PipelineError(_no_chat_template_fix(spec))
    raw = raw.filter(lambda r: bool(r[field])).shuffle(seed=spec.seed)
    if len(raw) == 0:
        raise PipelineError(f"calibrate.dataset: {spec.dataset} has no non-empty {field!r} samples; add data")
    for record in raw:
        yield _render(spec, tokenizer, record)
