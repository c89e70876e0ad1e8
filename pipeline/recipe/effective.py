"""The effective recipe as people read it: YAML with the origin of every value (`qpipe recipes show`, as
`git config --show-origin`), and the settings in which two recipes differ (`qpipe diff`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from pipeline.recipe.load import MergedRecipe
from pipeline.recipe.schema import Recipe

DEFAULT_ORIGIN = "default"
ALIGN_UP_TO = 60  # longer lines (the smoke prompts) do not push every origin comment to the right
MISSING = "–"


def flow(value: Any) -> str:
    """A value as one line of YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def leaves(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every value that is not a non-empty mapping, in order."""
    for key, value in node.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value:
            yield from leaves(value, path)
        else:
            yield path, value


def show_with_origins(merged: MergedRecipe) -> str:
    """The validated effective recipe as YAML, each value followed by `# origin` (a file, --set, default)."""
    lines: list[tuple[str, str | None]] = []
    opened: tuple[str, ...] = ()
    for path, value in leaves(merged.build().model_dump(mode="json")):
        section = path[:-1]
        shared = len(os.path.commonprefix([opened, section]))  # sections already open above
        lines += [("  " * depth + f"{flow(section[depth])}:", None) for depth in range(shared, len(section))]
        opened = section
        text = "  " * len(section) + f"{flow(path[-1])}: {flow(value)}"
        lines.append((text, merged.origins.get(path, DEFAULT_ORIGIN)))
    width = max(len(text) for text, origin in lines if origin and len(text) <= ALIGN_UP_TO)
    return "".join(f"{text.ljust(width)}  # {origin}\n" if origin else f"{text}\n" for text, origin in lines)


def settings(recipe: Recipe) -> dict[str, str]:
    """Every effective setting as `section.field` -> its value in YAML."""
    return {".".join(path): flow(value) for path, value in leaves(recipe.model_dump(mode="json"))}


def differences(a: dict[str, str], b: dict[str, str]) -> list[list[str]]:
    """[key, a's value, b's value] for every key whose values differ ("–" where one side lacks it)."""
    return [
        [key, a.get(key, MISSING), b.get(key, MISSING)] for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)
    ]


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns, as a terminal shows them."""
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
    return "".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in (head, *rows)
    )
