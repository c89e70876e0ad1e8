"""The layer rules of pyproject's [tool.importlinter] hold, and no module imports itself through others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib

from pipeline.paths import BUNDLED_FOLDERS, bundled

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def _cycle_through(graph: grimp.ImportGraph, module: str) -> tuple[str, ...] | None:
    for imported in graph.find_modules_directly_imported_by(module):
        chain = graph.find_shortest_chain(importer=imported, imported=module)
        if chain:
            return (module, *chain)
    return None


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph("pipeline", cache_dir=None)
    cycles = [c for m in sorted(graph.modules) if (c := _cycle_through(graph, m))]
    assert cycles == [], cycles


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_and_bundled_file_ships_in_the_wheel() -> None:
    """pyproject lists packages and data explicitly: anything left out would be missing after `pip install .`."""
    config = _setuptools_config()
    files = [p for p in (ROOT / "pipeline").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {".".join(p.parent.relative_to(ROOT).parts) for p in files} <= set(config["packages"])
    folders = {**{p: p.replace(".", "/") for p in config["packages"]}, **config["package-dir"]}
    shipped = {
        path
        for package, patterns in config["package-data"].items()
        for pattern in patterns
        for path in (ROOT / folders[package]).glob(pattern)
    }
    assert {p for p in files if p.suffix != ".py"} <= shipped  # the model card template
    for name in BUNDLED_FOLDERS:
        assert {p for p in (ROOT / name).rglob("*") if p.is_file()} <= shipped, name
        assert bundled(name) == ROOT / name  # a source checkout reads the files in place


def test_a_missing_optional_engine_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from pipeline.backends import check_backend
    from pipeline.errors import PipelineError
    from pipeline.recipe.schema import QuantizeSpec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(PipelineError, match=r"gptqmodel is not installed; .*pip install 'qpipe\[gptqmodel\]'"):
        check_backend(QuantizeSpec(backend="gptqmodel", method="gptq", scheme="W4A16"))
