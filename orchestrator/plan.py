"""What a grid will cost before it is launched: ``kebench plan --grid grids/paper.yaml``.

The grid is expanded with the grid code (``orchestrator.grid.expand``) and its cells are grouped by
*cell kind*: (model, method label, scenario kind).  For each kind the plan prints the cells, how many of
them the grid's store already holds (they cost 0: ``kebench grid`` resumes and skips them, with the same
rule as ``orchestrator.runner.select_cells``), the edits still to run, the seconds per edit, the
evaluation seconds per case, where those numbers come from, and the device-hours.  Below the table:
the total device-hours (GPU-hours when the grid's ``resources.num_gpus`` > 0, else CPU-core-hours) and
the wall time on N workers.

Cost model (kept simple on purpose):

- a cell edits its ``n`` cases whatever the scenario: single editing one by one (restoring after each),
  continual in streams of T edits, batched and lifelong in calls of B cases; and it scores each case once,
  except lifelong(N, B, checkpoints), which scores every case edited so far at each checkpoint: a stream of
  N scores ``sum(checkpoints)`` cases (N = 200 at 10, 50, 100, 200: 360 scorings for 200 edits).  So a cell
  costs ``n x s/edit + scorings x eval s/case`` (``Scenario.scorings``; scorings = n but for lifelong);
- ``s/edit`` is the edit alone, per case: the store's ``seconds_per_edit`` column (the mean seconds of
  one edit call, ``ScenarioResult.seconds_per_edit``) divided by the cell's ``B`` (a batched call edits B
  cases), or ``seconds_per_edit`` of a ``bench/edit_speed.py --json`` record (single editing);
- ``eval s/case`` is the rest of the cell's wall time per case scored: ``(finished_at - started_at)`` minus
  the edits, over the cell's scorings (n, or for a measured lifelong cell the (case, checkpoint) pairs its
  rows hold).  It holds scoring Rel/Gen/Loc/Por and, for the first cell a worker runs on a model,
  loading that model and its pre-edit outputs (so small measured grids overstate it a little).  An
  ``edit_speed.py`` record has no evaluation: its cells are priced at the edit alone, and the source
  column says "edit only";
- several measured cells pool as a ratio of sums (all their seconds over all their cases);
- nothing else is modelled: no Ray start-up, no per-worker model load beyond what the measured cells
  include, no speed-up from batching when a batched cell is priced from single-editing numbers, no
  downstream check (a lifelong cell with ``downstream:`` runs one per checkpoint) beyond what measured
  cells of the same kind include.

Where ``s/edit`` comes from, first match wins (the source column names it):

(a) the grid's own store: ok cells of the same model and method (same label first) and scenario kind;
(b) stores passed with ``--from-store DIR``: same model and method, the same scenario kind first;
(c) ``--edit-speed FILE``: records written by ``bench/edit_speed.py --json`` for the same model and
    method (the ``naive`` variants are skipped);
(d) extrapolation from another model measured for the same method (by (a)-(c), the same scenario kind
    first, then the closest size): its seconds (edit and evaluation) times the ratio of
    ``num_layers x hidden_size^2`` (``kebench.core.models.model_facts``), shown as
    "extrapolated from <model> x<factor>";
(e) nothing: "unknown"; those cells are left out of every total, and a warning line says so.

Measurements carry the device they ran on (the cell row's ``device``).  No CPU-to-GPU factor is
applied: a measurement from another device than the grid asks for (``resources.num_gpus`` > 0: a GPU)
is used as it is and the source column says "measured on cpu, planned for gpu".

Wall time on N workers (``--workers``, default 4: the GPU pool of ``cluster.yaml``, one cell per GPU):
the cells still to run, longest first, each onto the worker that frees up first (LPT scheduling), as the
runner's pool hands them out; the plan prints the makespan beside total/N and the longest cell.
"""

from __future__ import annotations

import csv
import functools
import heapq
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kebench.core.errors import KebenchError
from kebench.core.models import model_facts
from orchestrator.grid import expand, load_grid
from orchestrator.runner import select_cells
from results.store import CELLS_DIR, has_files, scan_store
from results.views import connect, records

#: cluster.yaml's fixed GPU pool (ray.worker.gpu: min_workers = max_workers = 4, one GPU each)
DEFAULT_WORKERS = 4
FORMATS = ("md", "csv", "json")
UNKNOWN = "unknown"

_OWN, _OTHER, _BENCH = 0, 1, 2


# --------------------------------------------------------------------------- measurements

@dataclass(frozen=True)
class Measurement:
    """Timings of one (model, method, label, scenario kind, device) pooled over a source's ok cells."""

    model: str
    method: str
    label: str
    kind: str
    device: str  # device class: cpu, gpu, mps, or what the row said
    origin: str  # "this store runs/x", "store runs/y", "edit_speed f.json"
    rank: int  # _OWN, _OTHER or _BENCH
    cells: int
    edits: int
    edit_seconds: float
    #: wall seconds beyond the edits and the cases they cover (None: no wall time known, edit only)
    eval_seconds: float | None
    eval_edits: int  # the case scorings ``eval_seconds`` covers (the name predates lifelong's several per case)


def device_class(label: str | None) -> str:
    """``cpu``, ``gpu`` (any CUDA device), ``mps``, or ``?`` for a label that names none of them."""
    text = (label or "").strip().lower()
    if text.startswith("cuda") or text.startswith("gpu"):
        return "gpu"
    if text.startswith("cpu"):
        return "cpu"
    if text.startswith("mps"):
        return "mps"
    return "?"


def store_measurements(store: Path, origin: str, rank: int) -> list[Measurement]:
    """Pooled timings of the ok cells (and Tune trials: timings are timings) in a result store."""
    store = Path(store)
    if not has_files(store, CELLS_DIR):
        return []
    # A cell scored at checkpoints (lifelong) scored a case once per checkpoint: its scorings are the (case,
    # checkpoint) pairs of its rows; any other cell scored its n cases once.
    sql = """
        SELECT c.model, c.method, c.label, c.scenario AS kind, c.device, c.n, c.B, c.seconds_per_edit,
               epoch(c.finished_at) - epoch(c.started_at) AS wall, coalesce(s.scored, c.n) AS scored
        FROM attempts_latest c
        LEFT JOIN (SELECT cell_id, attempt, count(DISTINCT case_id || '@' || checkpoint) AS scored
                   FROM cases_all WHERE checkpoint IS NOT NULL GROUP BY ALL) s USING (cell_id, attempt)
        WHERE c.status = 'ok' AND c.n > 0 AND c.seconds_per_edit IS NOT NULL
    """
    try:
        with connect(store) as con:
            rows = records(con, sql)
    except Exception as exc:  # noqa: BLE001 - duckdb raises several types for a damaged store
        raise KebenchError(f"store {store}: cannot read its cells ({' '.join(str(exc).split())[:160]})") from None
    pooled: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["model"], row["method"], row["label"], row["kind"], device_class(row["device"]))
        acc = pooled.setdefault(key, {"cells": 0, "edits": 0, "edit": 0.0, "eval": 0.0, "eval_edits": 0})
        n, b = int(row["n"]), max(int(row["B"] or 1), 1)
        edit = float(row["seconds_per_edit"]) * n / b  # seconds_per_edit is per edit call of B cases
        acc["cells"] += 1
        acc["edits"] += n
        acc["edit"] += edit
        wall = row["wall"]
        if wall is not None and wall > 0:
            acc["eval"] += max(0.0, float(wall) - edit)
            acc["eval_edits"] += int(row["scored"])
    return [Measurement(model, method, label, kind, device, origin, rank, acc["cells"], acc["edits"], acc["edit"],
                        acc["eval"] if acc["eval_edits"] else None, acc["eval_edits"])
            for (model, method, label, kind, device), acc in sorted(pooled.items())]


def edit_speed_measurements(path: Path) -> list[Measurement]:
    """Records of ``bench/edit_speed.py --json``: ``{model, method, scenario, seconds_per_edit, device}``
    (older files name the time ``median_s_per_edit``); ``naive`` variants are skipped."""
    path = Path(path)
    if not path.is_file():
        raise KebenchError(f"--edit-speed {path}: not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KebenchError(f"--edit-speed {path}: not a JSON file ({' '.join(str(exc).split())})") from None
    items = data if isinstance(data, list) else [data]
    found: list[Measurement] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise KebenchError(f"--edit-speed {path}: record {index} is not an object")
        if item.get("variant", "fast") != "fast":
            continue
        seconds = item.get("seconds_per_edit", item.get("median_s_per_edit"))
        if "model" not in item or "method" not in item or not isinstance(seconds, (int, float)) or seconds < 0:
            raise KebenchError(f"--edit-speed {path}: record {index} needs model, method and seconds_per_edit "
                               "(re-run bench/edit_speed.py --json)")
        method = str(item["method"])
        found.append(Measurement(str(item["model"]), method, method, str(item.get("scenario", "single")),
                                 device_class(item.get("device")), f"edit_speed {path}", _BENCH, 1,
                                 int(item.get("n", 1)) or 1, float(seconds) * (int(item.get("n", 1)) or 1), None, 0))
    return found


# --------------------------------------------------------------------------- estimates

@dataclass(frozen=True)
class Estimate:
    s_per_edit: float | None  # None: unknown
    eval_per_case: float | None
    source: str
    measured_on: tuple[str, ...] = ()  # device classes of the measurements used

    @property
    def known(self) -> bool:
        return self.s_per_edit is not None

    @property
    def per_case(self) -> float:
        return (self.s_per_edit or 0.0) + (self.eval_per_case or 0.0)


def _pool(found: Sequence[Measurement]) -> tuple[float, float | None]:
    edits = sum(m.edits for m in found)
    edit = sum(m.edit_seconds for m in found) / edits
    with_eval = [m for m in found if m.eval_seconds is not None]
    cases = sum(m.eval_edits for m in with_eval)
    return edit, (sum(m.eval_seconds or 0.0 for m in with_eval) / cases if cases else None)


@functools.lru_cache(maxsize=None)
def _size(model: str) -> float | None:
    try:
        facts = model_facts(model)
    except KebenchError:
        return None
    return None if facts is None else float(facts.num_layers * facts.hidden_size ** 2)


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return "0.00" if value == 0 else f"{value:.1g}"


def _describe(found: Sequence[Measurement], label: str, kind: str, planned: str) -> str:
    first = found[0]
    cells = sum(m.cells for m in found)
    what = f"{cells} cell{'s' if cells != 1 else ''}" if first.rank != _BENCH else "edit only"
    kinds = sorted({m.kind for m in found})
    on = "" if kinds == [kind] else f", {'/'.join(kinds)} editing"
    labels = sorted({m.label for m in found})
    named = "" if labels == [label] or first.rank == _BENCH else f", as {'/'.join(labels)}"
    text = f"{first.origin} ({what}{on}{named})"
    devices = sorted({m.device for m in found})
    if devices != [planned]:
        text += f"; measured on {'/'.join(devices)}, planned for {planned}"
    if first.rank != _BENCH and all(m.eval_seconds is None for m in found):
        text += "; edit only"
    return text


def estimate(model: str, method: str, label: str, kind: str, planned: str,
             measurements: Sequence[Measurement]) -> Estimate:
    """The seconds per edit (and evaluation per case) for one cell kind, by the rules in the module doc."""

    def pick(candidates: list[Measurement]) -> list[Measurement]:
        """One origin's measurements: the best-ranked origin, the planned device first."""
        if not candidates:
            return []
        best = min(candidates, key=lambda m: (m.rank, m.device != planned, m.origin))
        return [m for m in candidates if m.origin == best.origin and m.device == best.device]

    same_model = [m for m in measurements if m.model == model and m.method == method]
    tiers = [
        [m for m in same_model if m.rank == _OWN and m.label == label and m.kind == kind],
        [m for m in same_model if m.rank == _OWN and m.kind == kind],
        [m for m in same_model if m.rank == _OTHER and m.label == label and m.kind == kind],
        [m for m in same_model if m.rank == _OTHER and m.kind == kind],
        [m for m in same_model if m.rank == _OTHER],
        [m for m in same_model if m.rank == _OWN],
        [m for m in same_model if m.rank == _BENCH],
    ]
    for tier in tiers:
        found = pick(tier)
        if found:
            edit, evaluation = _pool(found)
            return Estimate(edit, evaluation, _describe(found, label, kind, planned), tuple(sorted({m.device for m in found})))

    target = _size(model)
    if target is not None:
        others: dict[str, list[Measurement]] = {}
        for m in measurements:
            if m.method == method and m.model != model and _size(m.model):
                others.setdefault(m.model, []).append(m)
        if others:
            def closeness(name: str) -> tuple[bool, float]:
                return (not any(m.kind == kind for m in others[name]), abs(math.log(target / _size(name))))

            base = min(sorted(others), key=closeness)
            inner = estimate(base, method, label, kind, planned, others[base])
            factor = target / (_size(base) or 1.0)
            return Estimate((inner.s_per_edit or 0.0) * factor,
                            None if inner.eval_per_case is None else inner.eval_per_case * factor,
                            f"extrapolated from {base} x{factor:.3g} (layers*hidden^2) of {inner.source}",
                            inner.measured_on)
    return Estimate(None, None, "no measurement of this method")


# --------------------------------------------------------------------------- scheduling

def lpt_makespan(durations: Iterable[float], workers: int) -> float:
    """Longest-processing-time-first onto ``workers`` machines: each job, longest first, goes to the
    machine that frees up first; the finishing time of the last machine."""
    if workers < 1:
        raise KebenchError(f"workers must be a positive integer, got {workers}")
    loads = [0.0] * workers
    heapq.heapify(loads)
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


# --------------------------------------------------------------------------- the plan

@dataclass
class PlanRow:
    model: str
    method: str
    label: str
    scenario: str
    cells: int
    stored: int
    edits: int  # edits still to run (the cases of the cells not stored)
    scorings: int  # case scorings still to run: = edits but for lifelong, which scores at every checkpoint
    seconds_per_edit: float | None
    eval_seconds_per_case: float | None
    device_hours: float | None
    source: str


@dataclass
class Plan:
    grid: str
    source: str
    store: str
    workers: int
    device: str  # gpu or cpu: what a cell asks for
    per_cell: float  # GPUs (or CPUs) a cell holds
    unit: str  # GPU-h or CPU-core-h
    rows: list[PlanRow] = field(default_factory=list)
    cells: int = 0
    stored: int = 0
    edits: int = 0
    scorings: int = 0
    priced_cells: int = 0
    device_hours: float = 0.0
    wall_hours: float = 0.0
    even_split_hours: float = 0.0
    longest_cell_hours: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [asdict(row) for row in self.rows]
        return data


def make_plan(grid: Any, cells: Sequence[Any], store: Path, workers: int = DEFAULT_WORKERS,
              from_stores: Sequence[Path] = (), edit_speed: Sequence[Path] = (),
              rerun_failed: bool = False) -> Plan:
    """The plan of ``cells`` (``expand(grid)``) against ``store`` and the other timing sources."""
    if workers < 1:
        raise KebenchError(f"--workers must be a positive integer, got {workers}")
    store = Path(store)
    if store.exists() and not store.is_dir():
        raise KebenchError(f"store {store} is a file, not a store directory")
    for other in from_stores:
        if not Path(other).is_dir():
            raise KebenchError(f"--from-store {other}: not a store directory")
    measurements = store_measurements(store, f"this store {store}", _OWN) if store.is_dir() else []
    for other in from_stores:
        measurements += store_measurements(Path(other), f"store {other}", _OTHER)
    for path in edit_speed:
        measurements += edit_speed_measurements(Path(path))

    todo = {cell.cell_id for cell in select_cells(list(cells), scan_store(store).usable() if store.is_dir() else {},
                                                   rerun_failed, False)}
    gpu = grid.resources.num_gpus > 0
    plan = Plan(grid.name, grid.source, str(store), workers, "gpu" if gpu else "cpu",
                grid.resources.num_gpus if gpu else grid.resources.num_cpus, "GPU-h" if gpu else "CPU-core-h")
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.label, cell.scenario.kind), []).append(cell)
    durations: list[float] = []
    other_devices: set[str] = set()
    unknown: dict[str, list[int]] = {}  # method label -> [cells, edits] left out
    first: dict[str, dict[str, int]] = {"model": {}, "label": {}, "kind": {}}
    for cell in cells:
        for axis, value in (("model", cell.model), ("label", cell.label), ("kind", cell.scenario.kind)):
            first[axis].setdefault(value, len(first[axis]))

    def order(key: tuple[str, str, str]) -> tuple[int, int, int]:  # per model, per method: its scenarios
        return first["model"][key[0]], first["label"][key[1]], first["kind"][key[2]]

    for (model, label, kind), members in sorted(groups.items(), key=lambda item: order(item[0])):
        method = members[0].method
        est = estimate(model, method, label, kind, plan.device, measurements)
        pending = [cell for cell in members if cell.cell_id in todo]
        edits = sum(cell.n for cell in pending)
        scorings = sum(cell.scenario.scorings(cell.n) for cell in pending)
        hours = None
        other_devices.update(device for device in est.measured_on if device != plan.device)
        if est.known:
            seconds = [cell_seconds(cell, est) for cell in pending]
            durations += seconds
            hours = sum(seconds) * plan.per_cell / 3600
            plan.device_hours += hours
            plan.priced_cells += len(pending)
        elif pending:
            left = unknown.setdefault(label if label == method else f"{label} ({method})", [0, 0])
            left[0] += len(pending)
            left[1] += edits
        plan.rows.append(PlanRow(model, method, label, kind, len(members), len(members) - len(pending), edits,
                                 scorings, est.s_per_edit, est.eval_per_case, hours, est.source))
        plan.cells += len(members)
        plan.stored += len(members) - len(pending)
        plan.edits += edits
        plan.scorings += scorings
    if durations:
        plan.wall_hours = lpt_makespan(durations, workers) / 3600
        plan.even_split_hours = sum(durations) / workers / 3600
        plan.longest_cell_hours = max(durations) / 3600
    if unknown:
        names = ", ".join(f"{name} ({count} cells, {edits:,} edits)" for name, (count, edits) in sorted(unknown.items()))
        plan.warnings.append(f"no timing known for {names}: \"{UNKNOWN}\", left out of every total; measure them "
                             "(bench/edit_speed.py --json FILE for --edit-speed, or a small grid into a store for "
                             "--from-store)")
    if other_devices:
        plan.warnings.append(f"some timings were measured on {'/'.join(sorted(other_devices))}, not on the {plan.device} "
                             "this grid asks for, and are used as they are: no speed-up factor is applied")
    return plan


def cell_seconds(cell: Any, est: Estimate) -> float:
    """One cell's seconds: its n edits, and its case scorings (lifelong: every checkpoint's cases)."""
    return cell.n * (est.s_per_edit or 0.0) + cell.scenario.scorings(cell.n) * (est.eval_per_case or 0.0)


# --------------------------------------------------------------------------- rendering

_HEADER = ("model", "method", "scenario", "cells", "stored", "edits", "scored", "s/edit", "eval s/case")


def _method_name(row: PlanRow) -> str:
    return row.label if row.label == row.method else f"{row.label} ({row.method})"


def _hours(value: float) -> str:
    if value >= 10:
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 0.1 else f"{value:.2f}"


def _duration(hours: float) -> str:
    """Wall time a person reads: seconds, minutes, hours or days."""
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:,.1f} days ({hours:,.0f} h)"


def render_plan(plan: Plan, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise KebenchError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(plan.to_dict(), indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "method", "label", "scenario", "cells", "stored", "edits", "seconds_per_edit",
                         "eval_seconds_per_case", plan.unit.replace("-h", "_hours").replace("-", "_"), "source",
                         "scorings"])
        for row in plan.rows:
            writer.writerow([row.model, row.method, row.label, row.scenario, row.cells, row.stored, row.edits,
                             "" if row.seconds_per_edit is None else f"{row.seconds_per_edit:.6g}",
                             "" if row.eval_seconds_per_case is None else f"{row.eval_seconds_per_case:.6g}",
                             "" if row.device_hours is None else f"{row.device_hours:.6g}", row.source, row.scorings])
        return out.getvalue().rstrip("\n")
    asks = f"{plan.per_cell:g} GPU" if plan.device == "gpu" else f"{plan.per_cell:g} CPU core"
    lines = [f"plan for grid {plan.grid} ({plan.source}): {plan.cells} cells, {plan.stored} already in {plan.store} "
             f"(resume skips them: cost 0); each cell holds {asks}{'s' if plan.per_cell != 1 else ''}",
             "s/edit: the edit alone, per case; scored: case scorings (= edits, but lifelong scores every edit so far "
             "at each checkpoint); eval s/case: the rest of a cell's wall time per scoring (scoring, and the model "
             "load of a worker's first cell)", "",
             "| " + " | ".join(_HEADER + (plan.unit, "source")) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in plan.rows:
        cells = [row.model, _method_name(row), row.scenario, str(row.cells), str(row.stored), f"{row.edits:,}",
                 f"{row.scorings:,}",
                 UNKNOWN if row.seconds_per_edit is None else _number(row.seconds_per_edit),
                 "–" if row.eval_seconds_per_case is None else _number(row.eval_seconds_per_case),
                 "–" if row.device_hours is None else _hours(row.device_hours), row.source]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
              f"to run: {plan.cells - plan.stored} of {plan.cells} cells ({plan.stored} stored), {plan.edits:,} edits, "
              f"{plan.scorings:,} case scorings; "
              f"priced: {plan.priced_cells} of those {plan.cells - plan.stored} cells",
              f"total: {_hours(plan.device_hours)} {plan.unit}",
              f"wall time on {plan.workers} worker{'s' if plan.workers != 1 else ''}, one cell each at a time, longest "
              f"first: {_duration(plan.wall_hours)}; total/{plan.workers}: {_duration(plan.even_split_hours)}; "
              f"longest cell: {_duration(plan.longest_cell_hours)}"]
    return "\n".join(lines)  # warnings are not part of the plan: plan_command prints them on stderr


def plan_command(args: Any) -> int:
    """``kebench plan``: expand the grid, price it, print the plan."""
    if args.fmt not in FORMATS:
        raise KebenchError(f"unknown format '{args.fmt}'; known: {', '.join(FORMATS)}")
    grid = load_grid(args.grid)
    if args.data_dir is None and grid.data_dir is not None and not Path(grid.data_dir).expanduser().is_dir():
        raise KebenchError(f"{grid.source}: data_dir: {grid.data_dir} is not a directory")
    cells = expand(grid, args.data_dir)
    plan = make_plan(grid, cells, args.store or Path(grid.store), args.workers, args.from_store, args.edit_speed,
                     rerun_failed=args.rerun_failed)
    print(render_plan(plan, args.fmt))
    for text in plan.warnings:  # stderr in every format, so ``kebench plan > plan.md`` holds the plan only
        print(f"kebench: warning: {text}", file=sys.stderr)
    return 0
