"""Per-run summaries: mean Rel/Gen/Loc/Por and their average, printed as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

METRIC_COLUMNS = (("rel", "Rel."), ("gen", "Gen."), ("loc", "Loc."), ("por", "Por."))


@dataclass(frozen=True)
class MetricSummary:
    means: dict[str, float | None]  # metric -> mean over cases (None where the benchmark lacks it)
    avg: float | None  # mean of the available metric means (the paper's "Avg.")
    n_cases: int


def summarize(rows: Iterable[Mapping[str, float | None]], metrics: Sequence[str] = ("rel", "gen", "loc", "por")) -> MetricSummary:
    rows = list(rows)
    means: dict[str, float | None] = {}
    for metric in metrics:
        values = [row[metric] for row in rows if row.get(metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    available = [value for value in means.values() if value is not None]
    return MetricSummary(means, sum(available) / len(available) if available else None, len(rows))


def format_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_table(title: str, labelled: Sequence[tuple[str, MetricSummary]], extra: Mapping[str, Sequence[str]] | None = None):
    """A rich Table with one row per (label, summary), Rel/Gen/Loc/Por/Avg columns and optional extras."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("Method")
    for _, header in METRIC_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("Avg.", justify="right")
    for name in (extra or {}):
        table.add_column(name, justify="right")
    for index, (label, summary) in enumerate(labelled):
        cells = [format_value(summary.means.get(metric)) for metric, _ in METRIC_COLUMNS]
        cells.append(format_value(summary.avg))
        cells.extend(values[index] for values in (extra or {}).values())
        table.add_row(label, *cells)
    return table
