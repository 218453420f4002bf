"""The table catalog: every registered table by name, built from a store and rendered in a format.

The built-in tables are imported here (the paper's shapes in ``results.shapes``, the sweep table in
``results.sweeps``), the way lm-evaluation-harness's ``models/__init__`` imports its backends: they
register themselves with ``results.registry.register_table``, which knows nothing of them, so neither
side imports the other back.  A plug-in's table is one ``@register_table`` function anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import duckdb

import results.sweeps  # noqa: F401  (registers the sweep table: Ray Tune trials)
from kebench.core.errors import KebenchError
from kebench.core.numerics import hardware_label
from kebench.core.scenarios import scenario_kinds
from results.registry import Table, TableDef, register_table, registered_tables
from results.render import FORMATS, RENDERERS
from results.shapes import register_scenario_table  # importing it registers the paper's tables
from results.store import CELLS_DIR, has_files
from results.views import connect, records

__all__ = ["FORMATS", "RENDERERS", "build_table", "connect", "get_table", "register_table", "render", "table_names"]

_NOTES_SQL = """
SELECT DISTINCT label, provenance, notes, hardware, status FROM cells_latest
WHERE ($scenario IS NULL OR scenario = $scenario)
ORDER BY ALL
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
    notes, hardware = footnotes(records(con, _NOTES_SQL, {"scenario": definition.scenario}))
    return Table(definition.title, blocks, notes, hardware)


def footnotes(cells: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """A table's footnotes, each distinct note once, numbered, with the rows (method labels) it holds for; and the
    hardware its ok cells were computed on, named in a footnote (with a warning when there is more than one: the
    table then mixes floating-point paths).  ``cells``: label, provenance, notes (a JSON list; NULL in stores
    written before it, where the whole provenance text is one note), hardware (JSON) and status per cell.
    The full record of each cell is the leaderboard's provenance section."""
    labels = sorted({cell["label"] for cell in cells}, key=str.lower)
    holds: dict[str, set[str]] = {}  # note -> labels, in first-seen order
    machines: dict[str, set[str]] = {}  # hardware label -> labels
    for cell in cells:
        for note in _cell_notes(cell):
            holds.setdefault(note, set()).add(cell["label"])
        if cell["status"] == "ok" and cell["hardware"]:
            record = _json(cell["hardware"])
            machines.setdefault(hardware_label(record if isinstance(record, dict) else None), set()).add(cell["label"])
    everywhere = [(note, rows) for note, rows in holds.items() if rows == set(labels)]  # the notes of all rows first
    elsewhere = [(note, rows) for note, rows in holds.items() if rows != set(labels)]
    out = []
    for text, rows in [*((f"computed on {label}", rows) for label, rows in machines.items()), *everywhere, *elsewhere]:
        where = "all rows" if len(labels) > 1 and rows == set(labels) else ", ".join(sorted(rows, key=str.lower))
        out.append(f"[{len(out) + 1}] {text} ({where})")
    if len(machines) > 1:
        out.append(f"Warning: this table mixes {len(machines)} hardware configurations (footnotes 1-{len(machines)}): "
                   "its numbers are not comparable bit for bit")
    return out, list(machines)


def _cell_notes(cell: Mapping[str, Any]) -> list[str]:
    listed = _json(cell.get("notes"))
    if isinstance(listed, list):
        return [str(note) for note in listed if str(note).strip()]
    text = (cell.get("provenance") or "").strip()
    return [text] if text else []


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


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
