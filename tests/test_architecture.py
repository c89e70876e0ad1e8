"""The layer rules of pyproject's [tool.importlinter] hold, and no module imports itself through others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

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
