"""Recipe loading: a name or path, `extends:` chains, `--set key.path=value` overrides and the data defaults."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import PipelineError
from pipeline.paths import bundled
from pipeline.recipe.schema import DEMO_DATA, REAL_MODEL_DATA, Recipe

RECIPES_DIR = bundled("recipes")


def resolve_recipe_path(ref: str) -> Path:
    """A recipe name from `recipes/` or a path to any YAML file."""
    candidate = Path(ref).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise PipelineError(f"{ref}: recipe file not found; pass a recipe name from recipes/ or a YAML path")
        return candidate
    named = RECIPES_DIR / f"{ref}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in list_recipe_files()))
        raise PipelineError(f"{ref}: no such recipe; choose one of: {known} (or pass a YAML path)")
    return named


def list_recipe_files() -> list[Path]:
    """Runnable recipes in `recipes/` (files whose name starts with '_' are shared bases)."""
    return sorted(p for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if data is None:
        raise PipelineError(f"{path}: the recipe file is empty; add `extends: _base.yaml` and a quantize section")
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a recipe must be a YAML mapping of sections; got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`; mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise PipelineError(f"{path}: extends: cycle through {' -> '.join(p.name for p in seen)}; remove it")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PipelineError(f"{path}: extends: must be a file name; got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise PipelineError(f"{path}: extends: {parent} not found next to the recipe; fix the file name")
    return deep_merge(_load_with_extends(parent_path, (*seen, path)), data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` (value parsed as YAML) in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {assignment!r}: expected key.path=value, e.g. quantize.group_size=64")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PipelineError(f"--set {key}: {part} is not a section; check the key path")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _format_validation_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key; remove it or check its spelling"
    if err["type"] == "missing":
        return f"{source}: {loc}: required field missing; add it"
    field = re.match(r"^(\w+): ", msg)
    if field and err["type"] == "value_error":
        loc, msg = f"{loc}.{field.group(1)}" if loc else field.group(1), msg[field.end() :]
    given = err.get("input")
    shown = "" if isinstance(given, dict) or msg.endswith(str(given)) else f"; got {given!r}"
    return f"{source}: {loc + ': ' if loc else ''}{msg}{shown}"


def build_recipe(data: dict[str, Any], source: str) -> Recipe:
    """Validate a merged recipe mapping; errors become one-line PipelineErrors."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_format_validation_error(source, exc)) from None


def apply_data_defaults(data: dict[str, Any]) -> None:
    """Fill in the calibration and eval data the merged recipe leaves unset, by model (DEMO_DATA/REAL_MODEL_DATA).

    Done on the mapping, before validation, so the effective recipe and the artifact hash show concrete data."""
    model = data.get("model")
    real = isinstance(model, dict) and model.get("id") is not None
    for section, defaults in (REAL_MODEL_DATA if real else DEMO_DATA).items():
        node = data.setdefault(section, {})
        if isinstance(node, dict) and next(iter(defaults)) not in node:
            for key, value in defaults.items():
                node.setdefault(key, value)


def load_recipe(ref: str, overrides: list[str] = (), model: str | None = None) -> tuple[Recipe, Path]:
    """Resolve, merge `extends:`, apply overrides, `--model` and the data defaults, and validate a recipe."""
    path = resolve_recipe_path(ref)
    data = _load_with_extends(path)
    data.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(data, assignment)
    if model:
        data.setdefault("model", {})["id"] = model
    apply_data_defaults(data)
    return build_recipe(data, _display(path)), path


def _display(path: Path) -> str:
    """Path relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def recipe_yaml(recipe: Recipe) -> str:
    """The effective recipe as YAML, as saved beside the artifact."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def resolve_data_path(value: str) -> Path:
    """A relative data path is taken from the working directory, else from the project's bundled files."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    packaged = bundled(path)
    return packaged if packaged.exists() else path
