"""Per-run summaries: the mean of every metric a run has and their average, printed as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from rich.table import Table

from kebench.core import metrics as metric_registry


@dataclass(frozen=True)
class MetricSummary:
    means: dict[str, float | None]  # metric -> mean over cases (None where the benchmark lacks it)
    avg: float | None  # mean of the available metric means that count in the average (the paper's "Avg.")
    n_cases: int


def summarize(rows: Iterable[Mapping[str, float | None]], metrics: Sequence[str] | None = None) -> MetricSummary:
    rows = list(rows)
    metrics = metric_registry.metric_names() if metrics is None else metrics
    means: dict[str, float | None] = {}
    for metric in metrics:
        values = [row[metric] for row in rows if row.get(metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    return MetricSummary(means, metric_registry.average(means), len(rows))


def format_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_table(title: str, labelled: Sequence[tuple[str, MetricSummary]], extra: Mapping[str, Sequence[str]] | None = None):
    """A rich Table with one row per (label, summary), a column per metric any row has, Avg. and extras."""
    present = {metric for _, summary in labelled for metric, value in summary.means.items() if value is not None}
    columns = metric_registry.ordered(present) or ["rel", "gen", "loc", "por"]
    table = Table(title=title)
    table.add_column("Method")
    for metric in columns:
        table.add_column(metric_registry.label(metric), justify="right")
    table.add_column("Avg.", justify="right")
    for name in (extra or {}):
        table.add_column(name, justify="right")
    for index, (label, summary) in enumerate(labelled):
        cells = [format_value(summary.means.get(metric)) for metric in columns]
        cells.append(format_value(summary.avg))
        cells.extend(values[index] for values in (extra or {}).values())
        table.add_row(label, *cells)
    return table
