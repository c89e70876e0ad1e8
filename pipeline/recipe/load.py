"""Recipe loading: a name or path, `extends:` chains, `--set key.path=value` overrides and the data defaults."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import PipelineError
from pipeline.paths import bundled
from pipeline.recipe.schema import DEMO_DATA, REAL_MODEL_DATA, Recipe

RECIPES_DIR = bundled("recipes")
YAML_SUFFIXES = (".yaml", ".yml")
Origins = dict[tuple[str, ...], str]  # key path -> where its value came from (a file, --set, a default)


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. YAML 1.1 (PyYAML's default) also reads on/off/yes/no as booleans,
    so the documented `tuning: off` would arrive as False; boolean fields still take those words (pydantic)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """Recipe YAML (files, `--set` values, saved recipes) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=RecipeLoader)


def resolve_recipe_path(ref: str) -> Path:
    """A recipe name from `recipes/` or a path to any YAML file."""
    candidate = Path(ref).expanduser()
    if candidate.suffix in YAML_SUFFIXES or candidate.exists():
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


def expand_recipe_refs(refs: Sequence[str]) -> list[str]:
    """Recipe names and files as given; a folder stands for its runnable recipes (bases, `_*.yaml`, are checked
    through the recipes that extend them)."""
    expanded: list[str] = []
    for ref in refs:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            expanded.append(ref)
            continue
        found = sorted(p for p in folder.iterdir() if p.suffix in YAML_SUFFIXES and not p.name.startswith("_"))
        if not found:
            raise PipelineError(f"{ref}: no recipes (*.yaml, *.yml) in this folder; pass recipe files or names")
        expanded += [str(p) for p in found]
    return expanded


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
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


def _parent_candidates(path: Path, parent: str) -> list[Path]:
    """Where `extends: parent` of the recipe at `path` is looked for: a file name or path is relative to the
    recipe (a bare file name also among the bundled recipes, so `_base.yaml` works from any folder); a name
    without .yaml is a bundled recipe, as on the command line (`extends: awq`)."""
    if Path(parent).suffix in YAML_SUFFIXES or "/" in parent:
        candidates = [path.parent / parent]
        if Path(parent).name == parent:
            candidates.append(RECIPES_DIR / parent)
        return candidates
    return [RECIPES_DIR / f"{parent}.yaml"]


def _extends_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The recipe file and the files it extends, each with its own mapping, the furthest parent first."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(p.name for p in seen)
        raise PipelineError(f"{display_path(path)}: extends: cycle through {cycle}; remove it")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return [(path, data)]
    if not isinstance(parent, str):
        raise PipelineError(f"{display_path(path)}: extends: must be a recipe name or file name; got {parent!r}")
    candidates = _parent_candidates(path, parent)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise PipelineError(
            f"{display_path(path)}: extends: {parent} not found (looked for {looked}); "
            f"name a bundled recipe ({', '.join(p.stem for p in list_recipe_files())}) or a path relative to the recipe"
        )
    return [*_extends_chain(found, (*seen, path)), (path, data)]


def apply_override(data: dict[str, Any], assignment: str) -> tuple[tuple[str, ...], Any]:
    """Apply one `key.path=value` (value parsed as YAML) in place; returns the key path and the value."""
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
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value
    return tuple(parts), value


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


def apply_data_defaults(data: dict[str, Any]) -> Origins:
    """Fill in the calibration and eval data the merged recipe leaves unset, by model (DEMO_DATA/REAL_MODEL_DATA);
    returns what it filled in.

    Done on the mapping, before validation, so the effective recipe and the artifact hash show concrete data."""
    model = data.get("model")
    real = isinstance(model, dict) and model.get("id") is not None
    origin = "default for a model other than the demo model" if real else "default for the demo model"
    filled: Origins = {}
    for section, defaults in (REAL_MODEL_DATA if real else DEMO_DATA).items():
        node = data.setdefault(section, {})
        if isinstance(node, dict) and next(iter(defaults)) not in node:
            for key, value in defaults.items():
                if key not in node:
                    node[key] = value
                    filled[(section, key)] = origin
    return filled


def _mark(origins: Origins, key: tuple[str, ...], value: Any, origin: str) -> None:
    """Record `origin` for every value under `key` (a mapping's values one by one, as they merge)."""
    if isinstance(value, dict) and value:
        for child, item in value.items():
            _mark(origins, (*key, str(child)), item, origin)
    else:
        origins[key] = origin


@dataclass
class MergedRecipe:
    """A recipe's mapping after `extends:`, `--set`, `--model` and the data defaults, before validation, with
    where each value came from (a key absent from `origins` takes the schema's default)."""

    path: Path
    data: dict[str, Any]
    origins: Origins

    def build(self) -> Recipe:
        return build_recipe(self.data, display_path(self.path))


def merge_recipe(ref: str, overrides: Sequence[str] = (), model: str | None = None) -> MergedRecipe:
    """Resolve a recipe, merge its `extends:` chain, apply overrides, `--model` and the data defaults."""
    path = resolve_recipe_path(ref)
    data: dict[str, Any] = {}
    origins: Origins = {}
    for file, layer in _extends_chain(path):
        data = deep_merge(data, layer)
        _mark(origins, (), layer, display_path(file))
    if "name" not in data:
        data["name"] = path.stem
        origins[("name",)] = f"{display_path(path)} (file name)"
    for assignment in overrides:
        _mark(origins, *apply_override(data, assignment), f"--set {assignment}")
    if model:
        data.setdefault("model", {})["id"] = model
        origins[("model", "id")] = "--model"
    origins.update(apply_data_defaults(data))
    return MergedRecipe(path, data, origins)


def load_recipe(ref: str, overrides: Sequence[str] = (), model: str | None = None) -> tuple[Recipe, Path]:
    """Resolve, merge `extends:`, apply overrides, `--model` and the data defaults, and validate a recipe."""
    merged = merge_recipe(ref, overrides, model)
    return merged.build(), merged.path


def display_path(path: Path) -> str:
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
