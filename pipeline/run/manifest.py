"""The run manifest: what every stage did (inputs, fingerprints, versions, timings, hashes)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.run.files import sha256_files, write_json_atomic

TRACKED_PACKAGES = (
    "qpipe",
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "gptqmodel",
    "accelerate",
    "datasets",
    "safetensors",
    "lm_eval",
    "huggingface_hub",
)

StageStatus = Literal["done", "failed", "not-needed", "disabled", "unsupported"]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes the artifact."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root`, keyed by relative path."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    digests = sha256_files(files)
    return {
        str(p.relative_to(root)): {"sha256": digest, "size": p.stat().st_size}
        for p, digest in zip(files, digests, strict=True)
    }


class StageRecord(BaseModel):
    """One stage's record in the manifest."""

    status: StageStatus
    fingerprint: str | None = None
    started: str | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = Field(None, description="Peak of torch's allocator in the qpipe process.")
    peak_gpu_device_mb: float | None = Field(
        None, description="Peak GPU memory in use by all processes (NVML), child processes such as vLLM included."
    )
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    note: str | None = None


class Manifest(BaseModel):
    """`manifest.json` at the root of a run directory."""

    qpipe_version: str
    recipe: str
    recipe_hash: str
    recipe_source: str
    command: str = Field(default_factory=lambda: " ".join(sys.argv))
    model: dict[str, Any] = Field(default_factory=dict)
    status: Literal["running", "complete", "failed"] = "running"
    gate: Literal["passed", "failed", "inconclusive", "not-run"] = "not-run"
    created: str = Field(default_factory=now_iso)
    updated: str = Field(default_factory=now_iso)
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    def save(self, path: Path) -> None:
        self.updated = now_iso()
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at `path`, or None if absent or unreadable (then stages simply re-run)."""
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
