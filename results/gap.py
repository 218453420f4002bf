"""The ``protocols`` table: each method's metrics under teacher forcing beside the wild protocol, and the gap.

"The Mirage of Model Editing" (Yang et al., ACL 2025) measured how much teacher-forced scoring overstates
editing success; this table shows that overestimate for every method a store scored under both
(``protocols: [teacher_forced, wild]``).  One block per (model, benchmark, split, scenario shape) and
wild setting (``wild``, ``wild(context=chat)``); per metric the two means side by side and, for Rel.,
Gen., Por. and Avg., the gap teacher-forced minus wild.  Each Avg. is computed within its protocol
(``kebench.core.metrics.average``); nothing is ever averaged across protocols.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import duckdb

from kebench.core import metrics as metric_registry
from kebench.core.protocols import TEACHER_FORCED, WILD, base_name
from kebench.core.scenarios import get_scenario_kind, is_scenario
from results.registry import FAILED, NOT_RUN, Block, Cell, Group, register_table, row_order
from results.views import records

_MEANS_SQL = """
SELECT model, benchmark, split, scenario, "T", "B", label, protocol, metric, avg(value) AS mean
FROM cases_latest
WHERE cell_id IN (SELECT cell_id FROM cells_latest WHERE status = 'ok')
GROUP BY ALL
"""
_FAILED_SQL = """
SELECT DISTINCT model, benchmark, split, scenario, "T", "B", label FROM cells_latest WHERE status = 'failed'
"""
_BLOCK = ("model", "benchmark", "split", "scenario", "T", "B")
#: the metrics shown (in this order) and whether a gap column follows each (Loc. has no "overestimate")
_COLUMNS = (("rel", True), ("gen", True), ("loc", False), ("por", True))
AVG = "avg"


def _number(value: float | None) -> str:
    return NOT_RUN if value is None else f"{round(value, 2) + 0.0:.2f}"


def _gap(forced: float | None, wild: float | None) -> str:
    return NOT_RUN if forced is None or wild is None else f"{round(forced - wild, 2) + 0.0:+.2f}"


def _title(keys: dict[str, Any], wild: str) -> str:
    shape = keys["scenario"]
    if is_scenario(shape):
        kind = get_scenario_kind(shape)
        shape = kind.format(kind.shape, keys["T"], keys["B"])
    return f"{keys['model']} · {keys['benchmark']}/{keys['split']} · {shape} · {TEACHER_FORCED} vs {wild}"


def protocol_blocks(con: duckdb.DuckDBPyConnection) -> list[Block]:
    means: dict[tuple, dict[str, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in records(con, _MEANS_SQL):
        means[tuple(row[k] for k in _BLOCK)][row["protocol"]][row["label"]][row["metric"]] = row["mean"]
    failed = {tuple(row[k] for k in (*_BLOCK, "label")) for row in records(con, _FAILED_SQL)}
    blocks = []
    for key in sorted(means, key=lambda k: tuple(str(part) for part in k)):
        by_protocol = means[key]
        forced = by_protocol.get(TEACHER_FORCED)
        if forced is None:
            continue
        for wild_tag in sorted(tag for tag in by_protocol if base_name(tag) == WILD):
            wild = by_protocol[wild_tag]
            labels = sorted(set(forced) & set(wild), key=row_order)
            if not labels:
                continue
            present = {metric for label in labels for metric in (*forced[label], *wild[label])}
            columns = [(metric, gap) for metric, gap in _COLUMNS if metric in present] + [(AVG, True)]
            rows = []
            for label in labels:
                cells: list[Cell] = []
                broken = (*key, label) in failed
                for metric, with_gap in columns:
                    if broken:
                        cells += [Cell(FAILED)] * (3 if with_gap else 2)
                        continue
                    first, second = _value(forced[label], metric), _value(wild[label], metric)
                    cells += [Cell(_number(first)), Cell(_number(second))]
                    if with_gap:
                        cells.append(Cell(_gap(first, second)))
                rows.append((label, cells))
            groups = [Group("Avg." if metric == AVG else metric_registry.label(metric),
                            [TEACHER_FORCED, wild_tag] + (["gap"] if with_gap else []))
                      for metric, with_gap in columns]
            keys = dict(zip(_BLOCK, key)) | {"wild": wild_tag}
            blocks.append(Block(keys, _title(keys, wild_tag), groups, rows))
    return blocks


def _value(found: dict[str, float], metric: str) -> float | None:
    return metric_registry.average(found) if metric == AVG else found.get(metric)


@register_table("protocols", "Teacher-forced against wild scores per method (gap = teacher-forced − wild)")
def protocols_table(con: duckdb.DuckDBPyConnection) -> list[Block]:
    return protocol_blocks(con)
