"""`pip install .` (a wheel, not editable) works from any folder: recipes, calibration set and MMLU fixture ship
inside the package. The wheel goes into a bare venv that borrows this environment's dependencies (a .pth file),
so only qpipe itself comes from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from demo_runs import SMALL

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "pipeline", "recipes", "calibration", "tests/fixtures/mmlu")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `qpipe` script of a venv holding the wheel built from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp)], check=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin/python", "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(tmp.glob("qpipe-*.whl"))
    subprocess.run([*pip, "--python", str(venv / "bin/python"), "install", "--no-deps", str(wheel)], check=True)
    return venv / "bin/qpipe"


def installed_env() -> dict[str, str]:
    """No source tree on the path; this checkout's vLLM environment (an installed qpipe would build its own)."""
    from pipeline.vllm.environment import vllm_env_path

    return {**os.environ, "PYTHONPATH": "", "QPIPE_VLLM_ENV": str(vllm_env_path())}


def qpipe(script: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = installed_env()
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def test_installed_package_reads_its_own_files(installed: Path, tmp_path: Path) -> None:
    probe = "import pipeline.paths as p; print(p.SOURCE_CHECKOUT, p.PACKAGE_DIR)"
    python = installed.with_name("python")
    out = subprocess.check_output([python, "-c", probe], cwd=tmp_path, env=installed_env(), text=True).split()
    assert out[0] == "False" and ROOT not in Path(out[1]).parents
    listed = qpipe(installed, tmp_path, "recipes")
    assert listed.returncode == 0 and "awq" in listed.stdout, listed.stderr
    assert qpipe(installed, tmp_path, "validate", "awq").returncode == 0


def test_installed_qpipe_runs_awq_from_an_empty_folder(installed: Path, vllm_ready: Path, tmp_path: Path) -> None:
    done = qpipe(installed, tmp_path, "run", "awq", *SMALL)
    assert done.returncode in (0, 3, 4), done.stderr[-3000:]  # 3/4: the gate's verdict on 15 questions
    (run_dir,) = (tmp_path / "artifacts" / "qpipe-demo").glob("awq-????????")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"calibrate", "quantize", "export", "eval", "smoke"}
    assert qpipe(installed, tmp_path, "verify", str(run_dir), "--allow-failed-gate").returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["artifacts"]  # nothing written beside it
