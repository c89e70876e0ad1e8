"""What published files may say about the machine that made them: absolute local paths (model folders, data files,
the recipe's file, `--output`, the interpreter) are shortened to their last component, so a card or manifest on
the hub names `calib.jsonl`, not `/home/alice/private/calib.jsonl`."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

# An absolute or home-relative path where a value starts: at the start of the text or after whitespace, a quote,
# a backtick, `=` or an opening bracket (so `re:.*/down_proj`, `tok/s` and `https://...` are left alone).
LOCAL_PATH = re.compile(r"(?:(?<=^)|(?<=[\s\"'`=(\[]))~?/(?!/)[^\s\"'`|,;()\[\]]*")


def shorten(match: re.Match[str]) -> str:
    return PurePosixPath(match[0]).name or match[0]


def without_local_paths(text: str) -> str:
    """`text` with every absolute local path replaced by its last component."""
    return LOCAL_PATH.sub(shorten, text)


def scrub(value: Any) -> Any:
    """A JSON-like value with `without_local_paths` applied to every string in it (keys too)."""
    if isinstance(value, str):
        return without_local_paths(value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
