"""Resolve a recipe's `model:` to a local directory, with an identity and fingerprint for caching."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.recipe import ModelSpec

FULL_HASH_LIMIT = 2 * 1024**3  # weights above this are fingerprinted by size + header, not full content
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.py")


@dataclass(frozen=True)
class ModelSource:
    """A model ready to load from `path`."""

    kind: str  # "demo", "local" or "hub"
    identity: str  # what a user would call it: hub id, path or the demo name
    path: Path
    revision: str | None

    @property
    def slug(self) -> str:
        """Folder-safe name for artifacts/<slug>/."""
        name = self.identity if self.kind != "local" else self.path.name
        return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def _looks_local(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists() or not HUB_ID.match(model_id)


def describe_model(spec: ModelSpec) -> str:
    """Human name of the model without resolving it."""
    return spec.id or "qpipe-demo (embedded)"


def check_model_reference(spec: ModelSpec) -> None:
    """Cheap check for `validate`: a local path must exist and hold config.json; hub ids are not fetched."""
    if spec.id is None or not _looks_local(spec.id):
        return
    path = Path(spec.id).expanduser()
    if not path.is_dir():
        raise PipelineError(f"model.id: {spec.id} does not exist; pass an existing model directory or a hub id")
    if not (path / "config.json").is_file():
        raise PipelineError(f"model.id: {spec.id} has no config.json; point at a Hugging Face model directory")


def resolve_model(spec: ModelSpec) -> ModelSource:
    """Find or fetch the model; builds the embedded demo model when `model.id` is null."""
    if spec.id is None:
        from pipeline.demo_model import DEMO_MODEL_NAME, ensure_demo_model

        return ModelSource("demo", DEMO_MODEL_NAME, ensure_demo_model(), None)
    check_model_reference(spec)
    if _looks_local(spec.id):
        return ModelSource("local", spec.id, Path(spec.id).expanduser().resolve(), None)
    return ModelSource("hub", spec.id, _download(spec.id, spec.revision), spec.revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
    except RepositoryNotFoundError:
        raise PipelineError(
            f"model.id: {repo_id} is not a model on the hub; check the id or pass a local directory"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise PipelineError(
            f"model.id: {repo_id} is not cached and the Hugging Face hub is unreachable ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the local directory"
        ) from None


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT or path.suffix != ".safetensors":
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header_len))
            digest.update(str(size).encode())
    return digest.hexdigest()


def model_fingerprint(source: ModelSource) -> str:
    """Content fingerprint of the model folder (large weight files: size + safetensors header)."""
    entries = {
        str(p.relative_to(source.path)): _file_digest(p)
        for pattern in MODEL_FILES
        for p in sorted(source.path.glob(pattern))
        if p.is_file()
    }
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def linear_in_features(config_path: Path) -> set[int] | None:
    """in_features of a decoder's Linear layers from config.json, for group-size checks."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    found = {v for v in (hidden, inter, heads * head_dim if heads and head_dim else None) if v}
    return found or None
