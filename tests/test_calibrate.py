"""Calibration loaders (each file type, chat template), seeded selection and fingerprint stability."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.errors import PipelineError
from pipeline.recipe.load import load_recipe
from pipeline.recipe.schema import CalibrateSpec
from pipeline.run.context import RunContext
from pipeline.run.manifest import Manifest
from pipeline.run.model_source import ModelSource
from pipeline.run.text_data import dataset_identity, select_texts
from pipeline.stages.calibrate import calibration_fingerprint, run_calibrate

TEXTS = [f"sample number {i} says hello to value {i * 7}" for i in range(20)]


@pytest.fixture()
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_selects_n_seeded(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    spec = CalibrateSpec(dataset=str(data), num_samples=5, seed=1)
    first = select_texts(spec, tokenizer)
    assert len(first) == 5 and set(first) <= set(TEXTS)
    assert select_texts(spec, tokenizer) == first
    assert select_texts(spec.model_copy(update={"seed": 2}), tokenizer) != first


def test_parquet_loader(tmp_path: Path, tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "c.parquet")
    spec = CalibrateSpec(dataset=str(tmp_path / "c.parquet"), text_field="body", num_samples=50)
    assert sorted(select_texts(spec, tokenizer)) == sorted(TEXTS)


def test_txt_loader_splits_paragraphs(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird\n")
    spec = CalibrateSpec(dataset=str(tmp_path / "c.txt"), num_samples=10)
    texts = select_texts(spec, tokenizer)
    assert len(texts) == 3
    assert any("still first" in t for t in texts)


def test_folder_of_files(tmp_path: Path, tokenizer) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:10]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in TEXTS[10:]])
    spec = CalibrateSpec(dataset=str(tmp_path), num_samples=100)
    assert len(select_texts(spec, tokenizer)) == 20


def test_chat_messages_use_template(tmp_path: Path, tokenizer) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]} for t in TEXTS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = CalibrateSpec(dataset=str(data), messages_field="messages", num_samples=3)
    texts = select_texts(spec, tokenizer)
    assert all(t.startswith("<|im_start|>user\nhi<|im_end|>") for t in texts)


def test_chat_template_on_plain_text(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    spec = CalibrateSpec(dataset=str(data), chat_template=True, num_samples=2)
    assert all(t.startswith("<|im_start|>user\nsample number") for t in select_texts(spec, tokenizer))


def test_chat_template_missing_is_clear(tmp_path: Path, tokenizer) -> None:
    tokenizer.chat_template = None
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    with pytest.raises(PipelineError, match="calibrate.chat_template: the model's tokenizer has no chat template"):
        select_texts(CalibrateSpec(dataset=str(data), chat_template=True), tokenizer)


def test_empty_dataset_is_an_error(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(PipelineError, match="no non-empty 'text' samples"):
        select_texts(CalibrateSpec(dataset=str(data)), tokenizer)


def test_wrong_field_names_columns(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"body": t} for t in TEXTS])
    with pytest.raises(PipelineError, match="calibrate.text_field: 'text' is not a column .*body"):
        select_texts(CalibrateSpec(dataset=str(data)), tokenizer)


def test_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        dataset_identity(CalibrateSpec(dataset=str(tmp_path / "none.jsonl")))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(PipelineError, match="unsupported file type"):
        dataset_identity(CalibrateSpec(dataset=str(tmp_path / "x.csv")))


@pytest.fixture()
def source(tiny_tokenizer_dir: Path) -> ModelSource:
    return ModelSource("local", "tiny", tiny_tokenizer_dir, None)


def test_fingerprint_stable_and_sensitive(tmp_path: Path, source: ModelSource) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    recipe, _ = load_recipe("gptq", [f"calibrate.dataset={data}"])
    fp = calibration_fingerprint(recipe, source)
    assert fp == calibration_fingerprint(recipe, source)
    for change in ("calibrate.num_samples=3", "calibrate.max_seq_length=16", "calibrate.seed=9"):
        changed, _ = load_recipe("gptq", [f"calibrate.dataset={data}", change])
        assert calibration_fingerprint(changed, source) != fp, change
    write_jsonl(data, [{"text": t + "!"} for t in TEXTS])
    assert calibration_fingerprint(recipe, source) != fp


def test_the_fingerprint_follows_the_tokenizer_files_not_the_weights(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, model)
    (model / "model.safetensors").write_bytes(b"base weights")
    source = ModelSource("local", "model", model, None)
    recipe, _ = load_recipe("gptq", [f"calibrate.dataset={write_jsonl(tmp_path / 'c.jsonl', [{'text': 'a'}])}"])
    fp = calibration_fingerprint(recipe, source)
    (model / "model.safetensors").write_bytes(b"tuned weights, same tokenizer")
    assert calibration_fingerprint(recipe, source) == fp
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    assert calibration_fingerprint(recipe, source) != fp


def test_run_calibrate_saves_tokenized_set(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from datasets import load_from_disk

    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t * 5} for t in TEXTS])
    recipe, _ = load_recipe(
        "gptq", [f"calibrate.dataset={data}", "calibrate.num_samples=8", "calibrate.max_seq_length=12"]
    )
    manifest = Manifest(qpipe_version="t", recipe="gptq", recipe_hash="x", recipe_source="t")
    ctx = RunContext(recipe, ModelSource("local", "tiny", tiny_tokenizer_dir, None), "fp", tmp_path / "run", manifest)
    result = run_calibrate(recipe, ctx)
    saved = load_from_disk(str(ctx.calibration_dir))
    assert len(saved) == result["samples"] == 8
    assert result["max_len"] == 12
    assert all(len(ids) <= 12 for ids in saved["input_ids"])


def test_packing_cuts_equal_samples_from_concatenated_texts(tmp_path: Path, tokenizer) -> None:
    from pipeline.stages.calibrate import packed_samples

    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    spec = CalibrateSpec(dataset=str(data), num_samples=4, max_seq_length=16, seed=1, pack=True)
    samples, used = packed_samples(spec, tokenizer)
    assert [len(s) for s in samples] == [16] * 4
    stream = [
        t
        for text in select_texts(spec.model_copy(update={"num_samples": used}), tokenizer)
        for t in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    ]
    assert sum(samples, []) == stream[:64]  # the texts in selection order, EOS after each, cut in 16s
    assert len(stream) >= 64 and used < len(TEXTS)  # only as many texts as the 4 x 16 tokens need


def test_packing_with_too_little_text(tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.stages.calibrate import packed_samples

    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS[:3]])
    spec = CalibrateSpec(dataset=str(data), num_samples=100, max_seq_length=8, pack=True)
    samples, used = packed_samples(spec, tokenizer)
    assert used == 3 and samples and all(len(s) == 8 for s in samples)  # whole samples only
    with pytest.raises(PipelineError, match="calibrate.pack: .* fewer than one sample of max_seq_length 4096"):
        packed_samples(spec.model_copy(update={"max_seq_length": 4096}), tokenizer)


def test_packing_changes_the_fingerprint(source: ModelSource) -> None:
    recipe, _ = load_recipe("gptq")
    packed = recipe.model_copy(update={"calibrate": recipe.calibrate.model_copy(update={"pack": True})})
    assert calibration_fingerprint(recipe, source) != calibration_fingerprint(packed, source)
    assert recipe.artifact_hash() != packed.artifact_hash()


@pytest.mark.e2e  # calibrate, quantize and export of the tiny model (~5 s)
def test_a_run_loads_the_tokenizer_once(tiny_model_dir: Path, tmp_path: Path, tokenizer_loads: list[str]) -> None:
    """Calibrate and quantize share the run's tokenizer (a Qwen-sized one took 1.3-1.5 s to load on a 2-core CPU),
    and a run whose stages are all up to date loads none; the artifact still ships it."""
    from pipeline.runner import run_pipeline

    overrides = ["calibrate.dataset=calibration/demo-calibration.jsonl", "calibrate.num_samples=8"]
    recipe, path = load_recipe("gptq", [*overrides, "calibrate.max_seq_length=32"], str(tiny_model_dir))
    steps = ["calibrate", "quantize", "export"]
    ctx = run_pipeline(recipe, path, steps, output=tmp_path)
    assert tokenizer_loads.count(str(tiny_model_dir)) == 1
    assert (ctx.model_dir / "tokenizer_config.json").is_file()
    run_pipeline(recipe, path, steps, output=tmp_path)
    assert tokenizer_loads.count(str(tiny_model_dir)) == 1


def test_an_unreachable_hub_fails_the_calibration_in_one_line(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    """Asked once, within seconds: `datasets` alone retried for about 25 s before failing."""
    import httpx

    from pipeline.run import hub

    asked: list[tuple[str, str]] = []

    def unreachable(self: object, repo_id: str, **kwargs: object) -> None:
        asked.append((repo_id, str(kwargs["repo_type"])))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", unreachable)
    expected = r"calibrate.dataset: .*unreachable for org/data \(\[Errno -2\].*OFFLINE=1"
    with pytest.raises(PipelineError, match=expected) as err:
        select_texts(CalibrateSpec(dataset="org/data"), tokenizer)
    assert "\n" not in str(err.value)
    assert asked == [("org/data", "dataset")]


def test_the_hub_probe_leaves_answers_and_offline_mode_to_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.run import hub

    def answered(self: object, repo_id: str, **kwargs: object) -> None:
        raise ValueError("404 Client Error: Repository Not Found")  # the hub is there: the loader says more

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", answered)
    assert hub.hub_unreachable("org/data", "dataset") is None

    def never(self: object, repo_id: str, **kwargs: object) -> None:
        raise AssertionError("offline mode asked the hub")

    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", never)
    assert hub.hub_unreachable("org/data", "dataset") is None
