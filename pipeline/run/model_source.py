"""Resolve a recipe's `model:` to a local directory, with an identity and fingerprint for caching."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.paths import default_cache_root
from pipeline.recipe.schema import MODELSCOPE_PREFIX, ModelSpec
from pipeline.run.files import sha256_files, write_json_atomic

log = logging.getLogger("qpipe")  # run_context.LOGGER_NAME; importing it here would be circular

DIGEST_CACHE_FILE = "file-digests.json"
DIGEST_CACHE_VERSION = 1
LOG_HASH_BYTES = 1 << 30  # say so when fingerprinting streams more than this: it takes seconds
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("*.safetensors", "*.bin")
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.py")
TOKENIZER_FILES = tuple(p for p in MODEL_FILES if p not in WEIGHT_FILES)


@dataclass(frozen=True)
class ModelSource:
    """A model ready to load from `path`."""

    kind: str  # "demo", "local", "hub" (Hugging Face) or "modelscope"
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


def check_model_reference(spec: ModelSpec) -> None:
    """Cheap check for `validate`: a local path must exist and hold config.json; hub ids are not fetched."""
    if spec.modelscope:
        if not HUB_ID.match(spec.repo_id or ""):
            raise PipelineError(f"model.id: {spec.repo_id!r} is not a ModelScope model id; use org/name")
        return
    if spec.id is None or not _looks_local(spec.id):
        return
    path = Path(spec.id).expanduser()
    if not path.is_dir():
        raise PipelineError(f"model.id: {spec.id} does not exist; pass an existing model directory or a hub id")
    if not (path / "config.json").is_file():
        raise PipelineError(f"model.id: {spec.id} has no config.json; point at a Hugging Face model directory")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise PipelineError(
            f"model.id: {spec.id} has config.json but no weights (*.safetensors or *.bin); "
            "copy the weight files there or point at the complete model directory"
        )
    check_architecture(spec.id, path / "config.json", spec.trust_remote_code)


def check_architecture(model_id: str, config_path: Path, trust_remote_code: bool) -> None:
    """A model type this transformers knows, or code the recipe trusts: otherwise transformers stops the quantize
    stage with a traceback after calibration, where this says it before any stage."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type, ships_code = config.get("model_type"), "auto_map" in config
    if model_type in CONFIG_MAPPING_NAMES or (trust_remote_code and ships_code):
        return
    fix = (
        "set model.trust_remote_code: true if you trust the code the repository ships (its config has auto_map)"
        if ships_code
        else "upgrade transformers (pip install -U transformers) or check config.json's model_type"
    )
    raise PipelineError(
        f"model.id: {model_id} is a {model_type!r} model, which transformers {transformers.__version__} does not "
        f"know; {fix}"
    )


def resolve_model(spec: ModelSpec) -> ModelSource:
    """Find or fetch the model; builds the embedded demo model when `model.id` is null."""
    if spec.id is None:
        from pipeline.demo.model import DEMO_MODEL_NAME, ensure_demo_model

        return ModelSource("demo", DEMO_MODEL_NAME, ensure_demo_model(), None)
    check_model_reference(spec)
    if spec.modelscope:
        repo = spec.repo_id or ""
        path = _download_modelscope(repo, spec.revision, spec.trust_remote_code)
        source = ModelSource("modelscope", f"{MODELSCOPE_PREFIX}{repo}", path, spec.revision)
    elif _looks_local(spec.id):
        return ModelSource("local", spec.id, Path(spec.id).expanduser().resolve(), None)  # checked above
    else:
        source = ModelSource("hub", spec.id, _download(spec.id, spec.revision, spec.trust_remote_code), spec.revision)
    check_architecture(source.identity, source.path / "config.json", spec.trust_remote_code)
    return source


def download_patterns(trust_remote_code: bool) -> list[str]:
    """Safetensors weights, configs and tokenizer files; the repository's Python code only when the recipe trusts
    it (`model.trust_remote_code`). Pickled `*.bin` weights are never fetched: loading them can run code."""
    return [*HUB_FILES, *(["*.py"] if trust_remote_code else [])]


def _download(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=download_patterns(trust_remote_code)))
    except RepositoryNotFoundError:
        raise PipelineError(
            f"model.id: {repo_id} is not a model on the hub; check the id or pass a local directory"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise PipelineError(
            f"model.id: {repo_id} is not cached and the Hugging Face hub is unreachable ({type(exc).__name__}); "
            "download it where the hub is reachable and pass the local directory"
        ) from None


def _download_modelscope(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The ModelScope counterpart of `_download`: the same files; the hub first, then its cache (which
    huggingface_hub falls back to by itself), so a cached model works offline."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise PipelineError(
            f"model.id: {MODELSCOPE_PREFIX}{repo_id} needs the modelscope package; pip install modelscope"
        ) from None
    patterns = download_patterns(trust_remote_code)
    failure: Exception | None = None
    for local_files_only in (False, True):
        try:
            path = snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_files_only
            )
            return Path(path)
        except Exception as exc:  # modelscope raises requests', its own and ValueError alike for "unreachable"
            failure = exc
    raise PipelineError(
        f"model.id: {MODELSCOPE_PREFIX}{repo_id} is not cached and ModelScope is unreachable "
        f"({type(failure).__name__}); download it where ModelScope is reachable and pass the local directory"
    )


def _hub_blob_sha256(path: Path) -> str | None:
    """The sha256 huggingface_hub already recorded for an LFS file of a cache snapshot, without reading it.

    huggingface_hub (file_download.py, `_hf_hub_download_to_cache_dir`) stores each file at
    `blobs/<etag>` and links `snapshots/<rev>/<file>` to it; the etag is "its git-sha1 if stored in git,
    or its sha256 if stored in git-lfs" (`hf_hub_url` docstring), Xet files included
    (`_xet_file_metadata_from_tree_cache`: "ETag/size come from the LFS metadata for LFS-tracked files
    (which Xet files are)", `etag = entry.lfs_sha256`). Only the link's own target name counts:
    `blobs/<etag>` may itself link into the shared Xet store, named by the Xet hash (also 64 hex,
    not a sha256; utils/_shared_blobs.py). A git sha1 (40 hex) or a copied file gives None.
    """
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    return target.name if target.parent.name == "blobs" and SHA256_HEX.fullmatch(target.name) else None


def _digest_cache_path() -> Path:
    return default_cache_root() / DIGEST_CACHE_FILE


def _load_digest_cache(path: Path) -> dict[str, Any]:
    """Digests by resolved path; a missing, unreadable or older-format cache only means hashing again."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == DIGEST_CACHE_VERSION else None
    return files if isinstance(files, dict) else {}


def _save_digest_cache(path: Path, cache: dict[str, Any]) -> None:
    """Write the cache atomically, dropping files that are gone; a failed write only costs a rehash later."""
    files = {name: entry for name, entry in cache.items() if Path(name).exists()}
    try:
        write_json_atomic(path, {"version": DIGEST_CACHE_VERSION, "files": files})
    except OSError as exc:
        log.warning("fingerprint: could not save the digest cache %s (%s); the next run hashes again", path, exc)


def _file_stamp(path: Path) -> dict[str, int]:
    """What must be unchanged for a cached digest to still describe the file."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _cached_digest(path: Path, cache: dict[str, Any]) -> str | None:
    entry = cache.get(str(path.resolve()))
    if not isinstance(entry, dict):
        return None
    stamp = _file_stamp(path)
    return entry.get("sha256") if {key: entry.get(key) for key in stamp} == stamp else None


def _hash_files(files: dict[str, Path], identity: str, cache: dict[str, Any]) -> dict[str, str]:
    """Stream each file through sha256 and record it in `cache`; announce it when it takes noticeable time."""
    total = sum(path.stat().st_size for path in files.values())
    if total > LOG_HASH_BYTES:
        log.info("fingerprint: hashing %.1f GiB of %s (once: later runs reuse the digests)", total / 1024**3, identity)
    start = time.perf_counter()
    # stamps taken before hashing: a file changed while it was hashed fails the next run's check
    stamps = {name: _file_stamp(path) for name, path in files.items()}
    digests = dict(zip(files, sha256_files(list(files.values())), strict=True))
    for name, path in files.items():
        cache[str(path.resolve())] = {**stamps[name], "sha256": digests[name]}
    if total > LOG_HASH_BYTES:
        log.info("fingerprint: hashed %d bytes in %.1f s", total, time.perf_counter() - start)
    return digests


def model_fingerprint(source: ModelSource) -> str:
    """sha256 over the full content of every model file, so fine-tunes sharded alike never share a cache key.

    Hub snapshots take LFS digests from huggingface_hub's blob names; other files are streamed once and
    their digests cached by path, size, mtime and inode under the cache root.
    """
    return _files_fingerprint(source, MODEL_FILES)


def tokenizer_fingerprint(source: ModelSource) -> str:
    """sha256 over every model file but the weights: whatever a tokenizer may read (its own files, the chat
    template, config.json naming its class, remote code). The calibration's fingerprint takes this instead of a
    loaded tokenizer, so no run loads one before a stage needs it, and a fine-tune that keeps the base's tokenizer
    and configuration keeps its calibration."""
    return _files_fingerprint(source, TOKENIZER_FILES)


def _files_fingerprint(source: ModelSource, patterns: tuple[str, ...]) -> str:
    files = {
        str(p.relative_to(source.path)): p
        for pattern in patterns
        for p in sorted(source.path.glob(pattern))
        if p.is_file()
    }
    cache_path = _digest_cache_path()
    cache = _load_digest_cache(cache_path)
    digests = {
        name: (_hub_blob_sha256(path) if source.kind == "hub" else None) or _cached_digest(path, cache)
        for name, path in files.items()
    }
    missing = {name: files[name] for name, digest in digests.items() if digest is None}
    if missing:
        digests.update(_hash_files(missing, source.identity, cache))
        _save_digest_cache(cache_path, cache)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def text_config(config_path: Path) -> dict[str, Any]:
    """The language model's part of a config.json (`text_config` of multimodal checkpoints, else all of it)."""
    config = json.loads(config_path.read_text())
    return config.get("text_config", config)


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """KV-cache bytes one token takes: keys and values of every layer, in a 16-bit cache (vLLM's default
    `kv_cache_dtype` for 16-bit checkpoints). `config`: a `text_config` result."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 2


def linear_in_features(config_path: Path) -> set[int] | None:
    """in_features of a decoder's Linear layers from config.json, for group-size checks."""
    try:
        cfg = text_config(config_path)
    except (OSError, ValueError):
        return None
    hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    found = {v for v in (hidden, inter, heads * head_dim if heads and head_dim else None) if v}
    return found or None
