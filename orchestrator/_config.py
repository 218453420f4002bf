"""The config toolkit grid and sweep files are read with: a strict YAML loader and typed getters.

Every getter takes the value, the file it came from (``source``) and the key path that leads to it
(``where``, e.g. ``benchmarks[0].n``), and either returns the value in the type the spec wants or raises
a ``KebenchError`` of one line, ``<file>: <key path> must be ..., got ...``, with a "did you mean" where a
name is close to a known one.  A grid runs for hours and a sweep for many trials: every such mistake is
found here, before Ray starts.

The loader is PyYAML's ``SafeLoader`` that also rejects duplicate keys (PyYAML keeps the last one
silently, so a second ``hparams:`` would quietly win).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from kebench.core.errors import KebenchError

#: seeds are stored in an int64 column (results/store.py): a larger one would fail after the cell ran
MAX_SEED = 2**63 - 1
#: names that end up in store paths and hive partition values (grid and sweep names, method labels)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


# --------------------------------------------------------------------------- strict YAML

class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently (last one wins)."""


def _construct_strict_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: let the normal constructor report it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line, with its line and column when PyYAML knows them."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return one_line(exc)


def load_yaml_file(path: str | os.PathLike[str], what: str) -> Any:
    """Read ``path`` with the strict loader; ``what`` ("grid", "sweep") names the file in the errors."""
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise KebenchError(f"{source}: {what} file not found")
    if not file.is_file():
        raise KebenchError(f"{source}: not a file ({what} files are YAML)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KebenchError(f"{source}: cannot read: {one_line(exc)}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise KebenchError(f"{source}: invalid YAML: {yaml_problem(exc)}") from None


# --------------------------------------------------------------------------- keys

def check_keys(mapping: Mapping[Any, Any], known: Sequence[str], source: str, where: str) -> None:
    """Every key of ``mapping`` is one of ``known`` (``where``: e.g. "at top level", "in benchmarks[0]")."""
    for key in mapping:
        if key not in known:
            raise KebenchError(f"{source}: unknown key {key!r} {where}{did_you_mean(key, known)}; "
                               f"known: {', '.join(known)}")


def require_keys(mapping: Mapping[Any, Any], required: Sequence[str], source: str, where: str) -> None:
    """The first of ``required`` missing from ``mapping`` is an error (``where``: "at top level", "benchmarks[0]")."""
    for key in required:
        if key not in mapping:
            raise KebenchError(f"{source}: missing required key '{key}' {where}" if where.startswith("at ")
                               else f"{source}: {where}: missing required key '{key}'")


def did_you_mean(key: Any, known: Iterable[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------- typed getters

def mapping(value: Any, source: str, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise KebenchError(f"{source}: {where} must be a mapping, got {describe(value)}")
    return value


def nonempty_list(value: Any, source: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else describe(value)
        raise KebenchError(f"{source}: {where} must be a non-empty list, got {got}")
    return value


def string(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KebenchError(f"{source}: {where} must be a non-empty string, got {describe(value)}")
    return value


def safe_name(value: Any, source: str, where: str) -> str:
    text = string(value, source, where)
    if not SAFE_NAME.fullmatch(text):
        raise KebenchError(f"{source}: {where} must be letters, digits and . _ + = - (it names files and "
                           f"partitions), got {text!r}")
    return text


def choice(value: Any, choices: Sequence[str], source: str, where: str) -> str:
    """One of ``choices``; a near miss gets a "did you mean"."""
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices)
        raise KebenchError(f"{source}: {where} must be one of {', '.join(choices)}, got {describe(value)}{hint}")
    return value


def integer(value: Any, source: str, where: str, minimum: int, maximum: int | None = None) -> int:
    """YAML ``true`` is a Python bool, which is an int subclass: reject it explicitly."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KebenchError(f"{source}: {where} must be an integer >= {minimum}, got {describe(value)}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise KebenchError(f"{source}: {where} must be {kind}, got {value}")
    if maximum is not None and value > maximum:
        raise KebenchError(f"{source}: {where} must be at most {maximum} (it is stored as a 64-bit integer), got {value}")
    return value


def int_or_list(value: Any, source: str, where: str) -> tuple[int, ...]:
    """A positive integer or a non-empty list of distinct ones (a grid axis: one scenario each)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise KebenchError(f"{source}: {where} must be a positive integer or a non-empty list of them, got an empty list")
    values: list[int] = []
    for position, item in enumerate(items):
        item_where = f"{where}[{position}]" if isinstance(value, list) else where
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise KebenchError(f"{source}: {item_where} must be a positive integer, got {describe(item)}")
        no_duplicate(item, values, source, item_where, "value")
        values.append(item)
    return tuple(values)


def number(value: Any, source: str, where: str, minimum: float = 0.0) -> float:
    """A finite number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise KebenchError(f"{source}: {where} must be a number >= {minimum:g}, got {describe(value)}")
    return float(value)


def string_list(value: Any, source: str, where: str) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings."""
    items = nonempty_list(value, source, where)
    out: list[str] = []
    for index, item in enumerate(items):
        text = string(item, source, f"{where}[{index}]")
        no_duplicate(text, out, source, f"{where}[{index}]", "entry")
        out.append(text)
    return tuple(out)


def freeze(value: Any, source: str, where: str) -> Any:
    """Lists become tuples so specs stay hashable; hyperparameters are scalars or lists of scalars."""
    if isinstance(value, list):
        return tuple(freeze(item, source, where) for item in value)
    if isinstance(value, dict):
        raise KebenchError(f"{source}: {where} must be a scalar or a list, got a mapping")
    return value


def thaw(value: Any) -> Any:
    """``freeze`` undone, for JSON and YAML output."""
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    return value


def no_duplicate(item: Any, seen: Iterable[Any], source: str, where: str, what: str, shown: str | None = None) -> None:
    if item in seen:
        raise KebenchError(f"{source}: {where}: duplicate {what} {shown if shown is not None else repr(item)}")


# --------------------------------------------------------------------------- messages

def describe(value: Any) -> str:
    """A value as an error message shows it: strings quoted, booleans and null named, containers by kind."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip()


def within(source: str, where: str, exc: KebenchError) -> KebenchError:
    """A lower layer's one-line error re-raised under the file and key path it came from."""
    return KebenchError(f"{source}: {where}: {one_line(exc)}")
