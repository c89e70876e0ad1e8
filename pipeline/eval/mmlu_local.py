"""Offline MMLU for lm-eval's stock ``mmlu`` task.

A local copy in the original Hendrycks layout (``test/<subject>_test.csv``, ``dev/<subject>_dev.csv``,
optionally ``val/<subject>_val.csv``; no header; question, A, B, C, D, answer letter) is converted once
into the ``cais/mmlu`` shape (one parquet config per subject, README ``configs:``) so that
``datasets.load_dataset(dataset_dir, name=subject)`` works offline. A generated lm-eval include dir then
re-registers the stock per-subject tasks with only ``dataset_path`` changed: prompts, splits, few-shot
selection, metrics and the size-weighted group aggregation stay the stock ones.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.run.files import atomic_directory, sha256_file

FORMAT_VERSION = "1"
TOP_GROUP = "mmlu"
_LETTERS = "ABCD"
# Hendrycks folder / file suffix -> split name used by cais/mmlu.
_SPLITS = {"test": "test", "val": "validation", "dev": "dev"}
_REQUIRED_DIRS = ("test", "dev")


class MMLUFormatError(PipelineError):
    """The local MMLU directory does not follow the Hendrycks layout."""


@dataclass(frozen=True)
class LocalMMLU:
    """A converted local MMLU copy ready for ``TaskManager(include_path=...)``.

    ``groups`` are the stock group names that have at least one subject here (always ``mmlu``).
    """

    dataset_dir: Path
    include_path: Path
    subjects: tuple[str, ...]
    groups: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class _StockSubject:
    """One stock lm-eval MMLU subject task."""

    yaml_path: Path
    task: str
    group: str


def stock_mmlu_dir() -> Path:
    """Directory of lm-eval's stock ``mmlu`` (default variant) task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"


@cache
def stock_subjects() -> dict[str, _StockSubject]:
    """Map each stock MMLU subject (``dataset_name``) to its task YAML, task name and category group."""
    subjects = {}
    for path in sorted(stock_mmlu_dir().glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        group = cfg["tag"].removesuffix("_tasks")
        subjects[cfg["dataset_name"]] = _StockSubject(yaml_path=path, task=cfg["task"], group=group)
    return subjects


def prepare_local_mmlu(src: Path, cache_dir: Path) -> LocalMMLU:
    """Convert ``src`` (Hendrycks layout) under ``cache_dir`` once and generate the lm-eval include dir."""
    src, cache_dir = Path(src), Path(cache_dir)
    files = _split_files(src)
    fingerprint = _fingerprint(src, files)
    root = cache_dir / f"mmlu-{fingerprint}"
    dataset_dir = root / "dataset"
    if not dataset_dir.is_dir():
        with atomic_directory(dataset_dir) as tmp:
            _write_dataset(tmp, files)
    subjects = tuple(sorted(files["test"]))
    yamls = _task_yamls(dataset_dir, subjects)
    include_path = root / f"tasks-{_digest(repr(sorted(yamls.items())).encode())}"
    if not include_path.is_dir():
        with atomic_directory(include_path) as tmp:
            _write_texts(tmp, yamls)
    stock = stock_subjects()
    groups = (TOP_GROUP, *sorted({stock[s].group for s in subjects}))
    return LocalMMLU(dataset_dir, include_path, subjects, groups, fingerprint)


def _split_files(src: Path) -> dict[str, dict[str, Path]]:
    """Find ``{split: {subject: csv}}``; every test subject must be a stock subject with a dev file."""
    for name in _REQUIRED_DIRS:
        if not (src / name).is_dir():
            raise MMLUFormatError(f"{src}: missing '{name}/' directory (expected Hendrycks MMLU layout)")
    known = stock_subjects()
    files: dict[str, dict[str, Path]] = {}
    for folder, split in _SPLITS.items():
        found = {p.name.removesuffix(f"_{folder}.csv"): p for p in sorted(src.glob(f"{folder}/*_{folder}.csv"))}
        for subject, path in found.items():
            if subject not in known:
                raise MMLUFormatError(f"{path}: '{subject}' is not an MMLU subject known to lm-eval")
        files[split] = found
    if not files["test"]:
        raise MMLUFormatError(f"{src / 'test'}: no <subject>_test.csv files")
    for subject in files["test"]:
        if subject not in files["dev"]:
            raise MMLUFormatError(f"{src / 'dev'}: missing {subject}_dev.csv (few-shot split)")
    for split in ("dev", "validation"):
        files[split] = {s: p for s, p in files[split].items() if s in files["test"]}
    return files


def _fingerprint(src: Path, files: dict[str, dict[str, Path]]) -> str:
    """Hash of the converter version and every input file's relative path and bytes."""
    h = hashlib.sha256(f"qpipe-mmlu-{FORMAT_VERSION}".encode())
    for path in sorted(p for split in files.values() for p in split.values()):
        h.update(path.relative_to(src).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(path)))
    return h.hexdigest()[:16]


def _digest(data: bytes) -> str:
    """Short content hash for folder names."""
    return hashlib.sha256(data).hexdigest()[:12]


def _read_rows(path: Path, subject: str) -> dict[str, list]:
    """Parse one Hendrycks CSV into ``cais/mmlu`` columns, naming file and line on malformed rows."""
    columns: dict[str, list] = {"question": [], "subject": [], "choices": [], "answer": []}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if len(row) != 6:
                raise MMLUFormatError(f"{path}:{reader.line_num}: expected 6 columns, got {len(row)}")
            letter = row[5].strip().upper()
            if len(letter) != 1 or letter not in _LETTERS:
                raise MMLUFormatError(f"{path}:{reader.line_num}: answer must be one of A-D, got {row[5]!r}")
            columns["question"].append(row[0])
            columns["subject"].append(subject)
            columns["choices"].append(row[1:5])
            columns["answer"].append(_LETTERS.index(letter))
    if not columns["question"]:
        raise MMLUFormatError(f"{path}: no rows")
    return columns


def _write_dataset(out: Path, files: dict[str, dict[str, Path]]) -> None:
    """Write per-subject parquet files (``cais/mmlu`` features) and the README ``configs:`` naming them."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=list(_LETTERS)),
        }
    )
    configs = []
    for subject in sorted(files["test"]):
        data_files = []
        for split, by_subject in files.items():
            if subject in by_subject:
                rel = f"{subject}/{split}-00000-of-00001.parquet"
                (out / subject).mkdir(parents=True, exist_ok=True)
                rows = _read_rows(by_subject[subject], subject)
                pq.write_table(pa.Table.from_pydict(rows, schema=features.arrow_schema), out / rel)
                data_files.append({"split": split, "path": rel})
        configs.append({"config_name": subject, "data_files": data_files})
    header = yaml.safe_dump({"configs": configs}, sort_keys=False)
    (out / "README.md").write_text(f"---\n{header}---\n# MMLU (local copy, converted by qpipe)\n")


def _task_yamls(dataset_dir: Path, subjects: tuple[str, ...]) -> dict[str, str]:
    """Task YAMLs that ``include:`` the stock ones, overriding only ``dataset_path`` (and group members).

    Re-registering a stock name from an include path replaces the stock entry, and the stock category
    tags (``mmlu_stem_tasks``...) are rebuilt from the re-registered subjects only, so the stock category
    groups aggregate over the subjects present; the top group lists only the categories present. The
    category groups are re-included too, so the dir is self-contained (``include_defaults=False`` works).
    """
    stock = stock_subjects()
    yamls = {
        f"{stock[s].task}.yaml": _dump({"include": str(stock[s].yaml_path), "dataset_path": str(dataset_dir)})
        for s in subjects
    }
    present = {stock[s].group for s in subjects}
    for group in present:
        yamls[f"_{group}.yaml"] = _dump({"include": str(stock_mmlu_dir() / f"_{group}.yaml")})
    top_yaml = stock_mmlu_dir() / f"_{TOP_GROUP}.yaml"
    members = [g for g in yaml.safe_load(top_yaml.read_text())["task"] if g in present]
    yamls[f"_{TOP_GROUP}.yaml"] = _dump({"include": str(top_yaml), "task": members})
    return yamls


def _dump(cfg: dict) -> str:
    """YAML text with keys in insertion order."""
    return yaml.safe_dump(cfg, sort_keys=False)


def _write_texts(out: Path, texts: dict[str, str]) -> None:
    """Write each ``{file name: text}`` into ``out``."""
    for name, text in texts.items():
        (out / name).write_text(text)
