"""Ray Tune trials in the result store: the ``sweep`` table, the Pareto front, and its plots.

``orchestrator/sweep.py`` writes every finished trial as a cell attempt with ``kind = 'tune'``, the
sweep's name and Tune's trial id; its provenance carries one note ``kebench-sweep {json}`` with what
the sweep optimised (objectives and their directions, constraints) and which hyperparameters it
searched, so the store alone says how to rank its trials.  The views (``results.views``) keep trials
out of the paper's tables: ``trials_latest`` / ``trial_cases`` are theirs.

``kebench table --store S --table sweep`` lists, per sweep and setup (model, benchmark, split, n,
scenario), the trials ranked: a multi-objective sweep by non-dominated sorting (the Pareto front is
layer 1, marked ★), then by the mean of the objectives; a constrained one feasible trials first by the
objective, then the infeasible ones by their violation; a single metric by that metric.  It writes a
PNG of each objective against each searched hyperparameter to ``<store>/plots/sweep-<name>.png`` (and,
with two objectives, the trade-off with the front to ``sweep-<name>-front.png``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb

from kebench.core import metrics as metric_registry
from results.registry import FAILED, NOT_RUN, Block, Cell, Group, register_table
from results.views import records

SWEEP_NOTE = "kebench-sweep "
FRONT_MARK = "★"

_TRIALS_SQL = """
SELECT cell_id, attempt, status, error, model, benchmark, split, n, "offset", scenario, "T", "B", method,
       seed, hparams, provenance, sweep, trial_id, started_at, finished_at
FROM trials_latest
WHERE ($sweep IS NULL OR sweep = $sweep)
ORDER BY sweep, finished_at, trial_id
"""
#: a trial scored at checkpoints (lifelong) counts at its last one, as the leaderboard ranks it
_MEANS_SQL = """
SELECT cell_id, metric, protocol, avg(value) AS mean
FROM (SELECT * FROM trial_cases
      QUALIFY checkpoint IS NOT DISTINCT FROM max(checkpoint) OVER (PARTITION BY cell_id))
GROUP BY ALL
"""


def sweep_note(info: Mapping[str, Any]) -> str:
    """The provenance note that says how a trial's sweep ranks trials (see the module docstring)."""
    return SWEEP_NOTE + json.dumps(dict(info), sort_keys=True, separators=(",", ":"))


def parse_sweep_note(provenance: str | None) -> dict[str, Any] | None:
    if not provenance or SWEEP_NOTE not in provenance:
        return None
    text = provenance[provenance.index(SWEEP_NOTE) + len(SWEEP_NOTE):]
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one (``modes``: max | min)."""
    better = False
    for x, y, mode in zip(a, b, modes):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_layers(points: Sequence[Sequence[float] | None], modes: Sequence[str]) -> list[int | None]:
    """Non-dominated sorting: 1 for the Pareto front, 2 for the front once it is removed, ...; None for a
    point without values (a failed trial)."""
    layers: list[int | None] = [None] * len(points)
    left = [i for i, point in enumerate(points) if point is not None]
    layer = 0
    while left:
        layer += 1
        front = [i for i in left if not any(dominates(points[j], points[i], modes) for j in left if j != i)]
        for i in front:
            layers[i] = layer
        left = [i for i in left if i not in front]
    return layers


def pareto_front(points: Sequence[Sequence[float] | None], modes: Sequence[str]) -> list[bool]:
    return [layer == 1 for layer in pareto_layers(points, modes)]


def satisfies(value: float | None, op: str, threshold: float) -> bool:
    if value is None:
        return False
    return value >= threshold if op == ">=" else value <= threshold


def violation(means: Mapping[str, float | None], constraints: Sequence[Sequence[Any]]) -> float:
    """How far a trial is from satisfying every constraint (0 when feasible; a missing value is 1)."""
    total = 0.0
    for metric, op, threshold in constraints:
        value = means.get(metric)
        if value is None:
            total += 1.0
        elif not satisfies(value, op, float(threshold)):
            total += abs(float(threshold) - value)
    return total


average = metric_registry.average


def objective_value(means: Mapping[str, float | None], name: str) -> float | None:
    """A trial's value of one objective; ``avg`` is the Avg. of the metrics of the sweep's protocol (a metric
    scored under a protocol of its own, ConvSent's ES/DD, is an objective of its own, never in that Avg.)."""
    if name != "avg":
        return means.get(name)
    return average({metric: value for metric, value in means.items() if not _own_protocol(metric)})


def _own_protocol(metric: str) -> str | None:
    return metric_registry.get_metric(metric).protocol if metric_registry.is_metric(metric) else None


def trial_records(con: duckdb.DuckDBPyConnection, sweep: str | None = None) -> list[dict[str, Any]]:
    """Every stored trial (latest attempt), with its sweep note (``info``), hyperparameters and metric means
    over its case rows of the sweep's protocol (teacher-forced unless the note says otherwise), plus the
    means of metrics scored under a protocol of their own (ConvSent's ES/DD) over their own rows."""
    trials = records(con, _TRIALS_SQL, {"sweep": sweep})
    by_protocol: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in records(con, _MEANS_SQL):
        by_protocol[row["cell_id"]][row["protocol"]][row["metric"]] = row["mean"]
    out = []
    for row in trials:
        row = dict(row)
        row["info"] = parse_sweep_note(row["provenance"]) or {}
        row["hparams"] = json.loads(row["hparams"]) if row["hparams"] else {}
        protocol = row["info"].get("protocol", "teacher_forced")
        row["means"] = _trial_means(by_protocol.get(row["cell_id"], {}), protocol) if row["status"] == "ok" else {}
        out.append(row)
    return out


def _trial_means(by_protocol: Mapping[str, Mapping[str, float]], protocol: str) -> dict[str, float]:
    """The means of ``protocol``'s rows, and of each metric that has a protocol of its own over that one's rows."""
    means = dict(by_protocol.get(protocol, {}))
    for own, values in by_protocol.items():
        if own != protocol:
            means.update((metric, value) for metric, value in values.items() if _own_protocol(metric) == own)
    return means


def rank(trials: list[dict[str, Any]], info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trials of one sweep in rank order, each with ``rank``, ``layer`` (Pareto layer, multi-objective),
    ``front`` and ``feasible`` added."""
    objectives = list(info.get("objectives") or ["avg"])
    modes = list(info.get("modes") or ["max"] * len(objectives))
    constraints = [tuple(c) for c in info.get("constraints") or []]
    points = []
    for trial in trials:
        values = [objective_value(trial["means"], name) for name in objectives]
        points.append(None if trial["status"] != "ok" or any(v is None for v in values) else values)
    layers = pareto_layers(points, modes)
    for trial, point, layer in zip(trials, points, layers):
        trial["objective_values"] = point
        trial["layer"] = layer
        trial["front"] = layer == 1 and len(objectives) > 1
        trial["feasible"] = point is not None and violation(trial["means"], constraints) == 0.0

    def sign(mode: str) -> float:
        return 1.0 if mode == "max" else -1.0

    def key(trial: dict[str, Any]) -> tuple:
        point = trial["objective_values"]
        if point is None:
            return (2, 0.0, 0.0, trial["trial_id"] or "")
        oriented = [sign(mode) * value for mode, value in zip(modes, point)]
        if len(objectives) > 1:
            return (0, trial["layer"], -sum(oriented) / len(oriented), trial["trial_id"] or "")
        if constraints and not trial["feasible"]:
            return (1, violation(trial["means"], constraints), -oriented[0], trial["trial_id"] or "")
        return (0, 0, -oriented[0], trial["trial_id"] or "")

    ordered = sorted(trials, key=key)
    for position, trial in enumerate(ordered, start=1):
        trial["rank"] = position
    if constraints and len(objectives) == 1:
        best = next((t for t in ordered if t["feasible"]), None)
        for trial in ordered:
            trial["front"] = trial is best
    elif len(objectives) == 1 and ordered and ordered[0]["objective_values"] is not None:
        ordered[0]["front"] = True
    return ordered


def sweep_groups(con: duckdb.DuckDBPyConnection, sweep: str | None = None) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Trials grouped by sweep, setup (model, method, benchmark, split, n, offset, scenario, T, B) and Tune
    experiment (its note's ``experiment``: a restarted sweep, or one resumed on other data, is a new one whose
    trials never rank with the old ones), ranked."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for trial in trial_records(con, sweep):
        key = (trial["sweep"], trial["model"], trial["method"], trial["benchmark"], trial["split"], trial["n"],
               trial["offset"], trial["scenario"], trial["T"], trial["B"], trial["info"].get("experiment"))
        grouped[key].append(trial)
    out = []
    def order(key: tuple) -> tuple:  # a sweep's experiments in the order they ran
        started = min((str(t["finished_at"]) for t in grouped[key]), default="")
        return (*("" if v is None else str(v) for v in key[:-1]), started)

    for key in sorted(grouped, key=order):
        trials = grouped[key]
        info = next((t["info"] for t in reversed(trials) if t["info"]), {})
        names = ("sweep", "model", "method", "benchmark", "split", "n", "offset", "scenario", "T", "B", "experiment")
        out.append(({**dict(zip(names, key)), "info": info}, rank(trials, info)))
    return out


def value_text(value: Any) -> str:
    """A hyperparameter value as the sweep tables print it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    return str(value)


def _number(value: float | None) -> str:
    return NOT_RUN if value is None else f"{round(value, 3) + 0.0:.3f}"


def _store_path(con: duckdb.DuckDBPyConnection) -> Path | None:
    try:
        row = con.execute("SELECT path FROM kebench_store").fetchone()
    except duckdb.Error:
        return None
    return Path(row[0]) if row and row[0] else None


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


def write_sweep_plots(store: Path, keys: Mapping[str, Any], trials: list[dict[str, Any]]) -> list[Path]:
    """Each objective against each searched hyperparameter (and, with two objectives, the trade-off)."""
    from results import plots  # matplotlib (a second to import): only a store with trials draws

    info = keys["info"]
    objectives = list(info.get("objectives") or ["avg"])
    searched = list(info.get("searched") or [])
    kinds = dict(info.get("kinds") or {})
    ok = [t for t in trials if t["objective_values"] is not None]
    if not ok or not searched:
        return []
    title = (f"sweep {keys['sweep']}: {keys['model']} {keys['method']} on {keys['benchmark']}/{keys['split']} "
             f"n={keys['n']}, {keys['scenario']} T={keys['T']} ({len(ok)} trials)")
    points = [({name: t["hparams"].get(name) for name in searched}, dict(zip(objectives, t["objective_values"])),
               bool(t["front"])) for t in ok]
    out_dir = Path(store) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{_slug(str(keys['sweep']))}"
    same_sweep_setups = keys.get("setups", 1)
    if same_sweep_setups > 1:
        stem += f"-{_slug(str(keys['benchmark']))}-{keys['split']}-n{keys['n']}-{keys['scenario']}-T{keys['T']}"
        if keys.get("experiment"):
            stem += f"-{_slug(str(keys['experiment']))}"
    labels = {name: ("Avg." if name == "avg" else metric_registry.label(name)) for name in objectives}
    paths = [out_dir / f"{stem}.png"]
    paths[0].write_bytes(plots.sweep_objectives(title, searched, objectives, points, labels,
                                                log_x={n for n, k in kinds.items() if k == "loguniform"}))
    if len(objectives) == 2:
        paths.append(out_dir / f"{stem}-front.png")
        paths[1].write_bytes(plots.sweep_front(title, objectives, points, labels))
    return paths


@register_table("sweep", "Ray Tune trials, ranked (★: Pareto front, or the best trial of a single objective)")
def sweep_table(con: duckdb.DuckDBPyConnection) -> list[Block]:
    groups = sweep_groups(con)
    store = _store_path(con)
    per_sweep: dict[str, int] = defaultdict(int)
    for keys, _ in groups:
        per_sweep[keys["sweep"]] += 1
    blocks = []
    for keys, trials in groups:
        keys["setups"] = per_sweep[keys["sweep"]]
        info = keys["info"]
        objectives = list(info.get("objectives") or ["avg"])
        constraints = [tuple(c) for c in info.get("constraints") or []]
        searched = list(info.get("searched") or sorted({k for t in trials for k in t["hparams"]}))
        present = metric_registry.ordered({m for t in trials for m in t["means"]})
        plot_paths: list[Path] = []
        if store is not None:
            try:
                plot_paths = write_sweep_plots(store, keys, trials)
            except OSError:  # a read-only store still renders its table
                plot_paths = []
        groups_ = [Group("hyperparameters", searched),
                   Group("scores", [metric_registry.label(m) for m in present] + ["Avg."]),
                   Group("", ["Pareto" if len(objectives) > 1 else "best", "status"])]
        rows = []
        for trial in trials:
            hp = [Cell(value_text(trial["hparams"].get(name, NOT_RUN))) for name in searched]
            if trial["status"] != "ok":
                scores = [Cell(FAILED)] * (len(present) + 1)
                status = "failed: " + " ".join(str(trial["error"] or "").split())[:60]
            else:
                scores = [Cell(_number(trial["means"].get(m)), "best" if m in objectives and trial["front"] else "")
                          for m in present]
                scores.append(Cell(_number(objective_value(trial["means"], "avg")), "best" if "avg" in objectives and trial["front"] else ""))
                status = "ok" if not constraints else ("feasible" if trial["feasible"] else "infeasible")
            mark = Cell(FRONT_MARK if trial["front"] else "", "best" if trial["front"] else "")
            rows.append((f"{trial['rank']}. {trial['trial_id']}", hp + scores + [mark, Cell(status)]))
        goal = (" vs ".join(objectives) if len(objectives) > 1 else
                f"max {objectives[0]}" + "".join(f" s.t. {m} {op} {t:g}" for m, op, t in constraints))
        title = (f"sweep {keys['sweep']} · {keys['model']} {keys['method']} · {keys['benchmark']}/{keys['split']} "
                 f"n={keys['n']} · {keys['scenario']} T={keys['T']} · {info.get('search', '?')}: {goal} · "
                 f"{len(trials)} trials" + (f" · experiment {keys['experiment']}" if keys.get("experiment") else ""))
        if plot_paths:
            title += " · plot: " + ", ".join(str(p) for p in plot_paths)
        block_keys = {name: keys[name] for name in ("sweep", "model", "method", "benchmark", "split", "n", "scenario", "T", "B")}
        blocks.append(Block(block_keys, title, groups_, rows))
    return blocks
