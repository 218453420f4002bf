"""The table catalog: every registered table by name, built from a store and rendered in a format.

The built-in tables are imported here (the paper's shapes in ``results.shapes``, the sweep table in
``results.sweeps``), the way lm-evaluation-harness's ``models/__init__`` imports its backends: they
register themselves with ``results.registry.register_table``, which knows nothing of them, so neither
side imports the other back.  A plug-in's table is one ``@register_table`` function anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import duckdb

import results.sweeps  # noqa: F401  (registers the sweep table: Ray Tune trials)
from kebench.core.errors import KebenchError
from kebench.core.scenarios import scenario_kinds
from results.registry import Table, TableDef, register_table, registered_tables
from results.render import FORMATS, RENDERERS
from results.shapes import register_scenario_table  # importing it registers the paper's tables
from results.store import CELLS_DIR, has_files
from results.views import connect, records

__all__ = ["FORMATS", "RENDERERS", "build_table", "connect", "get_table", "register_table", "render", "table_names"]

_NOTES_SQL = """
SELECT DISTINCT provenance FROM cells_latest
WHERE ($scenario IS NULL OR scenario = $scenario) AND coalesce(provenance, '') <> ''
ORDER BY provenance
"""


def _tables() -> dict[str, TableDef]:
    """Every registered table, with the metric table of each scenario kind declared since the built-ins."""
    for kind in scenario_kinds():
        if kind.table is not None and kind.name not in registered_tables():
            register_scenario_table(kind)
    return registered_tables()


def table_names() -> list[str]:
    return list(_tables())


def get_table(name: str) -> TableDef:
    tables = _tables()
    if name not in tables:
        raise KebenchError(f"unknown table '{name}'; known: {', '.join(tables)}")
    return tables[name]


def build_table(con: duckdb.DuckDBPyConnection, table: str) -> Table | None:
    """The format-independent table (None when the store has no cells for it)."""
    definition = get_table(table)
    blocks = definition.build(con)
    if not blocks:
        return None
    notes = [row["provenance"] for row in records(con, _NOTES_SQL, {"scenario": definition.scenario})]
    return Table(definition.title, blocks, notes)


def render(store: Path, table: str, fmt: str, skip: Collection[Path] = ()) -> str:
    """Render a registered table from the store as Markdown, LaTeX, CSV or HTML; ``skip``: unreadable
    files to leave out (``results.views.connect_readable`` finds them)."""
    definition = get_table(table)
    if fmt not in FORMATS:
        raise KebenchError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    store = Path(store)
    if not has_files(store, CELLS_DIR):
        return f"no results in {store}"
    with connect(store, skip) as con:
        built = build_table(con, definition.name)
    if built is None:
        return f"no {table} results in {store}"
    return RENDERERS[fmt](built)
