"""DuckDB views over the result store and the BaFT paper's tables rendered from them.

Views (``connect``):
- ``cells_all`` / ``cases_all``: every stored attempt, columns exactly as ``CELLS_SCHEMA`` /
  ``CASES_SCHEMA`` (a column missing from older files reads as NULL, so the views stay stable as the
  schema grows);
- ``cells_latest``: the latest attempt of each cell, so a re-run replaces a failed or stale result
  without deleting anything; ``cases_latest``: the case rows of exactly those attempts.

Tables (``render``): ``single`` (Table 1), ``continual`` (Table 2), ``batched`` (Tables 6-7),
``params`` (Table 3) and ``downstream`` (Table 8: e.g. PIQA accuracy after a stream, beside the
unedited model). Values are means over all case rows of the latest ok attempts (so over cases
and seeds) of the cells that share a method label; Avg. is the mean of the metric means a row has.
Rows never pool different ``protocol`` values: a label measured under several protocols gets one
row per protocol. "–" marks a (method, group) that was never run (or a metric it lacks), "×" one
with a cell whose latest attempt failed: a mean over the seeds that happened to succeed would look
like a complete result.
"""

from __future__ import annotations

import csv
import html
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import duckdb
import pyarrow as pa

from results.store import CASES_DIR, CASES_SCHEMA, CELLS_DIR, CELLS_SCHEMA, METRICS, has_files, parquet_glob

TABLES = ("single", "continual", "batched", "params", "downstream")
FORMATS = ("md", "latex", "csv", "html")
METRIC_HEADERS = {"rel": "Rel.", "gen": "Gen.", "loc": "Loc.", "por": "Por."}
NOT_RUN = "–"
FAILED = "×"

_TITLES = {
    "single": "Single editing",
    "continual": "Continual editing (evaluated after T sequential edits)",
    "batched": "Batched editing (T sequential edits of B cases each)",
    "params": "Trainable parameters and editing time",
    "downstream": "Downstream task accuracy after a stream of edits (unedited model: Base)",
}
_SQL_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
              pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


# --- views --------------------------------------------------------------------------------------


def connect(store: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the four views over ``store`` (empty views if it is empty)."""
    con = duckdb.connect()
    for view, dataset, schema in (("cells_all", CELLS_DIR, CELLS_SCHEMA), ("cases_all", CASES_DIR, CASES_SCHEMA)):
        con.execute(f"CREATE VIEW {view} AS {_dataset_select(con, Path(store), dataset, schema)}")
    con.execute("""
        CREATE VIEW cells_latest AS
        SELECT * FROM cells_all
        QUALIFY row_number() OVER (PARTITION BY cell_id ORDER BY attempt DESC) = 1
    """)
    con.execute("""
        CREATE VIEW cases_latest AS
        SELECT * FROM cases_all SEMI JOIN cells_latest USING (cell_id, attempt)
    """)
    return con


def _dataset_select(con: duckdb.DuckDBPyConnection, store: Path, dataset: str, schema: pa.Schema) -> str:
    """SELECT the schema's columns, in order, from the dataset's Parquet files (NULL where absent).

    hive_types_autocast is off so that a model named e.g. ``7`` stays a string.
    """
    present: set[str] = set()
    source = ""
    if has_files(store, dataset):
        glob = parquet_glob(store, dataset).replace("'", "''")
        source = (f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true, "
                  "hive_types_autocast = false)")
        present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    columns = ", ".join(f'"{f.name}"' if f.name in present else f'CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"'
                        for f in schema)
    return f"SELECT {columns} FROM {source}" if present else f"SELECT {columns} WHERE false"


def _records(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = con.execute(sql, params or {})
    names = [column[0] for column in result.description]
    return [dict(zip(names, row)) for row in result.fetchall()]


# --- the table model every format renders -------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    text: str
    mark: str = ""  # "best" (bold) | "second" (underlined) | ""


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
    notes: list[str]


@dataclass(frozen=True)
class _Spec:
    scenario: str
    block_keys: tuple[str, ...]
    group_keys: tuple[str, ...]
    default_metrics: tuple[str, ...]


_SPECS = {
    "single": _Spec("single", ("model",), ("benchmark", "split"), ("rel", "loc")),
    "continual": _Spec("continual", ("model", "benchmark", "split"), ("T",), ("rel", "gen", "loc")),
    "batched": _Spec("batched", ("model", "benchmark", "split", "B"), ("T",), ("rel", "gen", "loc")),
}

_MEANS_SQL = """
SELECT model, benchmark, split, "B", "T", label, protocol, metric, avg(value) AS mean
FROM cases_latest
WHERE cell_id IN (SELECT cell_id FROM cells_latest WHERE scenario = $scenario AND status = 'ok')
GROUP BY ALL
"""
_STATUS_SQL = """
SELECT model, benchmark, split, "B", "T", label, bool_or(status = 'failed') AS failed
FROM cells_latest
WHERE scenario = $scenario
GROUP BY ALL
"""
_PARAMS_SQL = """
SELECT model, label,
       bool_or(status = 'ok') AS ok,
       avg(seconds_per_edit) FILTER (WHERE status = 'ok') AS seconds_per_edit,
       min(trainable_params) FILTER (WHERE status = 'ok') AS params_min,
       max(trainable_params) FILTER (WHERE status = 'ok') AS params_max
FROM cells_latest
GROUP BY ALL
"""
_DOWNSTREAM_SQL = """
SELECT model, benchmark, split, scenario, "T", "B", downstream, label,
       bool_or(status = 'failed') AS failed,
       max(downstream_items) AS items,
       avg(downstream_unedited) FILTER (WHERE status = 'ok') AS unedited,
       avg(downstream_edited) FILTER (WHERE status = 'ok') AS edited
FROM cells_latest
WHERE downstream IS NOT NULL
GROUP BY ALL
"""
_NOTES_SQL = """
SELECT DISTINCT provenance FROM cells_latest
WHERE ($scenario IS NULL OR scenario = $scenario) AND coalesce(provenance, '') <> ''
ORDER BY provenance
"""


def build_table(con: duckdb.DuckDBPyConnection, table: str) -> Table | None:
    """The format-independent table (None when the store has no cells for it)."""
    if table == "params":
        blocks = _params_blocks(con)
        scenario = None
    elif table == "downstream":
        blocks = _downstream_blocks(con)
        scenario = None
    else:
        blocks = _metric_blocks(con, _SPECS[table])
        scenario = _SPECS[table].scenario
    if not blocks:
        return None
    notes = [row["provenance"] for row in _records(con, _NOTES_SQL, {"scenario": scenario})]
    return Table(_TITLES[table], blocks, notes)


def _key(row: dict[str, Any], names: tuple[str, ...]) -> tuple:
    return tuple(row[name] for name in names)


def _metric_blocks(con: duckdb.DuckDBPyConnection, spec: _Spec) -> list[Block]:
    params = {"scenario": spec.scenario}
    status = _records(con, _STATUS_SQL, params)  # one row per (block, group, label): any cell failed?
    means = _records(con, _MEANS_SQL, params)  # one row per (block, group, label, protocol, metric)
    splits: dict[str, set[str]] = defaultdict(set)
    for row in status:
        splits[row["benchmark"]].add(row["split"])
    multi_split = {benchmark for benchmark, names in splits.items() if len(names) > 1}
    blocks = []
    for block_key in sorted({_key(row, spec.block_keys) for row in status}):
        keys = dict(zip(spec.block_keys, block_key))
        block_status = [row for row in status if _key(row, spec.block_keys) == block_key]
        block_means = [row for row in means if _key(row, spec.block_keys) == block_key]
        blocks.append(_metric_block(spec, keys, block_status, block_means, multi_split))
    return blocks


def _metric_block(spec: _Spec, keys: dict[str, Any], status: list[dict[str, Any]], means: list[dict[str, Any]],
                  multi_split: set[str]) -> Block:
    """One block: a row per (label, protocol), a column group per group key (benchmark or T)."""
    failed = {(_key(row, spec.group_keys), row["label"]) for row in status if row["failed"]}
    values: dict[tuple, dict[str, float]] = defaultdict(dict)  # (group, label, protocol) -> metric -> mean
    protocols: dict[str, set[str]] = {row["label"]: set() for row in status}
    for row in means:
        values[(_key(row, spec.group_keys), row["label"], row["protocol"])][row["metric"]] = row["mean"]
        protocols[row["label"]].add(row["protocol"])
    row_keys = sorted(((label, protocol) for label, found in protocols.items() for protocol in sorted(found) or [None]),
                      key=lambda key: (key[0].lower(), key[0], key[1] or ""))
    block_metrics = _present_metrics(values.values()) or list(spec.default_metrics)

    groups: list[Group] = []
    row_cells: list[list[Cell]] = [[] for _ in row_keys]
    for group in sorted({_key(row, spec.group_keys) for row in status}):
        metrics = _present_metrics(v for (g, _, _), v in values.items() if g == group) or block_metrics
        texts = [_group_texts(values.get((group, label, protocol)), (group, label) in failed, metrics)
                 for label, protocol in row_keys]
        for cells, row_texts, avg in zip(row_cells, texts, _mark_best([t[-1] for t in texts])):
            cells += [Cell(text) for text in row_texts[:-1]] + [avg]
        name = _group_name(dict(zip(spec.group_keys, group)), multi_split)
        groups.append(Group(name, [METRIC_HEADERS[metric] for metric in metrics] + ["Avg."]))
    rows = [(_row_label(label, protocol, protocols[label]), cells)
            for (label, protocol), cells in zip(row_keys, row_cells)]
    return Block(keys, _block_title(keys, multi_split), groups, rows)


def _group_texts(found: dict[str, float] | None, failed: bool, metrics: list[str]) -> list[str]:
    """One row's metric cells and Avg. (the mean of the metric means it has) in one column group."""
    if failed:
        return [FAILED] * (len(metrics) + 1)
    if not found:
        return [NOT_RUN] * (len(metrics) + 1)
    return [_number(found.get(metric)) for metric in metrics] + [_number(sum(found.values()) / len(found))]


def _present_metrics(metric_maps: Any) -> list[str]:
    """The paper's metrics (in paper order) that any of the given rows has."""
    seen: set[str] = set()
    for metric_map in metric_maps:
        seen.update(metric_map)
    return [metric for metric in METRICS if metric in seen]


def _mark_best(texts: list[str]) -> list[Cell]:
    """Bold the best and underline the second-best Avg. (compared as printed, so ties share a mark)."""
    ranked = sorted({float(text) for text in texts if _is_number(text)}, reverse=True)
    marks = {value: mark for value, mark in zip(ranked, ("best", "second"))}
    return [Cell(text, marks.get(float(text), "") if _is_number(text) else "") for text in texts]


def _is_number(text: str) -> bool:
    return text not in (NOT_RUN, FAILED)


def _number(value: float | None) -> str:
    return NOT_RUN if value is None else f"{round(value, 2) + 0.0:.2f}"


def _row_label(label: str, protocol: str | None, protocols: set[str]) -> str:
    return f"{label} [{protocol}]" if len(protocols) > 1 else label


def _bench_name(benchmark: str, split: str, multi_split: set[str]) -> str:
    # The split is shown only where one benchmark appears with several splits in the table.
    return f"{benchmark} ({split})" if benchmark in multi_split else benchmark


def _group_name(keys: dict[str, Any], multi_split: set[str]) -> str:
    if "benchmark" in keys:
        return _bench_name(keys["benchmark"], keys["split"], multi_split)
    return f"T={keys['T']}"


def _block_title(keys: dict[str, Any], multi_split: set[str]) -> str:
    parts = [keys["model"]]
    if "benchmark" in keys:
        parts.append(_bench_name(keys["benchmark"], keys["split"], multi_split))
    if "B" in keys:
        parts.append(f"B={keys['B']}")
    return " · ".join(parts)


def _params_blocks(con: duckdb.DuckDBPyConnection) -> list[Block]:
    """Table 3's shape: one row per method label, a (# Params., Time) column group per model."""
    stats = {(row["model"], row["label"]): row for row in _records(con, _PARAMS_SQL)}
    if not stats:
        return []
    models = sorted({model for model, _ in stats})
    labels = sorted({label for _, label in stats}, key=lambda label: (label.lower(), label))
    rows = []
    for label in labels:
        cells: list[Cell] = []
        for model in models:
            row = stats.get((model, label))
            if row is None:
                cells += [Cell(NOT_RUN), Cell(NOT_RUN)]
            elif not row["ok"]:
                cells += [Cell(FAILED), Cell(FAILED)]
            else:
                params = _params_text(row["params_min"], row["params_max"])
                cells += [Cell(params), Cell(_number(row["seconds_per_edit"]))]
        rows.append((label, cells))
    groups = [Group(model, ["# Params.", "Time (sec./edit)"]) for model in models]
    return [Block({}, "", groups, rows)]


def _downstream_blocks(con: duckdb.DuckDBPyConnection) -> list[Block]:
    """Table 8's content: per (model, benchmark, stream shape, check), the unedited model's score ("Base")
    and each method label's score after its streams (mean over streams, seeds), best in bold."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in _records(con, _DOWNSTREAM_SQL):
        grouped[(row["model"], row["benchmark"], row["split"], row["scenario"], row["T"], row["B"],
                 row["downstream"])].append(row)
    blocks = []
    for key in sorted(grouped):
        model, benchmark, split, scenario, t, b, check = key
        rows = sorted(grouped[key], key=lambda row: (row["label"].lower(), row["label"]))
        base = [row["unedited"] for row in rows if row["unedited"] is not None]
        items = max((row["items"] for row in rows if row["items"] is not None), default=None)
        texts = [FAILED if row["failed"] else _accuracy(row["edited"]) for row in rows]
        marked = _mark_best(texts)
        table_rows = [("Base (unedited)", [Cell(_accuracy(sum(base) / len(base)) if base else NOT_RUN)])]
        table_rows += [(row["label"], [cell]) for row, cell in zip(rows, marked)]
        shape = f"T={t}" if scenario == "continual" else f"B={b}, T={t}"
        title = f"{model} · {benchmark}/{split} · {scenario} {shape} · {check}" + (f" ({items} items)" if items else "")
        keys = {"model": model, "benchmark": benchmark, "split": split, "scenario": scenario, "T": t, "B": b,
                "downstream": check, "items": items}
        blocks.append(Block(keys, title, [Group(check, ["Acc."])], table_rows))
    return blocks


def _accuracy(value: float | None) -> str:
    """Three decimals: 200 PIQA items move in steps of 0.005, which two decimals would hide."""
    return NOT_RUN if value is None else f"{value:.3f}"


def _params_text(low: int | None, high: int | None) -> str:
    """Thousands-separated count; "/" for no trainable parameters (ROME, MEMIT, GRACE in the paper)."""
    if low is None or high is None:
        return NOT_RUN
    if low == high:
        return "/" if low == 0 else f"{low:,}"
    return f"{low:,}–{high:,}"


# --- rendering ----------------------------------------------------------------------------------


def render(store: Path, table: str, fmt: str) -> str:
    """Render one of the paper's tables from the store as Markdown, LaTeX, CSV or HTML."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of: {', '.join(TABLES)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    store = Path(store)
    if not has_files(store, CELLS_DIR):
        return f"no results in {store}"
    with connect(store) as con:
        built = build_table(con, table)
    if built is None:
        return f"no {table} results in {store}"
    return _RENDERERS[fmt](built)


def _flat_header(block: Block) -> list[str]:
    return [f"{group.name} {column}" for group in block.groups for column in group.columns]


def _legend(table: Table) -> list[str]:
    texts = {cell.text for block in table.blocks for _, cells in block.rows for cell in cells}
    legend = []
    if NOT_RUN in texts:
        legend.append(f"{NOT_RUN}: not run (or metric not measured)")
    if FAILED in texts:
        legend.append(f"{FAILED}: latest attempt failed")
    return ["; ".join(legend)] if legend else []


def _markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    marks = {"best": "**{}**", "second": "<u>{}</u>", "": "{}"}
    out = [f"## {table.title}", ""]
    for block in table.blocks:
        if block.title:
            out += [f"### {block.title}", ""]
        header = ["Method"] + _flat_header(block)
        out += [line(header), "| --- |" + " ---: |" * (len(header) - 1)]
        out += [line([label] + [marks[cell.mark].format(cell.text) for cell in cells]) for label, cells in block.rows]
        out.append("")
    notes = table.notes + _legend(table)
    out += ["Notes:", ""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(out).rstrip()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  NOT_RUN: "--", FAILED: r"$\times$", "·": r"$\cdot$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex(table: Table) -> str:
    """booktabs tabulars (\\toprule, \\cmidrule), one per block, as in the paper's tables."""
    marks = {"best": r"\textbf{%s}", "second": r"\underline{%s}", "": "%s"}
    out = [f"% {table.title}"]
    for block in table.blocks:
        widths = [len(group.columns) for group in block.groups]
        out += ["\\begin{tabular}{l" + "".join("r" * width for width in widths) + "}", r"\toprule"]
        if block.title:
            out += [rf"\multicolumn{{{1 + sum(widths)}}}{{c}}{{{_tex(block.title)}}} \\", r"\midrule"]
        out.append(" & ".join([""] + [rf"\multicolumn{{{w}}}{{c}}{{{_tex(g.name)}}}"
                                       for g, w in zip(block.groups, widths)]) + r" \\")
        starts = [2 + sum(widths[:index]) for index in range(len(widths))]
        out.append("".join(rf"\cmidrule(lr){{{s}-{s + w - 1}}}" for s, w in zip(starts, widths)))
        out.append(" & ".join(["Method"] + [_tex(c) for g in block.groups for c in g.columns]) + r" \\")
        out.append(r"\midrule")
        out += [" & ".join([_tex(label)] + [marks[c.mark] % _tex(c.text) for c in cells]) + r" \\"
                for label, cells in block.rows]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    out += [rf"\par\noindent{{\footnotesize Note: {_tex(note)}}}" for note in table.notes + _legend(table)]
    return "\n".join(out).rstrip()


def _html(table: Table) -> str:
    marks = {"best": "<b>{}</b>", "second": "<u>{}</u>", "": "{}"}
    esc = html.escape
    out = [f"<h2>{esc(table.title)}</h2>"]
    for block in table.blocks:
        out.append("<table>")
        if block.title:
            out.append(f"<caption>{esc(block.title)}</caption>")
        out.append("<thead>")
        out.append('<tr><th rowspan="2">Method</th>'
                   + "".join(f'<th colspan="{len(g.columns)}">{esc(g.name)}</th>' for g in block.groups) + "</tr>")
        out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for g in block.groups for c in g.columns) + "</tr>")
        out.append("</thead>")
        out.append("<tbody>")
        for label, cells in block.rows:
            tds = "".join(f"<td>{marks[c.mark].format(esc(c.text))}</td>" for c in cells)
            out.append(f"<tr><td>{esc(label)}</td>{tds}</tr>")
        out += ["</tbody>", "</table>"]
    out += [f'<p class="note">Note: {esc(note)}</p>' for note in table.notes + _legend(table)]
    return "\n".join(out)


def _csv(table: Table) -> str:
    """One CSV for all blocks: the block's key columns, the method, then "<group> <metric>" columns.

    Notes follow as ``# `` comment lines (pandas: ``read_csv(..., comment="#")``).
    """
    key_names = list(table.blocks[0].keys)
    columns: list[str] = []
    for block in table.blocks:
        columns += [name for name in _flat_header(block) if name not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(key_names + ["method"] + columns)
    for block in table.blocks:
        for label, cells in block.rows:
            by_column = dict(zip(_flat_header(block), (cell.text for cell in cells)))
            keys = [block.keys[name] for name in key_names]
            writer.writerow(keys + [label] + [by_column.get(column, "") for column in columns])
    buffer.writelines(f"# {note}\n" for note in table.notes)
    return buffer.getvalue().rstrip("\n")


_RENDERERS: dict[str, Callable[[Table], str]] = {"md": _markdown, "latex": _latex, "csv": _csv, "html": _html}
