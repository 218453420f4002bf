"""Protocol tags: the string every result row carries in its ``protocol`` column, and how it is spelt.

A scoring protocol (``benchmarks.protocols``) may have named settings (the wild protocol's ``context``,
``max_new_tokens``, ...).  Its tag is its name when every setting has its default, else the name with the
settings that differ, sorted: ``wild(context=chat,max_new_tokens=32)``.  Rows of two tags are two
protocols: tables and the leaderboard never average across them.  The grammar lives in the base layer
because the results layer reads tags (``base_name``) and must not import the protocol registry.
"""

from __future__ import annotations

import re
from typing import Mapping

from kebench.core.errors import KebenchError

TEACHER_FORCED = "teacher_forced"
#: QAEdit's generation-based protocol ("The Mirage of Model Editing"), ``benchmarks.wild``
WILD = "wild"

_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_SPEC = re.compile(rf"^\s*({_NAME})\s*(?:\((.*)\))?\s*$")
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """(name, {setting: raw value}) of ``name`` or ``name(key=value,...)``; values stay strings."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise KebenchError(f"protocol '{spec}': expected NAME or NAME(key=value,...)")
    name, inner = match.group(1), match.group(2)
    settings: dict[str, str] = {}
    for part in (inner or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(_NAME, key) or not _VALUE.match(value):
            raise KebenchError(f"protocol '{spec}': setting '{part.strip()}' is not key=value")
        if key in settings:
            raise KebenchError(f"protocol '{spec}': setting '{key}' given twice")
        settings[key] = value
    return name, settings


def format_spec(name: str, settings: Mapping[str, object]) -> str:
    """The canonical tag: the name, then the given settings sorted by key (pass only non-default ones)."""
    if not settings:
        return name
    parts = ",".join(f"{key}={_text(value)}" for key, value in sorted(settings.items()))
    return f"{name}({parts})"


def base_name(tag: str) -> str:
    """The protocol's name without its settings (``wild(context=chat)`` -> ``wild``); any string is accepted."""
    return tag.split("(", 1)[0]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
