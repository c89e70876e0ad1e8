"""ModelScope model sources (`modelscope:org/name` or `model.hub: modelscope`), offline: a stand-in `modelscope`
module serves a local copy of its cache layout (hub/models/<org>/<name>/) and refuses the network, as here."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import PipelineError
from pipeline.recipe.schema import ModelSpec
from pipeline.run.model_source import ModelSource, check_model_reference, model_fingerprint, resolve_model

REPO = "qwen/Qwen3-0.6B"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ModelScope cache holding REPO; the digest cache goes to tmp_path too."""
    monkeypatch.setenv("QPIPE_CACHE", str(tmp_path / "qpipe"))
    model = tmp_path / "modelscope" / "hub" / "models" / REPO
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "qwen3"}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (model / "tokenizer.json").write_text("{}")
    return tmp_path / "modelscope" / "hub"


@pytest.fixture
def calls(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, tuple[str, ...], bool]]:
    """Install the stand-in `modelscope` module; returns the snapshot_download calls it saw."""
    seen: list[tuple[str, str | None, tuple[str, ...], bool]] = []

    def snapshot_download(
        model_id: str, revision: str | None = None, allow_patterns: list[str] | None = None, local_files_only=False
    ) -> str:
        seen.append((model_id, revision, tuple(allow_patterns or ()), local_files_only))
        if not local_files_only:
            raise ConnectionError("modelscope.cn unreachable")
        path = cache / "models" / model_id
        if not path.is_dir():
            raise ValueError("Cannot find the requested files in the cached path")
        return str(path)

    module = types.ModuleType("modelscope")
    module.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modelscope", module)
    return seen


@pytest.mark.parametrize("spec", [ModelSpec(id=f"modelscope:{REPO}"), ModelSpec(id=REPO, hub="modelscope")])
def test_a_cached_modelscope_model_resolves_offline(spec: ModelSpec, cache: Path, calls: list) -> None:
    source = resolve_model(spec.model_copy(update={"revision": "v1"}))
    assert source == ModelSource("modelscope", f"modelscope:{REPO}", cache / "models" / REPO, "v1")
    assert source.slug == "modelscope--qwen--Qwen3-0.6B"
    assert [c[3] for c in calls] == [False, True]  # the hub first, then the cache
    assert {c[:2] for c in calls} == {(REPO, "v1")}
    patterns = calls[0][2]
    assert "*.safetensors" in patterns and "*.bin" not in patterns and "*.py" not in patterns


def test_remote_code_is_fetched_only_when_trusted(calls: list) -> None:
    resolve_model(ModelSpec(id=f"modelscope:{REPO}", trust_remote_code=True))
    assert "*.py" in calls[0][2]


def test_fingerprint_is_the_content_fingerprint_of_the_same_files(cache: Path, calls: list) -> None:
    source = resolve_model(ModelSpec(id=f"modelscope:{REPO}"))
    before = model_fingerprint(source)
    assert before == model_fingerprint(ModelSource("local", "copy", source.path, None))
    (source.path / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(source) != before


def test_uncached_model_without_the_hub_is_a_one_line_error(calls: list) -> None:
    with pytest.raises(PipelineError, match=r"modelscope:org/absent is not cached and ModelScope is unreachable"):
        resolve_model(ModelSpec(id="modelscope:org/absent"))


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import modelscope raises ImportError
    with pytest.raises(PipelineError, match="needs the modelscope package; pip install modelscope$"):
        resolve_model(ModelSpec(id=f"modelscope:{REPO}"))


def test_bad_modelscope_specs() -> None:
    with pytest.raises(ValidationError, match="hub: huggingface contradicts id"):
        ModelSpec(id=f"modelscope:{REPO}", hub="huggingface")
    with pytest.raises(ValidationError, match="needs a model.id"):
        ModelSpec(hub="modelscope")
    with pytest.raises(PipelineError, match="not a ModelScope model id"):
        check_model_reference(ModelSpec(id="modelscope:just-a-name"))
