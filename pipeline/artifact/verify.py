"""`qpipe verify`: an artifact's files match its manifest, its stages passed, its quantization matches the recipe.

The export record hashes every file of model/; the model card, written into model/ after export, is hashed
by its own `card` record. Together they cover every file of the deployable folder, so any change, addition
or removal shows. An artifact is either a run directory (manifest.json + model/) or a published folder
(the model files + qpipe_manifest.json, a copy of the run's manifest).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import GateFailed, GateInconclusive, PipelineError
from pipeline.formats import backend_info, expected_native_quantization, expected_quantization
from pipeline.recipe.load import build_recipe, parse_yaml
from pipeline.recipe.schema import Recipe
from pipeline.run.context import RECIPE_FILE
from pipeline.run.manifest import Manifest, hash_tree

MANIFEST_FILE = "manifest.json"
PUBLISHED_MANIFEST = "qpipe_manifest.json"
CARD_FILE = "README.md"
CARD_STAGE = "card"
NO_RESULTS = ("disabled", "unsupported")
HUB_MANAGED = (".gitattributes",)  # added by the hub to every repository, so a downloaded copy has it
ACCEPTED_STATUS = {
    "calibrate": ("done", "not-needed"),
    "quantize": ("done",),
    "export": ("done",),
    "eval": ("done", "disabled"),
    "smoke": ("done", "disabled", "unsupported"),  # unsupported: vLLM here lacks the scheme's kernels
    CARD_STAGE: ("done",),
}


class VerificationFailed(PipelineError):
    """The artifact's files, stages or quantization_config disagree with its manifest; exit code 1."""

    exit_code = 1


@dataclass(frozen=True)
class Artifact:
    """A run directory or a published folder, with the manifest that describes it."""

    root: Path
    model_dir: Path
    manifest_path: Path
    manifest: Manifest

    @property
    def published(self) -> bool:
        return self.manifest_path.name == PUBLISHED_MANIFEST

    def display(self, relpath: str) -> str:
        """A model file's path as the user sees it from the artifact root."""
        return relpath if self.published else f"model/{relpath}"


@dataclass
class Verification:
    """What `verify_artifact` found: integrity problems, and the gate verdict kept apart from them."""

    artifact: Artifact
    problems: list[str] = field(default_factory=list)
    checked: int = 0  # files hashed

    @property
    def gate(self) -> str:
        return self.artifact.manifest.gate

    def summary(self) -> str:
        """The one-line verdict on an intact artifact, naming the stages that produced no results."""
        stages = self.artifact.manifest.stages
        idle = [f"{name} {record.status}" for name, record in stages.items() if record.status in NO_RESULTS]
        extra = f"; no results from {', '.join(idle)}" if idle else ""
        return f"{self.artifact.root}: OK ({self.checked} files match the manifest, gate {self.gate}{extra})"


def open_artifact(path: Path) -> Artifact:
    """Recognise the layout of `path` and load its manifest."""
    if (path / MANIFEST_FILE).is_file() and (path / "model").is_dir():
        model_dir, manifest_path = path / "model", path / MANIFEST_FILE
    elif (path / PUBLISHED_MANIFEST).is_file():
        model_dir, manifest_path = path, path / PUBLISHED_MANIFEST
    else:
        raise PipelineError(
            f"{path}: not a qpipe artifact (no manifest.json + model/, no {PUBLISHED_MANIFEST}); "
            "pass a run directory artifacts/<model>/<recipe>-<hash> or a published folder"
        )
    manifest = Manifest.load(manifest_path)
    if manifest is None:
        raise PipelineError(f"{manifest_path}: unreadable manifest; re-run the recipe to rebuild the artifact")
    return Artifact(path, model_dir, manifest_path, manifest)


def expected_files(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """{relpath: {sha256, size}} of the deployable folder: export's files plus the model card."""
    export, card = manifest.stages.get("export"), manifest.stages.get(CARD_STAGE)
    files = dict(export.outputs.get("files", {})) if export else {}
    if card is not None and "sha256" in card.outputs:
        files[CARD_FILE] = {"sha256": card.outputs["sha256"], "size": card.outputs["size"]}
    return files


def file_problems(artifact: Artifact) -> tuple[list[str], int]:
    """Missing, changed and unexpected files of model/ against the manifest; and how many files were checked."""
    expected = expected_files(artifact.manifest)
    actual = hash_tree(artifact.model_dir)
    if artifact.published:
        for extra in (PUBLISHED_MANIFEST, *HUB_MANAGED):
            actual.pop(extra, None)
    problems = [f"{artifact.display(rel)}: missing (listed in the manifest)" for rel in expected if rel not in actual]
    for rel, info in actual.items():
        if rel not in expected:
            problems.append(f"{artifact.display(rel)}: not in the manifest (added after export)")
        elif info["sha256"] != expected[rel]["sha256"]:
            problems.append(f"{artifact.display(rel)}: sha256 differs from the manifest (modified or corrupted)")
    return problems, len(actual)


def stage_problems(manifest: Manifest) -> list[str]:
    """Stages that did not finish as a deployable artifact needs."""
    problems = [] if manifest.status == "complete" else [f"manifest: run status is {manifest.status!r}, not complete"]
    for stage, accepted in ACCEPTED_STATUS.items():
        record = manifest.stages.get(stage)
        if record is None:
            problems.append(f"{stage}: no record in the manifest (the stage never ran)")
        elif record.status not in accepted:
            note = f" ({record.note})" if record.note else ""
            problems.append(f"{stage}: status {record.status!r}{note}; expected {' or '.join(accepted)}")
    return problems


def load_saved_recipe(path: Path) -> Recipe:
    """A recipe saved beside an artifact (already merged and overridden)."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing; the artifact does not carry its effective recipe, re-run it")
    return build_recipe(parse_yaml(path.read_text(encoding="utf-8")) or {}, str(path))


def _args_problems(where: str, actual: dict[str, Any] | None, expected: dict[str, Any] | None) -> list[str]:
    if expected is None or actual is None:
        return [] if expected is None and actual is None else [f"{where}: {actual!r}, recipe promised {expected!r}"]
    return [
        f"{where}.{key}: {actual.get(key)!r}, recipe promised {value!r}"
        for key, value in expected.items()
        if actual.get(key) != value
    ]


def quantization_problems(model_dir: Path) -> list[str]:
    """config.json's quantization_config against the scheme of the recipe saved in the folder."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["config.json: missing or not JSON"]
    qc = config.get("quantization_config")
    if not qc:
        return ["config.json: no quantization_config (the checkpoint is not quantized)"]
    spec = load_saved_recipe(model_dir / RECIPE_FILE).quantize
    fmt = backend_info(spec.backend).output_format(spec.method)
    if qc.get("quant_method") != fmt.name:
        return [f"config.json: quant_method is {qc.get('quant_method')!r}, recipe promised {fmt.name!r}"]
    if fmt.native:
        expected = expected_native_quantization(fmt.name, spec.scheme, spec.symmetric, spec.group_size)
        return _args_problems("config.json: quantization_config", qc, expected)
    problems = []
    groups = qc.get("config_groups") or {}
    if not groups:
        problems.append(f"config.json: quantization_config has no config_groups; recipe promised {spec.scheme}")
    weights, activations = expected_quantization(spec.scheme, spec.symmetric, spec.group_size)
    for name, group in groups.items():
        where = f"config.json: {name}"
        problems += _args_problems(f"{where}.weights", group.get("weights"), weights)
        problems += _args_problems(f"{where}.input_activations", group.get("input_activations"), activations)
    return problems


def verify_artifact(path: Path) -> Verification:
    """Recompute every hash and check stages and quantization_config; problems are listed, not raised."""
    artifact = open_artifact(path)
    files, checked = file_problems(artifact)
    problems = files + stage_problems(artifact.manifest) + quantization_problems(artifact.model_dir)
    return Verification(artifact, problems, checked)


def require_verified(result: Verification, allow_failed_gate: bool) -> None:
    """Print the problems and raise unless the artifact is intact (and, unless allowed, passed its gate)."""
    for problem in result.problems:
        print(f"  {problem}", file=sys.stderr)
    root = result.artifact.root
    if result.problems:
        raise VerificationFailed(
            f"{root}: verify failed with {len(result.problems)} problem(s) listed above; "
            "rebuild the artifact with `qpipe run` (do not publish a modified copy)"
        )
    if result.gate != "passed" and not allow_failed_gate:
        error = GateInconclusive if result.gate == "inconclusive" else GateFailed
        raise error(
            f"{root}: only a passed quality gate is published (manifest gate: {result.gate}); see reports/eval.json "
            "or the model card, or pass --allow-failed-gate to accept it"
        )
