"""Bad run-time inputs end with one line naming the file or field and the fix, exit 2, and no traceback;
hub downloads fetch no code unless the recipe trusts it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.run.manifest import Manifest

SMALL = ["--set", "calibrate.num_samples=4", "--set", "calibrate.max_seq_length=16"]


def run_calibrate(model: Path, dataset: Path, output: Path) -> int:
    args = ["run", "gptq", "--model", str(model), "--output", str(output), "--steps", "calibrate"]
    return main([*args, *SMALL, "--set", f"calibrate.dataset={dataset}"])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: ")
    return err[-1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty; add samples"),
        ("\n  \n", "is empty; add samples"),
        ('{"text": "fine"}\n{"text": "broken"\n', "line 2 is not valid JSON"),
        ('{"text": "fine"}\n["a", "list"]\n', "line 2 is not a JSON object"),
        ('{"body": "no text column"}\n', "'text' is not a column"),
    ],
    ids=["empty", "blank", "malformed-line", "not-an-object", "missing-field"],
)
def test_bad_calibration_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    assert run_calibrate(tiny_model_dir, data, tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert "calibrate." in line and expected in line
    (run_dir,) = (tmp_path / "out").glob("*/gptq-*")
    assert run_dir.name.endswith(".partial")  # nothing looks finished
    assert Manifest.load(run_dir / "manifest.json").stages["calibrate"].status == "failed"
    assert not (run_dir / "calibration").exists()


def test_model_directory_without_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3"}')
    assert main(["validate", "gptq", "--model", str(model)]) == 2
    assert "has config.json but no weights" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "foonet"}, "is a 'foonet' model, which transformers"),
        ({"model_type": "foonet", "auto_map": {"AutoConfig": "x.FooConfig"}}, "set model.trust_remote_code: true"),
    ],
    ids=["unknown", "remote-code"],
)
def test_model_of_an_unknown_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict, expected: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")
    assert main(["validate", "gptq", "--model", str(model)]) == 2
    assert expected in one_line_error(capsys)
    assert main(["validate", "gptq", "--model", str(model), "--set", "model.trust_remote_code=true"]) == (
        2 if "auto_map" not in config else 0
    )


def test_empty_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing yet\n")
    assert main(["validate", str(recipe)]) == 2
    assert "the recipe file is empty" in one_line_error(capsys)


def test_debug_keeps_the_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    assert main(["--debug", "validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "the recipe file is empty" in err


def test_hub_downloads_fetch_code_only_when_trusted() -> None:
    from pipeline.eval.lm_eval_runner import model_args
    from pipeline.run.model_source import download_patterns

    assert "*.bin" not in download_patterns(False) and "*.py" not in download_patterns(False)
    assert "*.py" in download_patterns(True) and "*.safetensors" in download_patterns(True)
    assert "trust_remote_code" not in model_args("m", "auto", 1)
    assert model_args("m", "auto", 1, trust_remote_code=True)["trust_remote_code"] is True


@pytest.mark.e2e  # the runner on the demo model (~10 s)
def test_a_second_run_of_the_same_artifact_is_refused_while_one_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs of one recipe and model would share <name>.partial; the second stops in one line (exit 2)."""
    from demo_runs import run_recipe

    from pipeline.run.files import exclusive_lock

    assert run_recipe("fp8", tmp_path, steps="calibrate") == 0
    (lock,) = (tmp_path / "qpipe-demo").glob(".fp8-*.lock")
    with exclusive_lock(lock, "held by this test"):
        assert run_recipe("fp8", tmp_path, steps="calibrate") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is being written by another qpipe run (pid " in err and "--output elsewhere" in err
    assert run_recipe("fp8", tmp_path, steps="calibrate") == 0  # released with its holder


def test_disk_full_is_recognised_through_wrappers() -> None:
    import errno

    from pipeline.run.files import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise ValueError("save failed") from inner
    except ValueError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(RuntimeError("no weights (os error 2)"))
