"""The metric registry: a metric is registered once and every layer reads it from here.

The store validates case rows against it, tables and the leaderboard take column order and labels
from it, sweeps take their objectives from it.  A benchmark that scores something new registers
the metric next to its loader (``register_metric("es", "ES", ...)``); nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from kebench.core.errors import KebenchError


@dataclass(frozen=True)
class Metric:
    name: str  # the value of the store's ``metric`` column
    label: str  # the column header ("Rel.")
    description: str = ""
    higher_is_better: bool = True
    #: counts in a row's Avg. (the mean of the metric means the row has)
    in_average: bool = True
    #: the protocol the metric is scored under when it has its own (ConvSent's ES/DD: "convsent");
    #: None for metrics scored under whatever protocol the editor's cases are scored under
    protocol: str | None = None
    order: int = 100  # column order in tables (the paper's Rel, Gen, Loc, Por come first)


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, label: str, *, description: str = "", higher_is_better: bool = True,
                    in_average: bool = True, protocol: str | None = None, order: int = 100) -> Metric:
    """Register a metric once; registering the identical metric again (a re-imported module) is a no-op."""
    metric = Metric(name, label, description, higher_is_better, in_average, protocol, order)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != metric:
        raise ValueError(f"metric {name!r} registered twice with different definitions")
    _REGISTRY[name] = metric
    return metric


def get_metric(name: str) -> Metric:
    if name not in _REGISTRY:
        raise KebenchError(f"unknown metric '{name}'; known: {', '.join(metric_names())}")
    return _REGISTRY[name]


def is_metric(name: str) -> bool:
    return name in _REGISTRY


def metric_names() -> list[str]:
    """Registered metric names in table order."""
    return [m.name for m in sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))]


def ordered(names: "set[str] | list[str] | tuple[str, ...]") -> list[str]:
    """``names`` in table order; names that are not registered (an old store's rows) go last, sorted."""
    known = [name for name in metric_names() if name in names]
    return known + sorted(set(names) - set(known))


def counts_in_average(name: str) -> bool:
    """Whether a metric enters Avg. (a metric that is not registered, from an old store, does)."""
    return name not in _REGISTRY or _REGISTRY[name].in_average


def average(means: Mapping[str, float | None]) -> float | None:
    """Avg.: the mean of the metric means present that count in the average; None when there are none.
    The one rule every table, summary, sweep and the leaderboard use."""
    counted = [value for name, value in means.items() if value is not None and counts_in_average(name)]
    return sum(counted) / len(counted) if counted else None


def label(name: str) -> str:
    return _REGISTRY[name].label if name in _REGISTRY else name


# The paper's four (EasyEdit's teacher-forced definitions, benchmarks/metrics.py).
REL = register_metric("rel", "Rel.", description="reliability: target tokens predicted on the edit prompt", order=10)
GEN = register_metric("gen", "Gen.", description="generality: target tokens predicted on rephrased prompts", order=20)
LOC = register_metric("loc", "Loc.", description="locality: unrelated outputs unchanged by the edit", order=30)
POR = register_metric("por", "Por.", description="portability: answers that follow from the edit", order=40)

# Token F1 beside the wild protocol's exact match (benchmarks/wild.py): partial credit that shows how close
# a wrong answer came; outside Avg., which stays the mean of the paper's four.
REL_F1 = register_metric("rel_f1", "Rel. F1", description="reliability: SQuAD token F1 of the generated answer",
                         in_average=False, protocol="wild", order=11)
GEN_F1 = register_metric("gen_f1", "Gen. F1", description="generality: SQuAD token F1 of the generated answer",
                         in_average=False, protocol="wild", order=21)
POR_F1 = register_metric("por_f1", "Por. F1", description="portability: SQuAD token F1 of the generated answer",
                         in_average=False, protocol="wild", order=41)
