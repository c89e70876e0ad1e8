"""Offline MMLU: Hendrycks CSV -> cais/mmlu parquet, the stock lm-eval task over it, fail-fast on the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.eval.lm_eval_runner import EvalDataUnavailable, run_lm_eval
from pipeline.eval.mmlu_local import MMLUFormatError, prepare_local_mmlu, stock_mmlu_dir
from pipeline.run import hub

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu"
REAL_MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"
FIXTURE_SIZES = {"abstract_algebra": 5, "marketing": 6, "philosophy": 4}
# Share of test answers that are "C" (the fixture's answer letters, counted by hand).
ALWAYS_C_ACC = {
    "mmlu_abstract_algebra": 2 / 5,
    "mmlu_marketing": 3 / 6,
    "mmlu_philosophy": 1 / 4,
    "mmlu_stem": 2 / 5,
    "mmlu_other": 3 / 6,
    "mmlu_humanities": 1 / 4,
    "mmlu": 6 / 15,
}
STOCK_GROUPS = {"mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"}


@pytest.fixture(scope="module")
def fixture_mmlu(tmp_path_factory: pytest.TempPathFactory):
    return prepare_local_mmlu(FIXTURE, tmp_path_factory.mktemp("mmlu-cache"))


@pytest.fixture(scope="module")
def always_c_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model rewired to ignore its input and put nearly all mass on the tokens of " C"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:  # blocks add nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)  # every position sees the same hidden state
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer(" C").input_ids] = 0.1
    out = tmp_path_factory.mktemp("always-c")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_conversion_matches_cais_mmlu_shape(fixture_mmlu) -> None:
    import datasets

    assert fixture_mmlu.subjects == tuple(sorted(FIXTURE_SIZES))
    assert fixture_mmlu.groups == ("mmlu", "mmlu_humanities", "mmlu_other", "mmlu_stem")
    for subject, size in FIXTURE_SIZES.items():
        ds = datasets.load_dataset(str(fixture_mmlu.dataset_dir), name=subject)
        assert set(ds) == {"test", "dev"}
        assert (ds["test"].num_rows, ds["dev"].num_rows) == (size, 5)
        assert list(ds["test"].features) == ["question", "subject", "choices", "answer"]
        assert ds["test"].features["answer"].names == ["A", "B", "C", "D"]
        row = ds["test"][0]
        assert row["subject"] == subject and len(row["choices"]) == 4 and row["answer"] in range(4)
    philosophy = datasets.load_dataset(str(fixture_mmlu.dataset_dir), name="philosophy", split="test")
    assert philosophy[2]["choices"][0] == "Zeno's arrow" and philosophy[2]["answer"] == 0


def test_conversion_is_cached_by_content(fixture_mmlu, tmp_path: Path) -> None:
    cache = fixture_mmlu.dataset_dir.parent.parent
    again = prepare_local_mmlu(FIXTURE, cache)
    assert again == fixture_mmlu
    copy = tmp_path / "mmlu"
    shutil.copytree(FIXTURE, copy)
    assert prepare_local_mmlu(copy, cache).fingerprint == fixture_mmlu.fingerprint
    with (copy / "test" / "marketing_test.csv").open("a") as fh:
        fh.write("One more question?,w,x,y,z,A\n")
    assert prepare_local_mmlu(copy, cache).fingerprint != fixture_mmlu.fingerprint


def test_optional_val_dir_becomes_validation_split(tmp_path: Path) -> None:
    import datasets

    copy = tmp_path / "mmlu"
    shutil.copytree(FIXTURE, copy)
    (copy / "val").mkdir()
    shutil.copy(copy / "dev" / "marketing_dev.csv", copy / "val" / "marketing_val.csv")
    local = prepare_local_mmlu(copy, tmp_path / "cache")
    assert set(datasets.load_dataset(str(local.dataset_dir), name="marketing")) == {
        "test",
        "validation",
        "dev",
    }
    assert set(datasets.load_dataset(str(local.dataset_dir), name="philosophy")) == {"test", "dev"}


def test_generated_tasks_override_only_dataset_path(fixture_mmlu) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    for subject in FIXTURE_SIZES:
        name = f"mmlu_{subject}.yaml"
        ours, stock = load_yaml(fixture_mmlu.include_path / name), load_yaml(stock_mmlu_dir() / name)
        assert ours == {**stock, "dataset_path": str(fixture_mmlu.dataset_dir)}
    top = load_yaml(fixture_mmlu.include_path / "_mmlu.yaml")
    assert top["task"] == ["mmlu_stem", "mmlu_other", "mmlu_humanities"]


def _broken_copy(tmp_path: Path, relative: str, text: str | None) -> Path:
    """The fixture with one file replaced by ``text`` (or removed when ``text`` is None)."""
    copy = tmp_path / "mmlu"
    shutil.copytree(FIXTURE, copy)
    target = copy / relative
    if text is not None:
        target.write_text(text)
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return copy


@pytest.mark.parametrize(
    ("relative", "text", "msg"),
    [
        ("dev", None, "missing 'dev/' directory"),
        ("dev/philosophy_dev.csv", None, "missing philosophy_dev.csv"),
        (
            "test/philosophy_test.csv",
            "q,a,b,c,d,A\nq,a,b,c,A\n",
            "philosophy_test.csv:2: expected 6 columns, got 5",
        ),
        (
            "test/marketing_test.csv",
            "q,a,b,c,d,A\nq,a,b,c,d,E\n",
            "marketing_test.csv:2: answer must be one of A-D",
        ),
        ("test/cooking_test.csv", "q,a,b,c,d,A\n", "'cooking' is not an MMLU subject"),
    ],
)
def test_malformed_dir_names_file_and_line(tmp_path: Path, relative: str, text: str | None, msg: str) -> None:
    src = _broken_copy(tmp_path, relative, text)
    with pytest.raises(MMLUFormatError, match=msg) as err:
        prepare_local_mmlu(src, tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*/dataset"))


def test_stock_task_on_fixture_scores_as_hand_computed(fixture_mmlu, always_c_model: Path) -> None:
    summary = run_lm_eval(str(always_c_model), ["mmlu"], 5, None, 4, "cpu", fixture_mmlu.include_path)
    assert {name: row["n_samples"] for name, row in summary["tasks"].items()} == {
        f"mmlu_{s}": n for s, n in FIXTURE_SIZES.items()
    }
    scores = {name: row["acc"] for name, row in {**summary["tasks"], **summary["groups"]}.items()}
    assert scores == pytest.approx(ALWAYS_C_ACC)
    assert summary["groups"]["mmlu"]["n_samples"] == 15
    assert summary["group_subtasks"]["mmlu"] == ["mmlu_stem", "mmlu_other", "mmlu_humanities"]
    assert summary["n_shot"]["mmlu_philosophy"] == 5
    assert summary["lm_eval_version"] and len(summary["config_hash"]) == 16


def test_unreachable_hub_without_local_dir_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", refuse)
    with pytest.raises(EvalDataUnavailable, match="hub unreachable .*set eval.mmlu_dir") as err:
        run_lm_eval("unused-model", ["mmlu"], 0, 1, 1, "cpu", None)
    assert "\n" not in str(err.value)


def test_offline_uncached_hub_data_is_a_one_line_hint(fixture_mmlu, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**_kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)\ndetails")

    monkeypatch.setattr("lm_eval.simple_evaluate", offline)
    with pytest.raises(EvalDataUnavailable, match="OfflineModeIsEnabled.*set eval.mmlu_dir") as err:
        run_lm_eval("unused-model", ["mmlu"], 0, 1, 1, "cpu", fixture_mmlu.include_path)
    assert "\n" not in str(err.value)


@pytest.mark.e2e  # all 57 subjects of the real MMLU (~10 s)
@pytest.mark.skipif(not REAL_MMLU.is_dir(), reason=f"no real MMLU copy at {REAL_MMLU}")
def test_real_mmlu_all_subjects_and_groups(tiny_model_dir: Path, tmp_path: Path) -> None:
    local = prepare_local_mmlu(REAL_MMLU, tmp_path / "cache")
    assert len(local.subjects) == 57 and set(local.groups) == STOCK_GROUPS
    summary = run_lm_eval(str(tiny_model_dir), ["mmlu"], 1, 1, 8, "cpu", local.include_path)
    assert len(summary["tasks"]) == 57
    assert set(summary["groups"]) == STOCK_GROUPS
    assert all(row["n_samples"] == 1 for row in summary["tasks"].values())
    assert summary["groups"]["mmlu"]["n_samples"] == 57
    assert 0.0 <= summary["groups"]["mmlu"]["acc"] <= 1.0


def test_summary_is_compact_and_config_hash_ignores_paths() -> None:
    from pipeline.eval.lm_eval_runner import config_hash, summarize

    def configs(root: str) -> dict:
        metadata = {"version": 1, "config_source": root}
        return {"t": {"task": "t", "dataset_path": f"{root}/dataset", "metadata": metadata}}

    results = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": "N/A",
                "exact_match,strict": 0.25,
                "f1,none": 3,
            },
            "g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4},
        },
        "groups": {"g": {}},
        "n-samples": {"t": {"original": 9, "effective": 4}},
        "configs": configs("/tmp/a"),
        "lm_eval_version": "0.4.13",
    }
    summary = summarize(results)
    expected = {"alias": "t", "acc": 0.5, "acc_stderr": None, "exact_match,strict": 0.25, "n_samples": 4}
    assert summary["tasks"] == {"t": expected}
    assert summary["groups"] == {"g": {"alias": "g", "acc": 0.5, "acc_stderr": 0.1, "n_samples": 4}}
    assert summary["config_hash"] == config_hash(configs("/elsewhere"))
    assert summary["config_hash"] != config_hash({"t": {**configs("/tmp/a")["t"], "num_fewshot": 5}})
