"""The BaFT paper's tables, each one registered function over the DuckDB views (``results.views``).

``single`` (Table 1), ``continual`` (Table 2), ``batched`` (Tables 6-7), ``lifelong`` (each metric after
each checkpoint of a never-restored stream, AlphaEdit's protocol), ``params`` (Table 3, with peak memory)
and ``downstream`` (Table 8: e.g. PIQA accuracy after a stream, beside the unedited model). A metric's value
is its mean over the case rows of the latest ok attempts of the cells that share a method label, taken per
seed and then averaged over the seeds; where a row has several seeds, its cells also carry the sample sd
(ddof 1) of the per-seed means (printed "0.71 ± 0.03").  Avg. is the mean of the metric means a row has, and
its sd the sd over seeds of the per-seed Avg.  Rows never pool different ``protocol`` values: a label
measured under several protocols gets one row per protocol.
"–" marks a (method, group) that was never run (or a metric it lacks), "×" one with a cell whose
latest attempt failed: a mean over the seeds that happened to succeed would look like a complete
result. The reference row ``unedited`` comes first and is never marked best.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import duckdb

from kebench.core import metrics as metric_registry
from kebench.core.scenarios import ScenarioKind, get_scenario_kind, is_scenario, scenario_kinds
from results.registry import FAILED, NOT_RUN, REFERENCE_LABEL, Block, Cell, Group, register_table, row_order
from results.views import records


@dataclass(frozen=True)
class _Spec:
    scenario: str
    block_keys: tuple[str, ...]
    group_keys: tuple[str, ...]
    default_metrics: tuple[str, ...]


def scenario_spec(kind: ScenarioKind) -> _Spec:
    """A scenario kind's metric table shape, from its declaration (``kebench.core.scenarios``)."""
    assert kind.table is not None
    return _Spec(kind.name, kind.table.block_keys, kind.table.group_keys, kind.table.metrics)

#: group keys that a case row has and a cell row does not: their column groups come from the scored rows, and
#: a failed cell (which has no rows) marks its label in every group of its block
CASE_KEYS = frozenset({"checkpoint"})

_MEANS_SQL = """
SELECT model, benchmark, split, "B", "T", checkpoint, label, protocol, metric, seed, avg(value) AS mean
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
       -- a batched cell's seconds_per_edit is per edit call of B cases: per edited case, as the other scenarios
       avg(seconds_per_edit / greatest(coalesce("B", 1), 1)) FILTER (WHERE status = 'ok') AS seconds_per_edit,
       min(trainable_params) FILTER (WHERE status = 'ok') AS params_min,
       max(trainable_params) FILTER (WHERE status = 'ok') AS params_max,
       max(paper_params) FILTER (WHERE status = 'ok') AS paper_params,
       max(peak_rss_mb) FILTER (WHERE status = 'ok') AS peak_rss_mb
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


def _key(row: dict[str, Any], names: tuple[str, ...]) -> tuple:
    return tuple(row[name] for name in names)


def _metric_blocks(con: duckdb.DuckDBPyConnection, spec: _Spec) -> list[Block]:
    params = {"scenario": spec.scenario}
    status = records(con, _STATUS_SQL, params)  # one row per (block, group, label): any cell failed?
    means = records(con, _MEANS_SQL, params)  # one row per (block, group, label, protocol, metric, seed)
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
    """One block: a row per (label, protocol), a column group per group key (benchmark, T or checkpoint)."""
    by_case = bool(CASE_KEYS & set(spec.group_keys))
    failed_labels = {row["label"] for row in status if row["failed"]}
    failed = {(_key(row, spec.group_keys), row["label"]) for row in status if row["failed"]} if not by_case else set()
    # (group, label, protocol) -> seed -> metric -> the mean over that seed's case rows
    per_seed: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    protocols: dict[str, set[str]] = {row["label"]: set() for row in status}
    for row in means:
        per_seed[(_key(row, spec.group_keys), row["label"], row["protocol"])][row["seed"]][row["metric"]] = row["mean"]
        protocols[row["label"]].add(row["protocol"])
    values = {key: SeedSummary.of(seeds) for key, seeds in per_seed.items()}
    row_keys = sorted(((label, protocol) for label, found in protocols.items() for protocol in sorted(found) or [None]),
                      key=lambda key: (*row_order(key[0]), key[1] or ""))
    block_metrics = _present_metrics(v.means for v in values.values()) or list(spec.default_metrics)

    groups: list[Group] = []
    row_cells: list[list[Cell]] = [[] for _ in row_keys]
    for group in sorted({_key(row, spec.group_keys) for row in (means if by_case else status)}):
        metrics = _present_metrics(v.means for (g, _, _), v in values.items() if g == group) or block_metrics
        texts = [_group_texts(values.get((group, label, protocol)),
                              label in failed_labels if by_case else (group, label) in failed, metrics)
                 for label, protocol in row_keys]
        ranked = _mark_best([t[-1].text for t in texts], [label == REFERENCE_LABEL for label, _ in row_keys])
        for cells, row_texts, avg in zip(row_cells, texts, ranked):
            cells += row_texts[:-1] + [Cell(avg.text, avg.mark, row_texts[-1].sd)]
        name = _group_name(dict(zip(spec.group_keys, group)), multi_split)
        groups.append(Group(name, [metric_registry.label(metric) for metric in metrics] + ["Avg."]))
    rows = [(_row_label(label, protocol, protocols[label]), cells)
            for (label, protocol), cells in zip(row_keys, row_cells)]
    return Block(keys, _block_title(keys, multi_split), groups, rows)


@dataclass(frozen=True)
class SeedSummary:
    """One table row's values in one column group: each metric's mean over seeds of its per-seed mean, the sd
    over seeds of those (metrics measured under fewer than two seeds have none), and the same for Avg."""

    means: dict[str, float]
    sds: dict[str, float]
    avg: float | None
    avg_sd: float | None

    @classmethod
    def of(cls, per_seed: dict[int, dict[str, float]]) -> "SeedSummary":
        metrics = {metric for values in per_seed.values() for metric in values}
        means, sds = {}, {}
        for metric in metrics:
            values = [by_metric[metric] for by_metric in per_seed.values() if metric in by_metric]
            means[metric] = sum(values) / len(values)
            if len(values) > 1:
                sds[metric] = statistics.stdev(values)
        averages = [a for a in (metric_registry.average(values) for values in per_seed.values()) if a is not None]
        return cls(means, sds, metric_registry.average(means),
                   statistics.stdev(averages) if len(averages) > 1 else None)


def _group_texts(found: SeedSummary | None, failed: bool, metrics: list[str]) -> list[Cell]:
    """One row's metric cells and Avg. (the mean of the metric means it has) in one column group."""
    if failed:
        return [Cell(FAILED)] * (len(metrics) + 1)
    if not found or not found.means:
        return [Cell(NOT_RUN)] * (len(metrics) + 1)
    cells = [Cell(_number(found.means.get(metric)), sd=_sd(found.sds.get(metric))) for metric in metrics]
    return cells + [Cell(_number(found.avg), sd=_sd(found.avg_sd))]


def _sd(value: float | None) -> str:
    return "" if value is None else f"{round(value, 2) + 0.0:.2f}"


def _present_metrics(metric_maps: Any) -> list[str]:
    """The registered metrics (in table order) that any of the given rows has."""
    seen: set[str] = set()
    for metric_map in metric_maps:
        seen.update(metric_map)
    return metric_registry.ordered(seen)


def _mark_best(texts: list[str], reference: list[bool] | None = None) -> list[Cell]:
    """Bold the best and underline the second-best Avg. (compared as printed, so ties share a mark);
    the reference row (unedited) is never ranked."""
    reference = reference or [False] * len(texts)
    ranked = sorted({float(t) for t, ref in zip(texts, reference) if _is_number(t) and not ref}, reverse=True)
    marks = {value: mark for value, mark in zip(ranked, ("best", "second"))}
    return [Cell(t, marks.get(float(t), "") if _is_number(t) and not ref else "") for t, ref in zip(texts, reference)]


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
    if "checkpoint" in keys:
        return f"{keys['checkpoint']} edits"
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
    stats = {(row["model"], row["label"]): row for row in records(con, _PARAMS_SQL)}
    if not stats:
        return []
    models = sorted({model for model, _ in stats})
    labels = sorted({label for _, label in stats}, key=row_order)
    rows = []
    for label in labels:
        cells: list[Cell] = []
        for model in models:
            row = stats.get((model, label))
            if row is None:
                cells += [Cell(NOT_RUN)] * 3
            elif not row["ok"]:
                cells += [Cell(FAILED)] * 3
            else:
                params = _params_text(row["params_min"], row["params_max"])
                if row["paper_params"] is not None:  # BaFT: the paper's Table 3 counts differently (methods/baft.py)
                    params += f" (Table 3 convention: {row['paper_params']:,})"
                memory = NOT_RUN if row["peak_rss_mb"] is None else f"{row['peak_rss_mb'] / 1024:.2f}"
                cells += [Cell(params), Cell(_number(row["seconds_per_edit"])), Cell(memory)]
        rows.append((label, cells))
    groups = [Group(model, ["# Params.", "Time (sec./edit)", "Peak mem. (GB)"]) for model in models]
    return [Block({}, "", groups, rows)]


def _downstream_blocks(con: duckdb.DuckDBPyConnection) -> list[Block]:
    """Table 8's content: per (model, benchmark, stream shape, check), the unedited model's score ("Base")
    and each method label's score after its streams (mean over streams, seeds), best in bold."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in records(con, _DOWNSTREAM_SQL):
        grouped[(row["model"], row["benchmark"], row["split"], row["scenario"], row["T"], row["B"],
                 row["downstream"])].append(row)
    blocks = []
    for key in sorted(grouped):
        model, benchmark, split, scenario, t, b, check = key
        rows = sorted(grouped[key], key=lambda row: row_order(row["label"]))
        base = [row["unedited"] for row in rows if row["unedited"] is not None]
        items = max((row["items"] for row in rows if row["items"] is not None), default=None)
        texts = [FAILED if row["failed"] else _accuracy(row["edited"]) for row in rows]
        marked = _mark_best(texts, [row["label"] == REFERENCE_LABEL for row in rows])
        table_rows = [("Base (unedited)", [Cell(_accuracy(sum(base) / len(base)) if base else NOT_RUN)])]
        table_rows += [(row["label"], [cell]) for row, cell in zip(rows, marked)]
        sets = get_scenario_kind(scenario).sets if is_scenario(scenario) else ("B", "T")
        shape = ", ".join(f"{name}={value}" for name, value in (("B", b), ("T", t)) if name in sets)
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


def register_scenario_table(kind: ScenarioKind) -> None:
    """Register the metric table a declared scenario kind asks for (``ScenarioKind.table``), named after it."""
    if kind.table is None:
        return
    spec = scenario_spec(kind)

    def build(con: duckdb.DuckDBPyConnection) -> list[Block]:
        return _metric_blocks(con, spec)

    register_table(kind.name, kind.table.title, scenario=kind.name)(build)


# single (Table 1), continual (Table 2), batched (Tables 6-7): one table per kind declared so far; the
# catalog (``results.tables``) registers those of kinds declared later (plug-ins).
for _kind in scenario_kinds():
    register_scenario_table(_kind)


@register_table("params", "Trainable parameters, editing time and peak memory")
def params_table(con: duckdb.DuckDBPyConnection) -> list[Block]:
    return _params_blocks(con)


@register_table("downstream", "Downstream task accuracy after a stream of edits (unedited model: Base)")
def downstream_table(con: duckdb.DuckDBPyConnection) -> list[Block]:
    return _downstream_blocks(con)
