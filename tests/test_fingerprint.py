"""model_fingerprint hashes full content: hub blob names stand in for reading, a digest cache skips re-reads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.run import files, model_source
from pipeline.run.model_source import DIGEST_CACHE_FILE, ModelSource, model_fingerprint


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QPIPE_CACHE", str(root))
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Files model_fingerprint streamed (side by side: in any order)."""
    seen: list[Path] = []
    real = files.sha256_file

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(files, "sha256_file", counting)
    return seen


def make_model(folder: Path, seed: int) -> Path:
    """One .safetensors shard plus config.json; every seed gives the same header and size."""
    folder.mkdir(parents=True)
    weights = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
    save_file({"model.layer.weight": weights}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    return folder


def local(folder: Path) -> ModelSource:
    return ModelSource("local", str(folder), folder, None)


def header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def test_same_header_and_size_but_different_weights_differ(tmp_path: Path) -> None:
    first, second = make_model(tmp_path / "a", seed=0), make_model(tmp_path / "b", seed=1)
    a, b = first / "model.safetensors", second / "model.safetensors"
    assert header(a) == header(b) and a.stat().st_size == b.stat().st_size
    assert model_fingerprint(local(first)) != model_fingerprint(local(second))

    flipped = make_model(tmp_path / "c", seed=0)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    deep = len(header(a)) + (len(data) - len(header(a))) * 3 // 4
    data[deep] ^= 0x01
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(local(flipped)) != model_fingerprint(local(first))


def test_digest_cache_skips_unchanged_files_and_rehashes_changed_ones(
    tmp_path: Path, cache_root: Path, reads: list[Path]
) -> None:
    folder = make_model(tmp_path / "m", seed=0)
    weights = folder / "model.safetensors"
    first = model_fingerprint(local(folder))
    assert sorted(p.name for p in reads) == ["config.json", "model.safetensors"]
    cached = json.loads((cache_root / DIGEST_CACHE_FILE).read_text())["files"][str(weights.resolve())]
    assert cached["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    reads.clear()
    assert model_fingerprint(local(folder)) == first
    assert reads == []

    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_fingerprint(local(folder)) == first
    assert reads == [weights]

    reads.clear()
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert model_fingerprint(local(folder)) != first
    assert reads == [weights]


def hub_snapshot(root: Path, files: dict[str, tuple[str, bytes]]) -> Path:
    """huggingface_hub's cache layout: snapshots/<rev>/<file> -> ../../blobs/<etag>."""
    snapshot = root / "models--org--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    blobs = root / "models--org--name" / "blobs"
    blobs.mkdir()
    for name, (etag, content) in files.items():
        (blobs / etag).write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    return snapshot


def hub(snapshot: Path) -> ModelSource:
    return ModelSource("hub", "org/name", snapshot, "main")


def test_hub_snapshot_takes_lfs_sha256_from_blob_name(tmp_path: Path, reads: list[Path]) -> None:
    recorded = "ab" * 32  # not the content's hash: proves the blob is not read
    snapshot = hub_snapshot(
        tmp_path / "hub",
        {"model.safetensors": (recorded, b"weights"), "config.json": ("c" * 40, b'{"model_type": "qwen3"}')},
    )
    fingerprint = model_fingerprint(hub(snapshot))
    assert reads == [snapshot / "config.json"]  # a git sha1 blob name is no sha256: streamed
    expected = {"config.json": hashlib.sha256(b'{"model_type": "qwen3"}').hexdigest(), "model.safetensors": recorded}
    assert fingerprint == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()


def test_hub_blob_name_agrees_with_streamed_content(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m", seed=0)
    files = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.read_bytes()) for p in folder.iterdir()}
    assert model_fingerprint(hub(hub_snapshot(tmp_path / "hub", files))) == model_fingerprint(local(folder))


def test_hub_blob_linked_into_shared_xet_store_keeps_the_etag(tmp_path: Path, reads: list[Path]) -> None:
    """blobs/<etag> may link on to blobs/<2 hex>/<xet hash>: the etag, not the 64-hex Xet hash, is the sha256."""
    etag, xet_hash = "ab" * 32, "cd" * 32
    snapshot = hub_snapshot(tmp_path / "hub", {"model.safetensors": (etag, b"weights")})
    store = tmp_path / "hub" / "blobs" / xet_hash[:2]
    store.mkdir(parents=True)
    blob = snapshot.parents[1] / "blobs" / etag
    (store / xet_hash).write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(Path("..", "..", "blobs", xet_hash[:2], xet_hash))
    expected = hashlib.sha256(json.dumps({"model.safetensors": etag}).encode()).hexdigest()
    assert model_fingerprint(hub(snapshot)) == expected
    assert reads == []


def test_local_symlinks_to_sha256_names_are_streamed(tmp_path: Path, reads: list[Path]) -> None:
    """Only a hub snapshot's blob names are trusted; a local folder laid out alike is read."""
    snapshot = hub_snapshot(tmp_path / "hub", {"model.safetensors": ("ab" * 32, b"weights")})
    model_fingerprint(local(snapshot))
    assert reads == [snapshot / "model.safetensors"]


def test_large_hash_is_logged_with_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_model(tmp_path / "m", seed=0)
    monkeypatch.setattr(model_source, "LOG_HASH_BYTES", 0)
    with caplog.at_level("INFO", logger="qpipe"):
        model_fingerprint(local(folder))
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert any(f"hashed {total} bytes in" in r.getMessage() for r in caplog.records)
