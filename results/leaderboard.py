"""``kebench leaderboard``: every method of a store ranked, with paired bootstrap intervals, the paper's
tables, figures, a per-case drill-down and the provenance of every number.

Writes ``leaderboard.md`` (figures as files under ``plots/``) and one self-contained
``leaderboard.html`` (CSS, data and figures inline: it opens from disk with no network).

Per (model, benchmark, split, scenario, T, B, checkpoint, protocol) group the reference row ``unedited``
comes first, then the methods ranked by Avg.; each metric carries a 95% paired bootstrap interval
(``results.bootstrap``) and a method whose Avg. interval overlaps the leader's is marked as tied.

Faults (issue 31): unreadable store files are left out and named (``results.views.connect_readable``, as
``kebench table`` does); every failed cell is listed with its reason, also when no cell of its group
succeeded; an ok cell whose artifact is missing or unreadable is named, and its drill-down rows say so
instead of showing empty prompts; text from the store is escaped in the Markdown as in the HTML.

A scenario scored at checkpoints (lifelong) is ranked at each cell's last checkpoint, never averaged over
checkpoints: its groups hold the rows of that checkpoint only (so cells of N = 100 and N = 200 rank in
groups of their own), and its curve figure draws every checkpoint.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import numpy as np

from kebench.core import metrics as metric_registry
from kebench.core.scenarios import get_scenario_kind, is_scenario, scenario_kinds
from kebench.core.errors import KebenchError
from results import plots
from kebench.core.numerics import hardware_label
from results.bootstrap import AVG, Estimate, bootstrap_group, check_resamples, hierarchical_draws
from results.registry import REFERENCE_LABEL
from results.render import RENDERERS, md_text
from results.tables import build_table, table_names
from results.store import CELLS_DIR, artifact_path, has_files, load_artifact, scan_store
from results.views import connect, records

GROUP_KEYS = ("model", "benchmark", "split", "scenario", "T", "B", "checkpoint", "protocol")
DRILLDOWN_LIMIT = 12  # failing cases shown per method and group

#: the rows of ok cells: a cell's last checkpoint only (NULL: scored once), or with ``$every_checkpoint`` every
#: checkpoint of the cells scored at checkpoints
_VALUES_SQL = """
SELECT c.model, c.benchmark, c.split, c.scenario, c."T", c."B", k.checkpoint, k.protocol, c.label, c.method,
       c.seed, k.case_id, k.metric, k.value
FROM cases_latest k JOIN cells_latest c USING (cell_id, attempt)
WHERE c.status = 'ok'
QUALIFY CASE WHEN $every_checkpoint THEN k.checkpoint IS NOT NULL
             ELSE k.checkpoint IS NOT DISTINCT FROM max(k.checkpoint) OVER (PARTITION BY k.cell_id) END
"""
_FAILED_SQL = """
SELECT model, benchmark, split, scenario, "T", "B", label, any_value(error) AS error
FROM cells_latest WHERE status = 'failed' GROUP BY ALL
"""
_FAILED_CELLS_SQL = """
SELECT model, benchmark, split, scenario, "T", "B", label, coalesce(error, 'failed') AS error, count(*) AS cells
FROM cells_latest WHERE status = 'failed' GROUP BY ALL ORDER BY ALL
"""
_HARDWARE_SQL = """
SELECT DISTINCT model, benchmark, split, scenario, "T", "B", hardware FROM cells_latest WHERE status = 'ok'
"""
_OK_CELLS_SQL = """
SELECT cell_id, attempt, model, benchmark, split, scenario, "T", "B", label, method
FROM cells_latest WHERE status = 'ok'
"""


@dataclass
class Entry:
    label: str
    method: str
    estimates: dict[str, Estimate]
    cases: int
    status: str = ""  # "leader" | "tied" | "" ; reference rows are never ranked

    @property
    def reference(self) -> bool:
        return self.label == REFERENCE_LABEL


@dataclass
class Group:
    key: dict[str, Any]
    entries: list[Entry]
    failed: dict[str, str] = field(default_factory=dict)  # label -> error of a failed cell
    per_case: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # label -> case -> metric -> value
    seeds: tuple[int, ...] = (0,)  # the seeds the group's values are taken over
    cases: int = 0  # the cases of the group (its case list)
    #: the hardware labels (``kebench.core.numerics.hardware_label``) of the group's ok cells: more than one
    #: means its numbers were not all computed on one floating-point path
    hardware: tuple[str, ...] = ()

    @property
    def noise(self) -> str:
        """Which noise the group's intervals (and so its ties) measure."""
        seeds = ", ".join(str(seed) for seed in self.seeds)
        if len(self.seeds) > 1:
            return (f"{len(self.seeds)} seeds ({seeds}) × {self.cases} cases: mean over seeds ± sd over seeds; "
                    "intervals resample the seeds, then the cases within each (hierarchical)")
        return (f"1 seed ({seeds}) × {self.cases} cases: intervals resample the cases only (no seed spread "
                "measured; kebench noise measures seed, thread and ISA spreads)")

    @property
    def title(self) -> str:
        k = self.key
        at = "" if k.get("checkpoint") is None else f" after {k['checkpoint']} edits"
        return (f"{k['model']} · {k['benchmark']}/{k['split']} · {_shape(k['scenario'], k['T'], k['B'])}{at} · "
                f"{k['protocol']}")

    @property
    def metrics(self) -> list[str]:
        present = {m for e in self.entries for m in e.estimates if m != AVG}
        return metric_registry.ordered(present)


# --------------------------------------------------------------------------- numbers

def leaderboard_groups(con: duckdb.DuckDBPyConnection, resamples: int = 1000, seed: int = 0,
                       every_checkpoint: bool = False) -> list[Group]:
    """Every group's entries with bootstrap intervals, reference first, then ranked by Avg.  A cell scored at
    checkpoints enters at its last one; ``every_checkpoint``: only such cells, at each of their checkpoints (one
    group per checkpoint, for the curves)."""
    # group -> label -> (seed, case) -> metric -> values (a label's cells of one seed pool their cases)
    values: dict[tuple, dict[str, dict[tuple[int, str], dict[str, list[float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    methods: dict[str, str] = {}
    for row in records(con, _VALUES_SQL, {"every_checkpoint": every_checkpoint}):
        key = tuple(row[name] for name in GROUP_KEYS)
        values[key][row["label"]][(row["seed"], row["case_id"])][row["metric"]].append(row["value"])
        methods[row["label"]] = row["method"]
    hardware: dict[tuple, set[str]] = defaultdict(set)  # cell keys -> hardware labels of its ok cells
    for row in records(con, _HARDWARE_SQL):
        hardware[tuple(row[name] for name in _CELL_KEYS)].add(hardware_label(_json_or_none(row["hardware"])))
    failed: dict[tuple, dict[str, str]] = defaultdict(dict)  # a cell row has no checkpoint: keyed without it
    for row in records(con, _FAILED_SQL):
        failed[tuple(row[name] for name in _CELL_KEYS)][row["label"]] = row["error"] or "failed"

    groups = []
    for key in sorted(values, key=_group_order):
        by_label = values[key]
        seeds = sorted({s for per_case in by_label.values() for s, _ in per_case})
        cases = sorted({case for per_case in by_label.values() for _, case in per_case})
        check_resamples(resamples, len(cases) * len(seeds))
        metrics = sorted({m for per_case in by_label.values() for scores in per_case.values() for m in scores})
        draws = hierarchical_draws(len(seeds), len(cases), resamples, seed)
        laid_out = {label: {m: np.array([[_mean(per_case.get((s, c), {}).get(m)) for c in cases] for s in seeds])
                            for m in metrics}
                    for label, per_case in by_label.items()}
        estimates = bootstrap_group(laid_out, draws)
        entries = [Entry(label, methods[label], estimates[label], len({c for _, c in by_label[label]}))
                   for label in by_label]
        _rank(entries)
        per_case = {label: _over_seeds(pc) for label, pc in by_label.items()}
        group_key = dict(zip(GROUP_KEYS, key))
        cell_key = tuple(group_key[name] for name in _CELL_KEYS)
        groups.append(Group(group_key, entries, failed.get(cell_key, {}), per_case, tuple(seeds), len(cases),
                            tuple(sorted(hardware.get(cell_key, ())))))
    return groups


def _mean(values: list[float] | None) -> float:
    return float(np.mean(values)) if values else np.nan


def _over_seeds(per_case: dict[tuple[int, str], dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """case -> metric -> the mean over the seeds (and pooled cells) that scored it, for the drill-down."""
    pooled: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, case), scores in per_case.items():
        for metric, values in scores.items():
            pooled[case][metric].append(float(np.mean(values)))
    return {case: {m: float(np.mean(v)) for m, v in scores.items()} for case, scores in pooled.items()}


def _json_or_none(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


#: the group keys a cell row has (a failed cell has no case rows, so no checkpoint)
_CELL_KEYS = tuple(name for name in GROUP_KEYS if name not in ("checkpoint", "protocol"))


def _shape(scenario: str, t: int, b: int) -> str:
    """A group's scenario as its declaration words it (``ScenarioKind.shape``); an undeclared kind by name."""
    if not is_scenario(scenario):
        return str(scenario)
    kind = get_scenario_kind(scenario)
    return kind.format(kind.shape, t, b)


def _group_order(key: tuple) -> tuple:
    model, benchmark, split, scenario, t, b, checkpoint, protocol = key
    order = get_scenario_kind(scenario).order if is_scenario(scenario) else 1000
    return (str(model), str(benchmark), str(split), order, str(scenario), b, t, checkpoint or 0, str(protocol))


def _rank(entries: list[Entry]) -> None:
    """Reference first; the rest by Avg. (descending, then label); leader and ties by interval overlap."""
    def avg(entry: Entry) -> float:
        estimate = entry.estimates.get(AVG)
        return estimate.mean if estimate is not None else float("-inf")

    entries.sort(key=lambda e: (not e.reference, -avg(e), e.label.lower()))
    ranked = [e for e in entries if not e.reference and AVG in e.estimates]
    if not ranked:
        return
    leader = ranked[0]
    leader.status = "leader"
    for entry in ranked[1:]:
        if entry.estimates[AVG].overlaps(leader.estimates[AVG]):
            entry.status = "tied"


# --------------------------------------------------------------------------- figures

@dataclass(frozen=True)
class Figure:
    name: str  # file name under plots/
    title: str
    png: bytes


CellKey = tuple  # (model, benchmark, split, scenario, T, B, label): a group key without the protocol, and the label


@dataclass(frozen=True)
class ArtifactProblem:
    """An ok cell whose artifact (drill-down details, gate weights) cannot be had."""

    key: CellKey
    path: Path
    why: str  # "missing" or "unreadable (...)"

    def describe(self) -> str:
        return f"artifact {self.path} is {self.why}"


def _artifacts(store: Path, con: duckdb.DuckDBPyConnection) -> tuple[list[tuple[CellKey, dict[str, Any]]], list[ArtifactProblem]]:
    """Every ok cell's artifact (drill-down details, BaFT's gate weights), read once for both uses, and the
    cells whose artifact is missing or unreadable (every ok cell is stored with one)."""
    out, problems = [], []
    for cell in records(con, _OK_CELLS_SQL):
        key = (cell["model"], cell["benchmark"], cell["split"], cell["scenario"], cell["T"], cell["B"], cell["label"])
        artifact, why = load_artifact(store, cell)
        if artifact is not None:
            out.append((key, artifact))
        elif why is not None:
            problems.append(ArtifactProblem(key, artifact_path(store, cell), why))
    return out, problems


def _figures(groups: list[Group], artifacts: list[tuple[CellKey, dict[str, Any]]],
             checkpoint_groups: Sequence[Group] = ()) -> list[Figure]:
    """Rel. against Loc. per group; each metric against a kind's ``curve`` parameter (a group key: T, or the
    checkpoint of every group in ``checkpoint_groups``); BaFT's gate weights."""
    figures: list[Figure] = []
    for group in groups:
        points = [(e.label, e.estimates["rel"], e.estimates["loc"]) for e in group.entries
                  if "rel" in e.estimates and "loc" in e.estimates]
        if points:
            name = _slug("tradeoff", {k: v for k, v in group.key.items() if v is not None})  # no checkpoint: as before
            figures.append(Figure(name, f"Rel. vs Loc.: {group.title}", plots.tradeoff(group.title, points)))
    for kind in (kind for kind in scenario_kinds() if kind.curve):
        scenario, x_name = kind.name, kind.curve
        curves: dict[tuple, dict[str, list[tuple[int, dict[str, Estimate]]]]] = defaultdict(lambda: defaultdict(list))
        for group in (checkpoint_groups if x_name == "checkpoint" else groups):
            k = group.key
            if k["scenario"] != scenario:
                continue
            for entry in group.entries:
                by_metric = {m: e for m, e in entry.estimates.items() if m != AVG}
                curves[(k["model"], k["benchmark"], k["split"], k["B"], k["protocol"])][entry.label].append((k[x_name], by_metric))
        for (model, benchmark, split, b, protocol), series in sorted(curves.items(), key=lambda item: str(item[0])):
            if max(len(points) for points in series.values()) < 2:
                continue  # a single T is a table row, not a curve
            shape = kind.format(kind.curve_title, 0, b)
            x_label = "edits made so far" if x_name == "checkpoint" else x_name
            title = f"{model} · {benchmark}/{split} · {shape} · {protocol}: metrics against {x_label}"
            figures.append(Figure(_slug(f"{scenario}-curves", {"m": model, "b": benchmark, "s": split, "B": b, "p": protocol}),
                                  title, plots.metric_curves(title, x_label, series)))
    figures += _gate_figures(artifacts)
    return figures


def _gate_figures(artifacts: list[tuple[CellKey, dict[str, Any]]]) -> list[Figure]:
    """BaFT's gate weights (paper Fig. 2): averaged over layers, streams and the cells of a (model,
    benchmark, scenario shape, label)."""
    pooled: dict[tuple, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for key, artifact in artifacts:
        for stream in artifact.get("streams", []):
            gates = stream.get("gate_weights")
            if not gates:
                continue
            for kind in ("edit", "rephrase", "unrelated"):
                if gates.get(kind):
                    pooled[key][kind].append(np.mean(np.asarray(gates[kind], dtype=np.float64), axis=0).tolist())
    figures = []
    for key in sorted(pooled, key=lambda k: tuple(str(part) for part in k)):
        model, benchmark, split, scenario, t, b, label = key
        weights = {kind: np.mean(np.asarray(rows), axis=0).tolist() for kind, rows in pooled[key].items()}
        shape = _shape(scenario, t, b)
        title = f"{label} gate weights per basis · {model} · {benchmark}/{split} · {shape}"
        figures.append(Figure(_slug("gates", {"m": model, "b": benchmark, "s": split, "x": scenario, "T": t, "B": b, "l": label}),
                              title, plots.gate_weights(title, weights)))
    return figures


def _slug(prefix: str, key: dict[str, Any]) -> str:
    text = "-".join(str(value) for value in key.values())
    safe = "".join(ch if ch.isalnum() or ch in "._=" else "-" for ch in text)
    return f"{prefix}-{safe}.png"


# --------------------------------------------------------------------------- drill-down and provenance

@dataclass(frozen=True)
class Failure:
    case_id: str
    prompt: str
    target: str
    scores: dict[str, float]
    details: dict[str, str]
    #: why the prompt, target and argmax are not known ("" when they are): the artifact that held them
    unknown: str = ""


def _drilldown(groups: list[Group], artifacts: list[tuple[CellKey, dict[str, Any]]],
               problems: list[ArtifactProblem] = ()) -> dict[tuple[str, str], list[Failure]]:
    """(group title, label) -> the cases the method fails (Rel < 1 or Loc < 1), with the model's argmax."""
    cases_of: dict[CellKey, dict[str, Any]] = defaultdict(dict)  # -> case id -> prompt, target, details
    for key, artifact in artifacts:
        cases_of[key].update(artifact.get("cases", {}))
    lost: dict[CellKey, list[ArtifactProblem]] = defaultdict(list)
    for problem in problems:
        lost[problem.key].append(problem)
    out: dict[tuple[str, str], list[Failure]] = {}
    for group in groups:
        k = group.key
        for entry in group.entries:
            if entry.reference:
                continue
            key = (k["model"], k["benchmark"], k["split"], k["scenario"], k["T"], k["B"], entry.label)
            cases = cases_of.get(key, {})
            missing = "; ".join(problem.describe() for problem in lost.get(key, []))
            failing = []
            for case_id, scores in sorted(group.per_case.get(entry.label, {}).items()):
                if scores.get("rel", 1.0) < 1.0 or scores.get("loc", 1.0) < 1.0:
                    info = cases.get(case_id)
                    if info is None:  # say why instead of showing '' → target ''
                        failing.append(Failure(case_id, "", "", scores, {},
                                               missing or "no artifact of this cell describes the case"))
                        continue
                    details = (info.get("details") or {}).get(k["protocol"], {})
                    failing.append(Failure(case_id, info.get("prompt", ""), info.get("target", ""), scores, details))
            if failing:
                out[(group.title, entry.label)] = failing
    return out


_PROVENANCE_SQL = """
SELECT model, label, any_value(code_version) AS code_version, string_agg(DISTINCT device, ', ') AS device,
       string_agg(DISTINCT dtype, ', ') AS dtype, count(*) AS cells, any_value(packages) AS packages
FROM cells_latest GROUP BY ALL ORDER BY model, label
"""
_DATA_SQL = "SELECT DISTINCT benchmark, split, data_sha256 FROM cells_latest ORDER BY ALL"
_NOTES_SQL = "SELECT DISTINCT provenance FROM cells_latest WHERE coalesce(provenance, '') <> '' ORDER BY 1"
_MACHINES_SQL = """
SELECT hardware, model, label, count(*) AS cells FROM cells_latest WHERE status = 'ok' GROUP BY ALL ORDER BY ALL
"""


@dataclass(frozen=True)
class Machine:
    """One hardware configuration (a floating-point path) and the ok cells computed on it."""

    label: str
    record: dict[str, Any] | None
    cells: int
    methods: tuple[str, ...]  # "model · label"


def _machines(con: duckdb.DuckDBPyConnection) -> list[Machine]:
    """The store's ok cells grouped by hardware (``kebench.core.numerics.hardware_label``); a cell stored before
    the record existed is "not recorded"."""
    grouped: dict[str, dict[str, Any]] = {}
    for row in records(con, _MACHINES_SQL):
        record = _json_or_none(row["hardware"])
        entry = grouped.setdefault(hardware_label(record), {"record": record, "cells": 0, "methods": set()})
        entry["cells"] += row["cells"]
        entry["methods"].add(f"{row['model']} · {row['label']}")
    return [Machine(label, entry["record"], entry["cells"], tuple(sorted(entry["methods"])))
            for label, entry in sorted(grouped.items())]


def _provenance(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    return {
        "cells": records(con, _PROVENANCE_SQL),
        "data": records(con, _DATA_SQL),
        "notes": [row["provenance"] for row in records(con, _NOTES_SQL)],
        "machines": _machines(con),
        "mixed": [],  # titles of the groups and tables whose cells ran on more than one machine (write_leaderboard)
    }


def _mixed(groups: Sequence[Group], tables: Sequence[tuple[str, Any]]) -> list[str]:
    """The leaderboard groups and paper tables whose ok cells were computed on more than one hardware configuration."""
    return ([f"leaderboard group {group.title}" for group in groups if len(group.hardware) > 1]
            + [f"table {built.title}" for _, built in tables if len(built.hardware) > 1])


@dataclass
class Omissions:
    """What the page could not show, and why: it is written anyway, and says so."""

    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # store files left out
    artifacts: list[ArtifactProblem] = field(default_factory=list)
    #: every failed cell (latest attempt): model, benchmark, split, scenario, T, B, label, error, cells
    failed: list[dict[str, Any]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per thing left out, for stderr."""
        lines = [f"skipped unreadable {path} ({reason})" for path, reason in self.unreadable]
        lines += [f"{problem.describe()}: its drill-down details and figures are left out" for problem in self.artifacts]
        return lines


def _failed_title(row: dict[str, Any]) -> str:
    return (f"{row['model']} · {row['benchmark']}/{row['split']} · {_shape(row['scenario'], row['T'], row['B'])} · "
            f"{row['label']}")


# --------------------------------------------------------------------------- writing

def write_leaderboard(store: Path, out: Path, resamples: int = 1000, seed: int = 0,
                      on_warning: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard.html`` and ``plots/*.png`` under ``out``; returns the two pages.

    ``on_warning`` gets one line per thing left out (an unreadable store file, a missing artifact); the
    pages name them too."""
    store, out = Path(store), Path(out)
    if not has_files(store, CELLS_DIR):
        raise KebenchError(f"no results in {store}: run a grid into it first")
    check_resamples(resamples)
    omitted = Omissions(unreadable=scan_store(store).unreadable)
    skip = [path for path, _ in omitted.unreadable]
    if not any(path for path in (store / CELLS_DIR).rglob("*.parquet") if path not in skip):
        first, reason = omitted.unreadable[0]
        raise KebenchError(f"no readable results in {store}: every cells file is unreadable, e.g. {first} ({reason})")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plots").mkdir(exist_ok=True)
    except OSError as exc:
        raise KebenchError(f"--out {out}: cannot create: {exc.strerror or exc}") from None
    with connect(store, skip) as con:
        groups = leaderboard_groups(con, resamples, seed)
        tables = [(name, built) for name in table_names() if (built := build_table(con, name)) is not None]
        artifacts, omitted.artifacts = _artifacts(store, con)
        figures = _figures(groups, artifacts, leaderboard_groups(con, resamples, seed, every_checkpoint=True))
        failures = _drilldown(groups, artifacts, omitted.artifacts)
        provenance = _provenance(con)
        provenance["mixed"] = _mixed(groups, tables)
        omitted.failed = records(con, _FAILED_CELLS_SQL)
    for line in omitted.warnings():
        if on_warning is not None:
            on_warning(line)
    for figure in figures:
        (out / "plots" / figure.name).write_bytes(figure.png)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"store": str(store), "generated": stamp, "resamples": resamples, "seed": seed}
    markdown = out / "leaderboard.md"
    markdown.write_text(_markdown(meta, groups, tables, figures, failures, provenance, omitted), encoding="utf-8")
    page = out / "leaderboard.html"
    page.write_text(_html(meta, groups, tables, figures, failures, provenance, omitted), encoding="utf-8")
    return [markdown, page]


def _fmt(estimate: Estimate | None) -> str:
    if estimate is None:
        return "–"
    return f"{estimate.mean:.2f}{_sd_text(estimate)} [{estimate.low:.2f}, {estimate.high:.2f}]"


def _sd_text(estimate: Estimate) -> str:
    return "" if estimate.sd is None else f" ± {estimate.sd:.2f}"


def _intro(meta: dict[str, Any]) -> str:
    return (f"Store `{meta['store']}`, generated {meta['generated']}. Each value: mean over cases, and where a "
            "group has several seeds the mean over seeds of the per-seed means ± their sd over seeds "
            f"[95% paired percentile bootstrap interval, {meta['resamples']} resamples, seed {meta['seed']}: "
            "with one seed the cases are resampled; with several, the seeds and then the cases within each "
            "(hierarchical); the same resampled seeds and cases for every method of a group]. `unedited` is the "
            "reference (no edit; Loc = 1.00 by definition) and is not ranked; a method whose Avg. interval "
            "overlaps the leader's is tied with it: within the noise the group's line names (cases, or seeds "
            "and cases). Numeric noise (ISA level, thread count) is not in these intervals: `kebench noise` "
            "measures it, and every cell's hardware is in the provenance section.")


def _group_notes(group: Group) -> list[str]:
    """The group's noise and, where its cells ran on more than one floating-point path, a warning."""
    notes = [f"Noise: {group.noise}."]
    if len(group.hardware) > 1:
        notes.append(f"Warning: this group mixes {len(group.hardware)} hardware configurations "
                     f"({'; '.join(group.hardware)}): its numbers are not comparable bit for bit.")
    return notes


def _markdown(meta, groups: list[Group], tables, figures: list[Figure], failures, provenance,
              omitted: Omissions | None = None) -> str:
    omitted = omitted or Omissions()
    out = ["# kebench leaderboard", "", md_text(_intro(meta)), ""]
    out += _markdown_left_out(omitted)
    if not groups:
        out += ["No cell of this store has results; the failed cells and their reasons are listed below.", ""]
    for group in groups:
        metrics = group.metrics
        out += [f"## {md_text(group.title)}", ""]
        out += [md_text(note) for note in _group_notes(group)] + [""]
        header = ["Rank", "Method"] + [metric_registry.label(m) for m in metrics] + ["Avg.", "Cases", ""]
        out += ["| " + " | ".join(header) + " |", "| ---: | --- |" + " ---: |" * (len(metrics) + 2) + " --- |"]
        rank = 0
        for entry in group.entries:
            rank_text = "ref." if entry.reference else str(rank := rank + 1)
            cells = [_fmt(entry.estimates.get(m)) for m in metrics + [AVG]]
            label = f"**{md_text(entry.label)}**" if entry.status == "leader" else md_text(entry.label)
            out.append("| " + " | ".join([rank_text, label, *cells, str(entry.cases), entry.status]) + " |")
        for label, error in sorted(group.failed.items()):
            out.append(f"| × | {md_text(label)} |" + " × |" * (len(metrics) + 1)
                       + f" – | failed: {_md_cell(error)} |")
        out.append("")
    out += ["# The paper's tables", ""]
    for _, built in tables:
        out += [RENDERERS["md"](built), ""]
    if figures:
        out += ["# Figures", ""]
        out += [f"![{_md_cell(figure.title)}](plots/{figure.name})\n" for figure in figures]
    out += _markdown_failed_cells(omitted.failed)
    out += _markdown_drilldown(failures)
    out += _markdown_provenance(provenance)
    return "\n".join(out).rstrip() + "\n"


def _md_cell(text: str) -> str:
    """Store text inside a Markdown table cell or image title: escaped, one line, no column breaks."""
    return md_text(" ".join(str(text).split())).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


ARTIFACTS_SHOWN = 20  # missing artifacts named on the page (all of them go to stderr)


def _markdown_left_out(omitted: Omissions) -> list[str]:
    if not omitted.unreadable and not omitted.artifacts:
        return []
    out = ["## Left out of this page", ""]
    out += [f"- unreadable store file `{path}` ({md_text(reason)}): its rows are not shown"
            for path, reason in omitted.unreadable]
    out += [f"- {md_text(problem.describe())}: drill-down details and figures of "
            f"{md_text(problem.key[-1])} on {md_text(problem.key[0])} · {md_text(problem.key[1])}/{md_text(problem.key[2])} "
            "are left out" for problem in omitted.artifacts[:ARTIFACTS_SHOWN]]
    if len(omitted.artifacts) > ARTIFACTS_SHOWN:
        out.append(f"- … and {len(omitted.artifacts) - ARTIFACTS_SHOWN} more missing or unreadable artifacts "
                   "(kebench leaderboard names every one on stderr)")
    return out + [""]


def _markdown_failed_cells(failed: list[dict[str, Any]]) -> list[str]:
    if not failed:
        return []
    out = ["# Failed cells (latest attempt)", "", "| Cell | Seeds | Reason |", "| --- | ---: | --- |"]
    out += [f"| {_md_cell(_failed_title(row))} | {row['cells']} | {_md_cell(row['error'])} |" for row in failed]
    return out + [""]


def _markdown_drilldown(failures) -> list[str]:
    if not failures:
        return []
    out = ["# Failed cases (Rel. < 1 or Loc. < 1)", ""]
    for (title, label), cases in failures.items():
        out += [f"## {md_text(label)} · {md_text(title)} ({len(cases)} cases)", ""]
        for failure in cases[:DRILLDOWN_LIMIT]:
            scores = ", ".join(f"{metric_registry.label(m)} {v:.2f}" for m, v in failure.scores.items())
            if failure.unknown:
                out.append(md_text(f"- `{failure.case_id}` ({scores}): prompt, target and argmax unknown: {failure.unknown}"))
                continue
            out.append(md_text(f"- `{failure.case_id}` ({scores}): {failure.prompt!r} → target {failure.target!r}; "
                               f"model's argmax: {failure.details.get('rel_output', '?')!r}"
                               + (f"; locality {failure.details['loc_prompt']!r}: {failure.details.get('loc_output')!r} "
                                  f"(unedited {failure.details.get('loc_unedited')!r})" if "loc_prompt" in failure.details else "")))
        if len(cases) > DRILLDOWN_LIMIT:
            out.append(f"- … and {len(cases) - DRILLDOWN_LIMIT} more (leaderboard.html lists all)")
        out.append("")
    return out


def _markdown_provenance(provenance) -> list[str]:
    out = ["# Provenance", "", "## Hardware", "",
           "The floating-point path every ok cell was computed on; cells on different lines are not comparable bit "
           "for bit (the full record of each is below).", "",
           "| Hardware | Cells | Methods |", "| --- | ---: | --- |"]
    out += [f"| {_md_cell(m.label)} | {m.cells} | {_md_cell(', '.join(m.methods))} |" for m in provenance["machines"]]
    warnings = [f"- Warning: the {md_text(title)} mixes hardware configurations" for title in provenance["mixed"]]
    out += ([""] + warnings if warnings else [])
    out += ["", "<details><summary>Hardware records</summary>", ""]
    out += [f"- {md_text(m.label)}: `{md_text(json.dumps(m.record, sort_keys=True))}`" for m in provenance["machines"]]
    out += ["", "</details>", "", "## Cells", ""]
    out += ["| Model | Method | Cells | Code | Device | Dtype |", "| --- | --- | ---: | --- | --- | --- |"]
    out += [f"| {_md_cell(r['model'])} | {_md_cell(r['label'])} | {r['cells']} | {_md_cell(r['code_version'])} | "
            f"{_md_cell(r['device'] or '–')} | {_md_cell(r['dtype'] or '–')} |" for r in provenance["cells"]]
    out += ["", "Data files (sha256 of the files each split reads):", ""]
    out += [f"- {md_text(r['benchmark'])}/{md_text(r['split'])}: `{md_text(r['data_sha256'])}`" for r in provenance["data"]]
    out += ["", "Notes recorded with the results (statistics corpora, substituted splits, hyperparameter files):", ""]
    out += [f"- {md_text(note)}" for note in provenance["notes"]]
    packages = {r["packages"] for r in provenance["cells"] if r["packages"]}
    out += ["", "Packages: " + md_text("; ".join(sorted(_packages_text(p) for p in packages)))]
    return out


def _packages_text(packages_json: str) -> str:
    try:
        return ", ".join(f"{k} {v}" for k, v in sorted(json.loads(packages_json).items()))
    except ValueError:
        return packages_json


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}h3{font-size:1rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.88rem}
th,td{border-bottom:1px solid #d0d7de;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child,td.method{text-align:left}
tr.reference td{color:#57606a;font-style:italic}tr.leader td{background:#dafbe1}tr.tied td{background:#f6f8fa}
td.ci small{color:#57606a}.status{font-size:.8rem;color:#57606a}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2rem 0}
img{max-width:100%;border:1px solid #d0d7de;margin:.5rem 0}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#57606a}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}code{background:#f6f8fa;padding:0 .2rem}
td.text{text-align:left;white-space:normal;max-width:28rem}.note{font-size:.85rem;color:#57606a}
"""


def _html(meta, groups: list[Group], tables, figures: list[Figure], failures, provenance,
          omitted: Omissions | None = None) -> str:
    omitted = omitted or Omissions()
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>kebench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>kebench leaderboard</h1>", f"<p>{esc(_intro(meta)).replace('`', '')}</p>"]
    out.append('<nav><ul>' + "".join(f'<li><a href="#group-{i}">{esc(g.title)}</a></li>' for i, g in enumerate(groups))
               + '<li><a href="#tables">The paper\'s tables</a></li><li><a href="#figures">Figures</a></li>'
                 '<li><a href="#failed-cells">Failed cells</a></li><li><a href="#failures">Failed cases</a></li>'
                 '<li><a href="#provenance">Provenance</a></li></ul></nav>')
    if omitted.unreadable or omitted.artifacts:
        out.append('<section id="left-out"><h2>Left out of this page</h2><ul>')
        out += [f"<li>unreadable store file <code>{esc(str(path))}</code> ({esc(reason)}): its rows are not shown</li>"
                for path, reason in omitted.unreadable]
        out += [f"<li>{esc(problem.describe())}: drill-down details and figures of {esc(str(problem.key[-1]))} on "
                f"{esc(str(problem.key[0]))} · {esc(str(problem.key[1]))}/{esc(str(problem.key[2]))} are left out</li>"
                for problem in omitted.artifacts[:ARTIFACTS_SHOWN]]
        if len(omitted.artifacts) > ARTIFACTS_SHOWN:
            out.append(f"<li>… and {len(omitted.artifacts) - ARTIFACTS_SHOWN} more missing or unreadable artifacts "
                       "(kebench leaderboard names every one on stderr)</li>")
        out.append("</ul></section>")
    if not groups:
        out.append("<p>No cell of this store has results; the failed cells and their reasons are listed below.</p>")
    for index, group in enumerate(groups):
        metrics = group.metrics
        out.append(f'<section class="group" id="group-{index}"><h2>{esc(group.title)}</h2>')
        out += [f'<p class="note">{esc(note)}</p>' for note in _group_notes(group)]
        out.append('<table class="leaderboard" data-group="' + esc(group.title) + '"><thead><tr><th>Rank</th><th>Method</th>'
                   + "".join(f"<th>{esc(metric_registry.label(m))}</th>" for m in metrics)
                   + "<th>Avg.</th><th>Cases</th><th></th></tr></thead><tbody>")
        rank = 0
        for entry in group.entries:
            rank_text = "ref." if entry.reference else str(rank := rank + 1)
            css = "reference" if entry.reference else entry.status
            cells = "".join(_ci_cell(metric, entry.estimates.get(metric)) for metric in metrics + [AVG])
            out.append(f'<tr class="ranked {css}" data-label="{esc(entry.label)}" data-rank="{rank_text}">'
                       f'<td>{rank_text}</td><td class="method">{esc(entry.label)}</td>{cells}'
                       f'<td>{entry.cases}</td><td class="status">{esc(entry.status)}</td></tr>')
        for label, error in sorted(group.failed.items()):
            out.append(f'<tr class="failed" data-label="{esc(label)}"><td>×</td><td class="method">{esc(label)}</td>'
                       + "<td>×</td>" * (len(metrics) + 1) + f'<td>–</td><td class="status">failed: {esc(error)}</td></tr>')
        out.append("</tbody></table></section>")
    out.append('<section id="tables"><h1>The paper\'s tables</h1>')
    out += [RENDERERS["html"](built) for _, built in tables]
    out.append('</section><section id="figures"><h1>Figures</h1>')
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        out.append(f'<figure><img alt="{esc(figure.title)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{esc(figure.title)}</figcaption></figure>")
    out.append('</section><section id="failed-cells"><h1>Failed cells (latest attempt)</h1>')
    if omitted.failed:
        out.append("<table class=\"failed-cells\"><thead><tr><th>Cell</th><th>Seeds</th><th>Reason</th></tr></thead><tbody>")
        out += [f'<tr><td class="text">{esc(_failed_title(row))}</td><td>{row["cells"]}</td>'
                f'<td class="text">{esc(str(row["error"]))}</td></tr>' for row in omitted.failed]
        out.append("</tbody></table>")
    else:
        out.append("<p>None.</p>")
    out.append('</section><section id="failures"><h1>Failed cases (Rel. &lt; 1 or Loc. &lt; 1)</h1>')
    for (title, label), cases in failures.items():
        out.append(f"<details><summary>{esc(label)} · {esc(title)} ({len(cases)} cases)</summary>"
                   '<table class="failures"><thead><tr><th>Case</th><th>Scores</th><th>Prompt</th><th>Target</th>'
                   "<th>Model's argmax</th><th>Locality (edited / unedited argmax)</th></tr></thead><tbody>")
        for failure in cases:
            scores = ", ".join(f"{metric_registry.label(m)} {v:.2f}" for m, v in failure.scores.items())
            if failure.unknown:
                out.append(f"<tr><td>{esc(failure.case_id)}</td><td>{esc(scores)}</td>"
                           f"<td class=\"text\" colspan=\"4\">prompt, target and argmax unknown: {esc(failure.unknown)}</td></tr>")
                continue
            loc = ""
            if "loc_prompt" in failure.details:
                loc = (f"{esc(failure.details['loc_prompt'])} → <code>{esc(failure.details.get('loc_output', ''))}</code> / "
                       f"<code>{esc(failure.details.get('loc_unedited', ''))}</code>")
            out.append(f"<tr><td>{esc(failure.case_id)}</td><td>{esc(scores)}</td><td class=\"text\">{esc(failure.prompt)}</td>"
                       f"<td class=\"text\">{esc(failure.target)}</td>"
                       f"<td class=\"text\"><code>{esc(failure.details.get('rel_output', ''))}</code></td>"
                       f"<td class=\"text\">{loc}</td></tr>")
        out.append("</tbody></table></details>")
    out.append('</section><section id="provenance"><h1>Provenance</h1><h2>Hardware</h2>')
    out.append('<p class="note">The floating-point path every ok cell was computed on; cells on different rows are not '
               'comparable bit for bit.</p><table class="hardware"><thead><tr><th>Hardware</th><th>Cells</th>'
               '<th>Methods</th><th>Record</th></tr></thead><tbody>')
    out += [f'<tr><td class="text">{esc(m.label)}</td><td>{m.cells}</td><td class="text">{esc(", ".join(m.methods))}'
            f'</td><td class="text"><details><summary>JSON</summary><code>{esc(json.dumps(m.record, sort_keys=True))}'
            "</code></details></td></tr>" for m in provenance["machines"]]
    out.append("</tbody></table>")
    out += [f'<p class="note"><b>Warning:</b> the {esc(title)} mixes hardware configurations</p>'
            for title in provenance["mixed"]]
    out.append("<h2>Cells</h2>")
    out.append("<table><thead><tr><th>Model</th><th>Method</th><th>Cells</th><th>Code</th><th>Device</th><th>Dtype</th>"
               "</tr></thead><tbody>")
    out += [f"<tr><td>{esc(r['model'])}</td><td class=\"method\">{esc(r['label'])}</td><td>{r['cells']}</td>"
            f"<td>{esc(r['code_version'] or '')}</td><td>{esc(r['device'] or '–')}</td><td>{esc(r['dtype'] or '–')}</td></tr>"
            for r in provenance["cells"]]
    out.append("</tbody></table><h3>Data files</h3><ul>")
    out += [f"<li>{esc(r['benchmark'])}/{esc(r['split'])}: <code>{esc(r['data_sha256'])}</code></li>" for r in provenance["data"]]
    out.append("</ul><h3>Notes recorded with the results</h3><ul>")
    out += [f'<li class="note">{esc(note)}</li>' for note in provenance["notes"]]
    packages = sorted({_packages_text(r["packages"]) for r in provenance["cells"] if r["packages"]})
    out.append("</ul><p class=\"note\">Packages: " + esc("; ".join(packages)) + "</p></section></body></html>")
    return "\n".join(out)


def _ci_cell(metric: str, estimate: Estimate | None) -> str:
    if estimate is None:
        return f'<td class="ci" data-metric="{metric}">–</td>'
    sd = "" if estimate.sd is None else f' data-sd="{estimate.sd:.6f}"'
    return (f'<td class="ci" data-metric="{metric}" data-mean="{estimate.mean:.6f}" data-low="{estimate.low:.6f}" '
            f'data-high="{estimate.high:.6f}"{sd}>{estimate.mean:.2f}{_sd_text(estimate)} '
            f'<small>[{estimate.low:.2f}, {estimate.high:.2f}]</small></td>')
