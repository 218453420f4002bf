"""The table model every renderer draws, and ``register_table``.

A table is one decorated function that builds blocks from the DuckDB views::

    from kebench import register_table

    @register_table("my-table", title="Something per method")
    def my_table(con):          # con: a DuckDB connection with cells_latest / cases_latest
        return [Block(...)]

``kebench table --table my-table`` and the leaderboard then render it in every format.  This module
holds only the decorator and the model; the catalog that knows the built-in tables is ``results.tables``
(it imports them, so they can import this module without a circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import duckdb


NOT_RUN = "–"
FAILED = "×"
REFERENCE_LABEL = "unedited"  # the reference row (methods/unedited.py): shown first, never ranked


@dataclass(frozen=True)
class Cell:
    text: str
    mark: str = ""  # "best" (bold) | "second" (underlined) | ""
    sd: str = ""  # the sd over seeds, printed "text ± sd" ("" with one seed)


@dataclass
class Group:
    name: str
    columns: list[str]


@dataclass
class Block:
    """One sub-table: a model (and benchmark, B) with its column groups and one row per method label."""

    keys: dict[str, Any]  # the block's identifying columns, written out by the CSV renderer
    title: str
    groups: list[Group]
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)


@dataclass
class Table:
    title: str
    blocks: list[Block]
    notes: list[str]  # footnotes, each printed once (numbered by ``results.tables``)
    #: the hardware labels (``kebench.core.numerics.hardware_label``) of the table's cells
    hardware: list[str] = field(default_factory=list)


BuildFn = Callable[[duckdb.DuckDBPyConnection], list[Block]]


@dataclass(frozen=True)
class TableDef:
    name: str
    title: str
    build: BuildFn
    #: provenance notes are those of this scenario's cells (None: every cell's)
    scenario: str | None = None


_REGISTRY: dict[str, TableDef] = {}


def register_table(name: str, title: str, scenario: str | None = None) -> Callable[[BuildFn], BuildFn]:
    def decorate(build: BuildFn) -> BuildFn:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"table {name!r} registered twice")
        _REGISTRY[name] = TableDef(name, title, build, scenario)
        return build

    return decorate


def registered_tables() -> dict[str, TableDef]:
    """The tables registered so far, by name, in registration order (the catalog, ``results.tables``,
    imports the built-in ones first)."""
    return dict(_REGISTRY)


def row_order(label: str) -> tuple[int, str, str]:
    """The reference row first, then labels alphabetically (case-insensitive)."""
    return (0 if label == REFERENCE_LABEL else 1, label.lower(), label)
