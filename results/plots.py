"""The leaderboard's figures, drawn with matplotlib (Agg backend) and returned as PNG bytes.

- ``tradeoff``: Rel. against Loc. per method with 95% intervals (the editing-locality trade-off);
- ``metric_curves``: each metric against T (continual editing, paper Fig. 3; batched editing per B) or
  against the edits made so far (lifelong editing's checkpoints), 95% bootstrap bands;
- ``gate_weights``: BaFT's mean per-basis gate weight on edited, rephrased and unrelated inputs
  (paper Fig. 2), from the per-cell artifacts;
- ``protocol_gap``: Rel. and Gen. per method under teacher forcing beside the wild protocol (the
  overestimate "The Mirage of Model Editing" measured), with 95% intervals.
"""

from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display here or on a cluster head
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter  # noqa: E402

from kebench.core import metrics as metric_registry  # noqa: E402
from results.bootstrap import Estimate  # noqa: E402

_DPI = 100


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=_DPI)
    plt.close(figure)
    return buffer.getvalue()


def tradeoff(title: str, points: Sequence[tuple[str, Estimate, Estimate]]) -> bytes:
    """``points``: (method label, Rel estimate, Loc estimate)."""
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for label, rel, loc in points:
        axis.errorbar(loc.mean, rel.mean, xerr=[[loc.mean - loc.low], [loc.high - loc.mean]],
                      yerr=[[rel.mean - rel.low], [rel.high - rel.mean]], fmt="o", capsize=3, label=label)
    axis.set_xlabel("Locality (Loc.)")
    axis.set_ylabel("Reliability (Rel.)")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="lower left")
    return _png(figure)


def metric_curves(title: str, x_label: str, series: Mapping[str, Sequence[tuple[int, Mapping[str, Estimate]]]]) -> bytes:
    """``series[label]`` = [(x, {metric: estimate}), ...]; one panel per metric any series has."""
    present = {metric for points in series.values() for _, by_metric in points for metric in by_metric}
    metrics = [m for m in metric_registry.ordered(present)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, points in series.items():
            chosen = sorted((x, by_metric[metric]) for x, by_metric in points if metric in by_metric)
            if not chosen:
                continue
            xs = [x for x, _ in chosen]
            means = [e.mean for _, e in chosen]
            (line,) = axis.plot(xs, means, marker="o", label=label)
            axis.fill_between(xs, [e.low for _, e in chosen], [e.high for _, e in chosen], alpha=0.15,
                              color=line.get_color())
        axis.set_title(metric_registry.label(metric), fontsize=9)
        axis.set_xlabel(x_label)
        axis.set_ylim(-0.02, 1.02)
        ticks = sorted({x for points in series.values() for x, _ in points})
        if len(ticks) > 1:
            axis.set_xscale("log")
            # The measured x values as plain numbers (10, 50, 100, 200), not powers of ten a short range lacks.
            axis.set_xticks(ticks, [str(x) for x in ticks], fontsize=7)
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(textwrap.fill(title, 100), fontsize=9)
    return _png(figure)


def gate_weights(title: str, weights: Mapping[str, Sequence[float]]) -> bytes:
    """``weights[kind]`` = mean gate weight per basis for kind in edit / rephrase / unrelated."""
    names = {"edit": "Rel. (edited)", "rephrase": "Gen. (rephrased)", "unrelated": "Loc. (unrelated)"}
    kinds = [kind for kind in names if kind in weights]
    rank = max(len(weights[kind]) for kind in kinds)
    figure, axis = plt.subplots(figsize=(max(5.0, 0.45 * rank + 2), 3.4))
    width = 0.8 / len(kinds)
    for index, kind in enumerate(kinds):
        xs = [basis + (index - (len(kinds) - 1) / 2) * width for basis in range(len(weights[kind]))]
        axis.bar(xs, weights[kind], width=width, label=names[kind])
    axis.set_xlabel("basis k")
    axis.set_ylabel("mean gate weight w_k(h)")
    axis.set_xticks(range(rank))
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    axis.set_title(textwrap.fill(title, 60), fontsize=8)
    return _png(figure)


def sweep_objectives(title: str, params: Sequence[str], objectives: Sequence[str],
                     points: Sequence[tuple[Mapping[str, object], Mapping[str, float], bool]],
                     labels: Mapping[str, str] | None = None, log_x: "set[str] | None" = None) -> bytes:
    """A Ray Tune sweep: one panel per (objective, searched hyperparameter), a dot per trial, the Pareto
    front (or the best trial) as a filled star. ``points``: (hyperparameters, objective values, on front)."""
    labels = labels or {}
    log_x = log_x or set()
    rows, cols = len(objectives), len(params)
    figure, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.4 * rows + 0.6), squeeze=False)
    for r, objective in enumerate(objectives):
        for c, param in enumerate(params):
            axis = axes[r][c]
            values = [hp.get(param) for hp, _, _ in points]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric:
                xs = [float(v) for v in values]
            else:
                categories = sorted({str(v) for v in values})
                xs = [float(categories.index(str(v))) for v in values]
                axis.set_xticks(range(len(categories)))
                axis.set_xticklabels(categories, fontsize=7, rotation=20)
            for x, (_, scores, front) in zip(xs, points):
                if objective not in scores:
                    continue
                axis.plot(x, scores[objective], marker="*" if front else "o", markersize=11 if front else 5,
                          color="tab:red" if front else "tab:blue", alpha=0.9 if front else 0.6, linestyle="none")
            if numeric and param in log_x and min(xs) > 0:
                axis.set_xscale("log")
                axis.xaxis.set_major_locator(LogLocator(base=10, numticks=4))
                axis.xaxis.set_minor_formatter(NullFormatter())
            if r == rows - 1:
                axis.set_xlabel(param, fontsize=8)
            if c == 0:
                axis.set_ylabel(labels.get(objective, objective), fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    figure.suptitle(title + "  (★ = Pareto front / best)", fontsize=8)
    return _png(figure)


def sweep_front(title: str, objectives: Sequence[str],
                points: Sequence[tuple[Mapping[str, object], Mapping[str, float], bool]],
                labels: Mapping[str, str] | None = None) -> bytes:
    """Two objectives against each other, a dot per trial, the Pareto front joined by a step line."""
    labels = labels or {}
    x_name, y_name = objectives[0], objectives[1]
    figure, axis = plt.subplots(figsize=(4.8, 4.0))
    chosen = [(s[x_name], s[y_name], front) for _, s, front in points if x_name in s and y_name in s]
    axis.scatter([x for x, _, f in chosen if not f], [y for _, y, f in chosen if not f], s=22, alpha=0.6,
                 label="trial")
    front = sorted((x, y) for x, y, f in chosen if f)
    if front:
        axis.plot([x for x, _ in front], [y for _, y in front], marker="*", markersize=11, color="tab:red",
                  drawstyle="steps-post", label="Pareto front")
    axis.set_xlabel(labels.get(x_name, x_name))
    axis.set_ylabel(labels.get(y_name, y_name))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
    return _png(figure)


def protocol_gap(title: str, rows: Sequence[tuple[str, Mapping[str, Estimate], Mapping[str, Estimate]]],
                 protocols: tuple[str, str]) -> bytes:
    """``rows``: (method label, {metric: estimate} under ``protocols[0]``, the same under ``protocols[1]``); one
    panel per metric (Rel., Gen.), a pair of bars per method."""
    metrics = [m for m in ("rel", "gen") if any(m in first or m in second for _, first, second in rows)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 0.9 * len(rows) + 2) * len(metrics) / 1.4, 3.6),
                                squeeze=False)
    width = 0.38
    for axis, metric in zip(axes[0], metrics):
        for offset, (index, protocol) in zip((-width / 2, width / 2), enumerate(protocols)):
            xs, means, errors = [], [], [[], []]
            for position, (_, *by_protocol) in enumerate(rows):
                estimate = by_protocol[index].get(metric)
                if estimate is None:
                    continue
                xs.append(position + offset)
                means.append(estimate.mean)
                errors[0].append(estimate.mean - estimate.low)
                errors[1].append(estimate.high - estimate.mean)
            axis.bar(xs, means, width, yerr=errors, capsize=2, label=protocol, alpha=0.85 if index == 0 else 1.0,
                     hatch="//" if index == 0 else None)
        axis.set_xticks(range(len(rows)), [label for label, _, _ in rows], rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_title(metric_registry.label(metric), fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(textwrap.fill(title, 100), fontsize=9)
    return _png(figure)
