"""DuckDB views over the result store.

- ``cells_all`` / ``cases_all``: every stored attempt, columns exactly as ``CELLS_SCHEMA`` /
  ``CASES_SCHEMA`` (a column missing from older files reads as NULL, so the views stay stable as the
  schema grows);
- ``cells_latest``: the latest attempt of each grid cell, so a re-run replaces a failed or stale result
  without deleting anything; ``cases_latest``: the case rows of exactly those attempts.  Ray Tune
  trials (``kind = 'tune'``, written by ``orchestrator/sweep.py``) are not grid cells: the paper's
  tables and the leaderboard never see them;
- ``trials_latest`` / ``trial_cases``: the latest attempt of each trial and its case rows (the
  ``sweep`` table); ``kebench_store``: one row naming the store directory (where tables write plots).

A store with unreadable files (truncated, junk): ``connect_readable`` finds them (``scan_store``) and
builds the views over every other file, so ``kebench table`` and ``kebench leaderboard`` render the rest
and name the bad files, by one mechanism (issue 31).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import duckdb
import pyarrow as pa

from results.store import CASES_DIR, CASES_SCHEMA, CELLS_DIR, CELLS_SCHEMA, has_files, parquet_glob, scan_store

_SQL_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
              pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


def connect(store: Path, skip: Collection[Path] = ()) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views over ``store`` (empty views if it is empty).

    ``skip``: files left out of the views (the unreadable ones ``connect_readable`` found); DuckDB
    fails the whole query on one bad file, so they must never reach it."""
    con = duckdb.connect()
    skipped = {Path(path).resolve() for path in skip}
    for view, dataset, schema in (("cells_all", CELLS_DIR, CELLS_SCHEMA), ("cases_all", CASES_DIR, CASES_SCHEMA)):
        con.execute(f"CREATE VIEW {view} AS {_dataset_select(con, Path(store), dataset, schema, skipped)}")
    con.execute("""
        CREATE VIEW attempts_latest AS
        SELECT * FROM cells_all
        QUALIFY row_number() OVER (PARTITION BY cell_id ORDER BY attempt DESC) = 1
    """)
    con.execute("CREATE VIEW cells_latest AS SELECT * FROM attempts_latest WHERE coalesce(kind, 'grid') <> 'tune'")
    con.execute("CREATE VIEW trials_latest AS SELECT * FROM attempts_latest WHERE kind = 'tune'")
    con.execute("""
        CREATE VIEW cases_latest AS
        SELECT * FROM cases_all SEMI JOIN cells_latest USING (cell_id, attempt)
    """)
    con.execute("""
        CREATE VIEW trial_cases AS
        SELECT * FROM cases_all SEMI JOIN trials_latest USING (cell_id, attempt)
    """)
    con.execute("CREATE TABLE kebench_store AS SELECT $store AS path", {"store": str(Path(store).resolve())})
    return con


def connect_readable(store: Path) -> tuple[duckdb.DuckDBPyConnection, list[tuple[Path, str]]]:
    """The views over every readable file of ``store``, and ``(path, reason)`` of each unreadable one left
    out, for the caller to name (``kebench table`` and ``kebench leaderboard`` print them on stderr)."""
    unreadable = scan_store(store).unreadable
    return connect(store, skip=[path for path, _ in unreadable]), unreadable


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _dataset_select(con: duckdb.DuckDBPyConnection, store: Path, dataset: str, schema: pa.Schema,
                    skipped: Collection[Path] = ()) -> str:
    """SELECT the schema's columns, in order, from the dataset's Parquet files (NULL where absent).

    hive_types_autocast is off so that a model named e.g. ``7`` stays a string.  Without ``skipped`` files
    the dataset is read by its glob; with them, by the explicit list of the other files.
    """
    present: set[str] = set()
    source = ""
    if has_files(store, dataset):
        if skipped:
            files = [str(path) for path in sorted((store / dataset).rglob("*.parquet")) if path.resolve() not in skipped]
            what = "[" + ", ".join(_sql_text(file) for file in files) + "]" if files else ""
        else:
            what = _sql_text(parquet_glob(store, dataset))
        if what:
            source = (f"read_parquet({what}, hive_partitioning = true, union_by_name = true, "
                      "hive_types_autocast = false)")
            present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    columns = ", ".join(f'"{f.name}"' if f.name in present else f'CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"'
                        for f in schema)
    return f"SELECT {columns} FROM {source}" if present else f"SELECT {columns} WHERE false"


def records(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = con.execute(sql, params or {})
    names = [column[0] for column in result.description]
    return [dict(zip(names, row)) for row in result.fetchall()]
