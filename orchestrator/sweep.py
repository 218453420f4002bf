"""Hyperparameter sweeps with Ray Tune (BaFT's α/β/γ margins, subspace rank, learning rate, ...).

A sweep file names the cells to tune on (always a *dev* split: tuning on the reported cases would leak)
and a search space over the method's hyperparameters::

    name: baft-margins
    model: smollm2-135m
    method: baft
    benchmark: {name: zsre, split: dev, n: 20}      # offset: 0
    scenario: {kind: continual, T: 10}
    objectives: [rel, loc]          # or  metric: avg  (one of rel | gen | loc | por | avg | any registered metric)
                                    # or  objective: {maximize: rel, subject_to: {loc: ">= 0.9"}}
    search: optuna                  # optuna (TPE; the default) | random | grid
    samples: 12                     # trials (search: grid runs every grid point once)
    max_concurrent: 2               # trials at a time (default: as many as the resources allow)
    seed: 0
    resources: {num_cpus: 1, num_gpus: 0}
    space:
      alpha: {loguniform: [0.001, 0.1]}
      beta: {uniform: [0.01, 0.2]}
      gamma: {choice: [0.0, 0.02, 0.05]}
      rank: {grid: [4, 8, 12]}      # optuna and random: a categorical choice; grid: a grid axis

Search: ``optuna`` is Ray Tune's ``OptunaSearch`` with Optuna's TPE sampler (seeded; multivariate; a
third of the trials, at least 2 and at most 10, are random start-up trials), which is multi-objective
(MOTPE) for ``objectives: [...]`` and constrained (``Trial.set_constraint``) for ``objective: {...,
subject_to: ...}``; ``random`` is Tune's ``BasicVariantGenerator`` (grid axes crossed with ``samples``
random draws, as Tune does); ``grid`` crosses every ``grid``/``choice`` axis once.

Each trial edits the cases stream by stream and reports the running means after every stream, so an
early-stopping scheduler (``scheduler: asha``, single objective only) has something to prune on.

**Trials are cells.**  The driver writes every finished trial to the result store ``store`` (default
``runs/sweeps/<name>``) with ``results.store.write_cell_attempt``, like a grid cell, with ``kind =
'tune'``, the sweep's name and Tune's trial id, the full resolved hyperparameters and one row per case ×
metric (``results.rows.case_rows``); a provenance note ``kebench-sweep {...}`` records the objectives and
the searched hyperparameters, so ``kebench table --table sweep`` can rank the trials from the store alone.
The paper's tables do not see trials (``results.views``).

**Resume.**  The Tune experiment lives in ``<store>/ray/<name>``.  Run the same sweep again after a
kill (SIGINT, SIGKILL) and ``Tuner.restore`` continues it: finished trials are kept, unfinished ones
restart, the searcher continues.  Tune saves that state and copies it into the experiment directory
every ``STATE_PERIOD_S`` seconds (its defaults would leave it minutes old).  A trial that finished and
was stored but that the last saved Tune state still lists as running is *replayed* from the store (its
stored scores are reported to the searcher at once, nothing is recomputed), so no trial runs twice and
no trial id is stored twice.  ``restart=True`` (``kebench sweep --restart``) moves the old experiment
aside and starts afresh (trials already stored stay in the store).  A sweep file whose search changed
since the experiment started is refused unless restarted.

**Export.**  ``export_best`` writes the chosen trial's full resolved hyperparameters as a hyperparameter
YAML (usable as a grid's ``hparams_file``) with a header naming the sweep, its dev split and the score,
and a ``# kebench-sweep: {...}`` line with the sweep's identity (benchmark, split, n, offset, the dev case
ids and their hash); ``check_hparams_file_leakage`` refuses a grid whose reported cases overlap them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from kebench.core.errors import KebenchError
from kebench.core.metrics import average
from orchestrator.exports import case_ids_sha256, write_export
from orchestrator.ray_session import check_local_resources, check_ray_address, ray_initialized, start_ray
from results.sweeps import value_text

SPACE_KINDS = ("uniform", "loguniform", "choice", "grid", "randint")
SWEEP_KEYS = ("name", "model", "method", "benchmark", "scenario", "metric", "objectives", "objective", "samples",
              "seed", "resources", "space", "store", "scheduler", "search", "max_concurrent")
SEARCHES = ("optuna", "random", "grid")
CONSTRAINT_OPS = (">=", "<=")
#: the scored protocol trials are ranked on (GRACE's generation protocol must not pool in)
PROTOCOL = "teacher_forced"
_CHECKPOINT_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
#: how often Tune saves its experiment state and copies it into ``<store>/ray/<name>`` (Tune's defaults,
#: "auto" >= 10 s and a 300 s sync period, would restore a killed sweep from a state minutes old, whose
#: searcher has not yet created trials the store already holds)
STATE_PERIOD_S = 0.5


@dataclass(frozen=True)
class SweepSpec:
    name: str
    model: str
    method: str
    benchmark: str
    split: str
    n: int
    scenario_kind: str
    T: int
    B: int
    metric: str  # the (first) objective
    samples: int
    seed: int
    num_cpus: float
    num_gpus: float
    space: tuple[tuple[str, str, tuple[Any, ...]], ...]  # (hyperparameter, kind, arguments)
    store: str
    scheduler: str
    source: str
    offset: int = 0
    search: str = "optuna"
    max_concurrent: int | None = None
    objectives: tuple[str, ...] = ()  # () means (metric,)
    modes: tuple[str, ...] = ()  # max | min per objective
    constraints: tuple[tuple[str, str, float], ...] = ()  # (metric, ">=" | "<=", threshold)

    @property
    def goals(self) -> tuple[str, ...]:
        return self.objectives or (self.metric,)

    @property
    def goal_modes(self) -> tuple[str, ...]:
        return self.modes or tuple(_mode(name) for name in self.goals)

    @property
    def multi(self) -> bool:
        return len(self.goals) > 1

    @property
    def total_trials(self) -> int:
        """How many trials the finished sweep has."""
        if self.search == "grid":
            return math.prod(len(args) for _, _, args in self.space)
        if self.search == "random":
            return self.samples * math.prod(len(args) for _, kind, args in self.space if kind == "grid")
        return self.samples

    def info(self) -> dict[str, Any]:
        """What the store's ``kebench-sweep`` note records (``results.sweeps`` ranks trials by it)."""
        return {"sweep": self.name, "objectives": list(self.goals), "modes": list(self.goal_modes),
                "constraints": [list(c) for c in self.constraints], "search": self.search,
                "searched": [name for name, _, _ in self.space], "kinds": {name: kind for name, kind, _ in self.space},
                "protocol": PROTOCOL}

    def fingerprint(self) -> dict[str, Any]:
        """Everything that makes a resumed experiment the same experiment."""
        return {"model": self.model, "method": self.method, "benchmark": self.benchmark, "split": self.split,
                "n": self.n, "offset": self.offset, "scenario": [self.scenario_kind, self.T, self.B],
                "objectives": list(self.goals), "modes": list(self.goal_modes),
                "constraints": [list(c) for c in self.constraints], "search": self.search, "samples": self.samples,
                "seed": self.seed, "space": [[n, k, list(a)] for n, k, a in self.space], "scheduler": self.scheduler}


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KebenchError(f"{source}: sweep file not found") from None
    except IsADirectoryError:
        raise KebenchError(f"{source}: is a directory, not a sweep file") from None
    except yaml.YAMLError as exc:
        raise KebenchError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    return parse_sweep(raw, source)


def parse_sweep(raw: Any, source: str) -> SweepSpec:
    """Validate a sweep mapping; every error is one line naming the file and key."""
    from benchmarks.registry import get_benchmark
    from methods.base import get_method
    from kebench.core.models import check_model_name
    from orchestrator.scenarios import Scenario

    if not isinstance(raw, dict):
        raise KebenchError(f"{source}: a sweep must be a mapping")
    unknown = sorted(set(raw) - set(SWEEP_KEYS), key=str)
    if unknown:
        raise KebenchError(f"{source}: unknown key '{unknown[0]}'; known: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "model", "method", "benchmark", "scenario", "space"):
        if key not in raw:
            raise KebenchError(f"{source}: missing required key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise KebenchError(f"{source}: name must be letters, digits and . _ + = - (it names directories), got {name!r}")
    if not isinstance(raw["benchmark"], dict):
        raise KebenchError(f"{source}: benchmark must be a mapping {{name, split, n, offset}}")
    if not isinstance(raw["scenario"], dict):
        raise KebenchError(f"{source}: scenario must be a mapping {{kind, T, B}}")
    try:
        check_model_name(raw["model"])
        hparams_class = get_method(raw["method"]).hparams_class
        bench = dict(raw["benchmark"])
        get_benchmark(bench.get("name", ""))
        scenario = Scenario(**dict(raw["scenario"]))
    except KebenchError as exc:
        raise KebenchError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise KebenchError(f"{source}: scenario: {exc}") from None
    unknown_bench = sorted(set(bench) - {"name", "split", "n", "offset"}, key=str)
    if unknown_bench:
        raise KebenchError(f"{source}: benchmark: unknown key '{unknown_bench[0]}'; known: name, split, n, offset")
    if bench.get("split", "dev") != "dev":
        raise KebenchError(f"{source}: benchmark.split must be 'dev' (sweeps tune on dev, tables report test), "
                           f"got {bench.get('split')!r}")
    n, offset = bench.get("n", 20), bench.get("offset", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise KebenchError(f"{source}: benchmark.n must be a positive integer, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise KebenchError(f"{source}: benchmark.offset must be an integer >= 0, got {offset!r}")
    if n % scenario.cases_per_stream:
        raise KebenchError(f"{source}: benchmark.n={n} does not split into streams of {scenario.cases_per_stream} "
                           f"for scenario {scenario.label}")
    objectives_, modes, constraints = _parse_objectives(raw, source)

    fields = {f.name for f in dataclasses.fields(hparams_class)}
    space = []
    if not isinstance(raw["space"], dict) or not raw["space"]:
        raise KebenchError(f"{source}: space must be a non-empty mapping of hyperparameters")
    for pname, spec in raw["space"].items():
        if pname not in fields:
            raise KebenchError(f"{source}: space.{pname}: not a hyperparameter of {raw['method']}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise KebenchError(f"{source}: space.{pname} must be one of {{{', '.join(SPACE_KINDS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise KebenchError(f"{source}: space.{pname}.{kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    or not args[0] < args[1]:
                raise KebenchError(f"{source}: space.{pname}.{kind} needs [low, high] numbers with low < high, got {args}")
            if kind == "loguniform" and args[0] <= 0:
                raise KebenchError(f"{source}: space.{pname}.loguniform needs low > 0, got {args[0]}")
        space.append((pname, kind, tuple(args)))
    resources = raw.get("resources", {}) or {}
    if not isinstance(resources, dict) or set(resources) - {"num_cpus", "num_gpus"}:
        raise KebenchError(f"{source}: resources must be a mapping with num_cpus and num_gpus")
    search = raw.get("search", "optuna")
    if search not in SEARCHES:
        raise KebenchError(f"{source}: search must be one of {', '.join(SEARCHES)}, got {search!r}")
    samples = raw.get("samples", 8)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise KebenchError(f"{source}: samples must be a positive integer, got {samples!r}")
    if search == "grid":
        continuous = [pname for pname, kind, _ in space if kind not in ("grid", "choice")]
        if continuous:
            raise KebenchError(f"{source}: search: grid needs grid or choice for every hyperparameter; "
                               f"space.{continuous[0]} is continuous")
        if "samples" in raw and samples != 1:
            raise KebenchError(f"{source}: samples: search grid runs every grid point once; leave samples out")
    if (len(objectives_) > 1 or constraints) and search != "optuna":
        raise KebenchError(f"{source}: search must be optuna for several objectives or constraints, got {search!r}")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent <= 0):
        raise KebenchError(f"{source}: max_concurrent must be a positive integer, got {max_concurrent!r}")
    scheduler = raw.get("scheduler", "fifo")
    if scheduler not in ("fifo", "asha"):
        raise KebenchError(f"{source}: scheduler must be fifo or asha, got {scheduler!r}")
    if scheduler == "asha" and (len(objectives_) > 1 or constraints):
        raise KebenchError(f"{source}: scheduler: asha prunes on one metric; use fifo with several objectives or constraints")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise KebenchError(f"{source}: seed must be an integer >= 0, got {seed!r}")
    return SweepSpec(
        name=name, model=raw["model"], method=raw["method"], benchmark=bench["name"], split="dev",
        n=n, scenario_kind=scenario.kind, T=scenario.T, B=scenario.B, metric=objectives_[0],
        samples=1 if search == "grid" else samples, seed=seed, num_cpus=float(resources.get("num_cpus", 1)),
        num_gpus=float(resources.get("num_gpus", 0)), space=tuple(space),
        store=str(raw.get("store", f"runs/sweeps/{name}")), scheduler=scheduler, source=source, offset=offset,
        search=search, max_concurrent=max_concurrent, objectives=tuple(objectives_), modes=tuple(modes),
        constraints=tuple(constraints),
    )


def _mode(name: str) -> str:
    from kebench.core.metrics import get_metric, is_metric

    return "max" if name == "avg" or not is_metric(name) or get_metric(name).higher_is_better else "min"


def _objective_name(value: Any, source: str, where: str) -> str:
    if value not in objectives():
        raise KebenchError(f"{source}: {where} '{value}' unknown; known: {', '.join(objectives())}")
    return value


def _parse_objectives(raw: Mapping[str, Any], source: str) -> tuple[list[str], list[str], list[tuple[str, str, float]]]:
    given = [key for key in ("metric", "objectives", "objective") if key in raw]
    if len(given) > 1:
        raise KebenchError(f"{source}: give one of metric, objectives or objective, not {' and '.join(given)}")
    if "objectives" in raw:
        items = raw["objectives"]
        if not isinstance(items, list) or len(items) < 2:
            raise KebenchError(f"{source}: objectives must be a list of at least two metrics (or use metric:), got {items!r}")
        names = [_objective_name(item, source, f"objectives[{i}]") for i, item in enumerate(items)]
        if len(set(names)) != len(names):
            raise KebenchError(f"{source}: objectives: duplicate metric in {names}")
        return names, [_mode(name) for name in names], []
    if "objective" in raw:
        spec = raw["objective"]
        if not isinstance(spec, dict) or set(spec) - {"maximize", "minimize", "subject_to"} \
                or len([k for k in spec if k in ("maximize", "minimize")]) != 1:
            raise KebenchError(f"{source}: objective must be {{maximize: METRIC, subject_to: {{METRIC: '>= X'}}}} "
                               "(or minimize:)")
        direction = "maximize" if "maximize" in spec else "minimize"
        name = _objective_name(spec[direction], source, f"objective.{direction}")
        constraints = []
        subject = spec.get("subject_to") or {}
        if not isinstance(subject, dict):
            raise KebenchError(f"{source}: objective.subject_to must be a mapping {{METRIC: '>= X'}}")
        for metric, text in subject.items():
            _objective_name(metric, source, "objective.subject_to")
            match = re.fullmatch(r"\s*(>=|<=)\s*([-+0-9.eE]+)\s*", str(text))
            try:
                threshold = float(match.group(2)) if match else math.nan
            except ValueError:
                threshold = math.nan
            if not match or not math.isfinite(threshold):
                raise KebenchError(f"{source}: objective.subject_to.{metric} must be '>= X' or '<= X', got {text!r}")
            constraints.append((metric, match.group(1), threshold))
        return [name], ["max" if direction == "maximize" else "min"], constraints
    metric = raw.get("metric", "avg")
    if metric not in objectives():
        raise KebenchError(f"{source}: metric '{metric}' unknown; known: {', '.join(objectives())}")
    return [metric], [_mode(metric)], []


def objectives() -> list[str]:
    """What a sweep can optimise: any registered metric, or ``avg`` (mean of the benchmark's metrics)."""
    from kebench.core.metrics import metric_names

    return [*metric_names(), "avg"]


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    grid = tune.grid_search if spec.search in ("random", "grid") else (lambda a: tune.choice(list(a)))
    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "choice": (lambda a: tune.grid_search(list(a))) if spec.search == "grid" else (lambda a: tune.choice(list(a))),
        "grid": lambda a: grid(list(a)),
        "randint": lambda a: tune.randint(*a),
    }
    return {name: make[kind](args) for name, kind, args in spec.space}


# --------------------------------------------------------------------------- search algorithms

def _optuna_search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class ConstrainedOptunaSearch(OptunaSearch):
        """OptunaSearch that hands Optuna each finished trial's constraint values (``Trial.set_constraint``:
        <= 0 is feasible) before ``tell``, so TPE splits trials by feasibility (constrained optimisation)."""

        def __init__(self, *args: Any, constraints: Sequence[tuple[str, str, float]] = (), **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kebench_constraints = tuple(constraints)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and self._kebench_constraints:
                for metric, op, threshold in self._kebench_constraints:
                    value = (result or {}).get(metric)
                    violation = 1.0 if value is None else (threshold - value if op == ">=" else value - threshold)
                    ot_trial.set_constraint(f"{metric} {op} {threshold:g}", violation)
            super().on_trial_complete(trial_id, result=result, error=error)

    return ConstrainedOptunaSearch


def make_search(spec: SweepSpec) -> Any:
    """The Tune search algorithm for ``spec.search`` (with ``max_concurrent``)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.search in ("random", "grid"):
        return BasicVariantGenerator(max_concurrent=spec.max_concurrent or 0, random_state=spec.seed)
    import optuna

    startup = max(2, min(10, spec.samples // 3))
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup, multivariate=True)
    search = _optuna_search_class()(
        metric=list(spec.goals) if spec.multi else spec.metric,
        mode=list(spec.goal_modes) if spec.multi else spec.goal_modes[0],
        sampler=sampler, constraints=spec.constraints)
    if spec.max_concurrent:
        return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)
    return search


# --------------------------------------------------------------------------- the trial (a Ray actor)

_WORKER: dict[Any, Any] = {}  # per actor: the loaded model and pre-edit outputs (actors are reused)


def _scores(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    from results.rows import per_case
    from results.summary import summarize

    summary = summarize([row for row in per_case(rows) if row["protocol"] == PROTOCOL], metrics)
    scores = {metric: value for metric, value in summary.means.items() if value is not None}
    if summary.avg is not None:
        scores["avg"] = summary.avg
    return scores


def trial(config: Mapping[str, Any], spec: SweepSpec, data_dir: str | None,
          stored: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One Ray Tune trial: run the scenario stream by stream, reporting running means after each; the last
    report carries every case row and what the cell row needs.  A trial the store already holds (see
    ``stored``) is replayed: its stored scores are reported and nothing is recomputed."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if stored and trial_id in stored:
        previous = stored[trial_id]
        if previous.get("status") != "ok":
            raise RuntimeError(f"trial {trial_id} failed before (stored): {previous.get('error')}")
        tune.report({**previous["scores"], "replayed": 1, "final": 1, "stream": -1, "cases": previous["cases"]})
        return

    from benchmarks.evaluate import compute_pre_edit
    from benchmarks.registry import get_benchmark, select_cases
    from methods.base import get_method
    from methods.hparams import hparams_dict, load_hparams
    from kebench.core.models import load_model
    from orchestrator.scenarios import Scenario, make_streams, peak_rss_mb, plain_logits, run_scenario
    from results.rows import case_rows

    started = time.time()
    if _WORKER.get("model_name") != spec.model:
        _WORKER.clear()
        _WORKER["model_name"], _WORKER["lm"] = spec.model, load_model(spec.model)
    lm = _WORKER["lm"]
    bench = get_benchmark(spec.benchmark)
    scenario = Scenario(spec.scenario_kind, T=spec.T, B=spec.B)
    selection = select_cases(spec.benchmark, spec.split, spec.n, spec.offset, data_dir)
    cases = selection.cases
    hparams = load_hparams(spec.method, spec.model, scenario.kind, dict(config))
    pre_key = ("pre", spec.benchmark, spec.split, spec.n, spec.offset)
    if pre_key not in _WORKER:
        _WORKER[pre_key] = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases)
    pre = _WORKER[pre_key]
    streams = make_streams(cases, scenario)
    scored: list[dict[str, Any]] = []  # unmapped protocols: what the objectives are computed from
    stored_rows: list[dict[str, Any]] = []  # the benchmark's stored protocol tags, as the grid runner writes them
    edit_seconds: list[float] = []
    trainable = 0
    for index, stream in enumerate(streams):
        stream_cases = [case for call in stream for case in call]
        result = run_scenario(lm, spec.method, hparams, stream_cases, scenario, spec.seed, bench.metrics, pre=pre)
        for row in case_rows(result.cases):
            scored.append({**row, "stream": index})
        for row in case_rows(result.cases, bench.row_protocol):
            stored_rows.append({**row, "stream": index})
        edit_seconds.extend(result.edit_seconds)
        trainable = result.trainable_parameters
        scores = _scores(scored, bench.metrics)
        final = index == len(streams) - 1
        report: dict[str, Any] = {**scores, "cases": (index + 1) * scenario.cases_per_stream, "stream": index,
                                  "final": int(final), "replayed": 0,
                                  "seconds_per_edit": sum(edit_seconds) / len(edit_seconds) if edit_seconds else 0.0}
        if final or spec.scheduler == "asha":  # an early-stopped trial is stored with the rows it has
            notes = [f"model {lm.info.revision}"]
            if selection.provenance_note:
                notes.append(selection.provenance_note)
            method_note = get_method(spec.method).provenance(hparams)
            if method_note:
                notes.append(method_note)
            report["rows"] = json.dumps(stored_rows, separators=(",", ":"))
            report["cell"] = json.dumps({
                "hparams": hparams_dict(hparams), "trainable_params": int(trainable),
                "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                "peak_rss_mb": float(peak_rss_mb()), "started_at": started, "finished_at": time.time(),
                "streams": index + 1, "of_streams": len(streams), "notes": notes,
                "data_sha256": selection.data_sha256,
            }, separators=(",", ":"), default=str)
        tune.report(report)


# --------------------------------------------------------------------------- trials into the store

def trial_cell_id(spec: SweepSpec, trial_id: str) -> str:
    """A trial's cell id: the sweep's name and Tune's trial id (unique per experiment), never a grid cell's."""
    from orchestrator.grid import canonical_json

    text = canonical_json({"kind": "tune", "sweep": spec.name, "trial_id": trial_id})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _is_stored(store: Path, spec: SweepSpec, trial_id: str) -> bool:
    from results.store import next_attempt

    return next_attempt(store, trial_cell_id(spec, trial_id)) > 1


def _base_cell_row(spec: SweepSpec, trial_id: str, data_sha256: str) -> dict[str, Any]:
    from orchestrator.grid import code_version
    from results.store import package_versions

    return {
        "cell_id": trial_cell_id(spec, trial_id), "attempt": 1, "model": spec.model, "benchmark": spec.benchmark,
        "split": spec.split, "n": spec.n, "offset": spec.offset, "scenario": spec.scenario_kind, "T": spec.T,
        "B": spec.B, "method": spec.method, "label": spec.method, "seed": spec.seed, "code_version": code_version(),
        "data_sha256": data_sha256, "packages": package_versions(), "device": "", "dtype": "",
        "kind": "tune", "sweep": spec.name, "trial_id": trial_id,
    }


def store_trial(store: Path, spec: SweepSpec, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any] | None,
                error: str | None, data_sha256: str) -> bool:
    """Write one finished trial as a cell attempt (driver only); False when it is stored already or has no rows."""
    from results.sweeps import sweep_note
    from results.store import write_cell_attempt

    if _is_stored(store, spec, trial_id):
        return False
    row = _base_cell_row(spec, trial_id, data_sha256)
    now = dt.datetime.now(dt.timezone.utc)
    note = sweep_note({**spec.info(), "trial_id": trial_id})
    if error is not None:
        row.update(status="failed", error=error[:500], hparams=json.dumps(dict(config), sort_keys=True, default=str),
                   provenance=note, started_at=now, finished_at=now)
        write_cell_attempt(store, row, [])
        return True
    result = result or {}
    if "cell" not in result or "rows" not in result:
        return False  # a replayed trial, or one stopped before its first report
    cell = json.loads(result["cell"])
    rows = json.loads(result["rows"])
    notes = list(cell["notes"])
    if cell["streams"] < cell["of_streams"]:
        notes.append(f"stopped early by {spec.scheduler} after {cell['streams']} of {cell['of_streams']} streams")
    row.update(status="ok", error=None, hparams=cell["hparams"], seconds_per_edit=result.get("seconds_per_edit"),
               trainable_params=cell["trainable_params"], peak_rss_mb=cell["peak_rss_mb"], device=cell["device"],
               dtype=cell["dtype"], data_sha256=cell["data_sha256"], provenance="; ".join([*notes, note]),
               started_at=cell["started_at"], finished_at=cell["finished_at"])
    if cell["streams"] < cell["of_streams"]:
        row["n"] = cell["streams"] * spec.T * spec.B
    write_cell_attempt(store, row, rows)
    return True


def _saved_state_text(experiment: Path) -> str:
    """The experiment state Tune last copied into the experiment directory (what ``Tuner.restore`` reads)."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda path: path.stat().st_mtime)
    try:
        return states[-1].read_text(encoding="utf-8") if states else ""
    except OSError:
        return ""


def _trial_store_callback(spec: SweepSpec, store: Path, data_sha256: str, experiment: Path) -> Any:
    from ray import tune

    class TrialStore(tune.Callback):
        """Runs in the driver: every trial that finishes (or fails) becomes a cell attempt in the store.

        A finished trial is written only once the experiment state saved in ``experiment`` knows it (or at
        the end of the run), so that a restore never meets a stored trial its searcher has not created (that
        would add a trial); one killed before that point is simply re-run."""

        def __init__(self) -> None:
            self.pending: dict[str, tuple[dict, Any, str | None]] = {}

        def _flush(self, force: bool = False) -> None:
            if not self.pending:
                return
            saved = "" if force else _saved_state_text(experiment)
            for trial_id in list(self.pending):
                if force or trial_id in saved:
                    config, result, error = self.pending.pop(trial_id)
                    store_trial(store, spec, trial_id, config, result, error, data_sha256)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.pending[trial.trial_id] = (dict(trial.config), dict(trial.last_result or {}), None)
            self._flush()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            message = " ".join(str(getattr(trial, "error_msg", None) or "trial failed").split())
            self.pending[trial.trial_id] = (dict(trial.config), None, message or "trial failed")
            self._flush()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            self._flush()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._flush(force=True)  # after Tune's final, forced save of the experiment state

    return TrialStore()


def stored_trials(store: Path, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, error, scores, cases} of this sweep's trials in the store (what a replay reports)."""
    from benchmarks.registry import get_benchmark
    from results.store import CELLS_DIR, has_files
    from results.sweeps import trial_records
    from results.views import connect

    if not has_files(store, CELLS_DIR):
        return {}
    metrics = get_benchmark(spec.benchmark).metrics
    out: dict[str, dict[str, Any]] = {}
    with connect(store) as con:
        for trial_ in trial_records(con, spec.name):
            means = {m: v for m, v in trial_["means"].items() if m in metrics and v is not None}
            scores = dict(means)
            if (avg := average(means)) is not None:
                scores["avg"] = avg
            out[trial_["trial_id"]] = {"status": trial_["status"], "error": trial_["error"], "scores": scores,
                                       "cases": trial_["n"]}
    return out


# --------------------------------------------------------------------------- running a sweep

@dataclass
class SweepOutcome:
    """What ``run_sweep`` did: the ResultGrid, whether it resumed, and the store's trial count."""

    results: Any
    resumed: bool
    stored: int
    expected: int
    failed: int
    interrupted: bool
    store: Path

    def __len__(self) -> int:
        return len(self.results)

    @property
    def errors(self) -> list:
        return self.results.errors

    def get_best_result(self, *args: Any, **kwargs: Any) -> Any:
        return self.results.get_best_result(*args, **kwargs)

    def get_dataframe(self) -> Any:
        return self.results.get_dataframe()


def _experiment_dir(spec: SweepSpec) -> Path:
    return Path(spec.store).resolve() / "ray" / spec.name


def _check_fingerprint(spec: SweepSpec, path: Path) -> None:
    """A resumed experiment must be the same experiment: the sweep file's search may not have changed."""
    marker = path / "kebench-sweep.json"
    if not marker.is_file():
        return
    try:
        before = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = json.loads(json.dumps(spec.fingerprint()))
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    if changed:
        raise KebenchError(f"{spec.source}: '{changed[0]}' changed since sweep '{spec.name}' started in {path}; "
                           "run with --restart to start afresh")


def _prepare_experiment(spec: SweepSpec, restart: bool) -> tuple[Path, bool]:
    """The experiment directory and whether it can be resumed; a restart (or an experiment killed before
    Tune saved any state) moves the old directory aside as ``<name>.replaced-<time>``."""
    from ray import tune

    experiment = _experiment_dir(spec)
    resumable = experiment.is_dir() and tune.Tuner.can_restore(str(experiment))
    if experiment.exists() and (restart or not resumable):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        shutil.move(str(experiment), str(experiment.with_name(f"{spec.name}.replaced-{stamp}")))
        resumable = False
    if resumable:
        _check_fingerprint(spec, experiment)
    return experiment, resumable


def run_sweep(spec: SweepSpec, data_dir: str | None = None, num_cpus: int | None = None,
              restart: bool = False, ray_address: str | None = None, num_gpus: float | None = None) -> SweepOutcome:
    """Run (or resume) the sweep on a local Ray instance, the cluster at ``ray_address``, or the session this
    process already holds (``orchestrator.ray_session``, as a grid does)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from benchmarks.registry import select_cases
    from orchestrator.scenarios import Scenario, make_streams
    from results.store import StoreLock, check_store_writable

    selection = select_cases(spec.benchmark, spec.split, spec.n, spec.offset, data_dir)  # fail before Ray starts
    make_streams(selection.cases, Scenario(spec.scenario_kind, T=spec.T, B=spec.B))
    store = check_store_writable(Path(spec.store).resolve())
    if ray_address:
        check_ray_address(ray_address)
    elif not ray_initialized():
        check_local_resources(spec.source, spec.num_cpus, num_cpus, num_gpus)
    lock = StoreLock(store)
    lock.acquire()
    try:
        experiment, resumable = _prepare_experiment(spec, restart)
    except BaseException:
        lock.release()
        raise
    os.environ.setdefault(_CHECKPOINT_ENV, str(STATE_PERIOD_S))  # Tune's experiment state, kept fresh
    started_here = False
    try:
        started_here = start_ray(ray_address, num_cpus, num_gpus)
        stored = stored_trials(store, spec) if resumable else {}
        trainable = tune.with_resources(tune.with_parameters(trial, spec=spec, data_dir=data_dir, stored=stored),
                                        {"cpu": spec.num_cpus, "gpu": spec.num_gpus})
        if resumable:
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            scheduler = (ASHAScheduler(time_attr="cases", grace_period=max(1, spec.T * spec.B), max_t=spec.n)
                         if spec.scheduler == "asha" else FIFOScheduler())
            single = not spec.multi
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric if single else None,
                                            mode=spec.goal_modes[0] if single else None,
                                            num_samples=spec.samples, scheduler=scheduler,
                                            search_alg=make_search(spec), reuse_actors=True),
                run_config=tune.RunConfig(name=spec.name, storage_path=str(store / "ray"), verbose=0,
                                          sync_config=tune.SyncConfig(sync_period=STATE_PERIOD_S),
                                          callbacks=[_trial_store_callback(spec, store, selection.data_sha256,
                                                                          experiment)]),
            )
        experiment.mkdir(parents=True, exist_ok=True)
        marker = experiment / "kebench-sweep.json"
        if not marker.exists():
            marker.write_text(json.dumps(spec.fingerprint(), sort_keys=True), encoding="utf-8")
        results = tuner.fit()
        # A trial Tune saw finish whose callback did not get to store it (killed in between): store it now.
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id")
            if trial_id and result.error is None and (result.metrics or {}).get("final"):
                store_trial(store, spec, trial_id, result.config, result.metrics, None, selection.data_sha256)
        _write_trials(results, store / "trials.parquet", spec)
        ids = {trial_.trial_id for trial_ in getattr(getattr(results, "_experiment_analysis", None), "trials", [])}
        now_stored = {key: value for key, value in stored_trials(store, spec).items() if not ids or key in ids}
        failed = sum(1 for value in now_stored.values() if value["status"] != "ok")
        done = results.num_terminated + results.num_errors
        return SweepOutcome(results, resumable, len(now_stored), spec.total_trials, failed,
                            interrupted=done < spec.total_trials or len(now_stored) < spec.total_trials, store=store)
    finally:
        if started_here:
            ray.shutdown()
        lock.release()


def _write_trials(results: Any, path: Path, spec: SweepSpec) -> None:
    """A flat summary of this experiment's trials (configs and final scores) beside the store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = results.get_dataframe()
    if not hasattr(frame, "columns") or frame.empty:
        return
    keep = [c for c in frame.columns if c.startswith("config/")
            or c in (*objectives(), "cases", "seconds_per_edit", "trial_id", "replayed")]
    table = pa.Table.from_pandas(frame[keep], preserve_index=False)
    table = table.append_column("sweep", pa.array([spec.name] * table.num_rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- choosing and exporting

def ranked_trials(spec: SweepSpec, store: Path | None = None) -> list[dict[str, Any]]:
    """This sweep's stored trials on its setup, ranked as ``kebench table --table sweep`` ranks them."""
    from results.store import CELLS_DIR, has_files
    from results.sweeps import sweep_groups
    from results.views import connect

    store = Path(store or spec.store)
    if not has_files(store, CELLS_DIR):
        return []
    with connect(store) as con:
        for keys, trials in sweep_groups(con, spec.name):
            if (keys["model"], keys["method"], keys["benchmark"], keys["split"], keys["n"], keys["offset"],
                    keys["scenario"], keys["T"], keys["B"]) == (spec.model, spec.method, spec.benchmark, spec.split,
                                                                spec.n, spec.offset, spec.scenario_kind, spec.T, spec.B):
                return trials
    return []


def choose_best(spec: SweepSpec, store: Path | None = None) -> dict[str, Any]:
    """The trial to export: the best by the metric; the best feasible one under constraints; with several
    objectives the Pareto-front trial with the highest mean of the objectives (the table's rank 1)."""
    trials = [t for t in ranked_trials(spec, store) if t["objective_values"] is not None]
    if not trials:
        raise KebenchError(f"sweep '{spec.name}': no finished trial in {store or spec.store} to choose from")
    if spec.constraints:
        feasible = [t for t in trials if t["feasible"]]
        if not feasible:
            wanted = ", ".join(f"{m} {op} {t:g}" for m, op, t in spec.constraints)
            raise KebenchError(f"sweep '{spec.name}': no trial satisfies {wanted}; nothing to export")
        return feasible[0]
    return trials[0]


def _scores_text(spec: SweepSpec, chosen: Mapping[str, Any]) -> str:
    from results.sweeps import objective_value

    return " ".join(f"{name}={objective_value(chosen['means'], name):.3f}" for name in
                    dict.fromkeys([*spec.goals, *(c[0] for c in spec.constraints)]))


def export_best(spec: SweepSpec, path: str | os.PathLike[str], store: Path | None = None,
                data_dir: str | None = None) -> dict[str, Any]:
    """Write the chosen trial's full resolved hyperparameters as a hyperparameter YAML with a header naming
    the sweep, its dev split and score, and a ``# kebench-sweep: {...}`` identity line; returns the chosen trial."""
    from benchmarks.registry import select_cases

    chosen = choose_best(spec, store)
    trials = ranked_trials(spec, store)
    selection = select_cases(spec.benchmark, spec.split, spec.n, spec.offset, data_dir)
    ids = [case.case_id for case in selection.cases]
    how = ("Pareto front, highest mean of " + ", ".join(spec.goals) if spec.multi else
           f"{'max' if spec.goal_modes[0] == 'max' else 'min'} {spec.metric}"
           + "".join(f" subject to {m} {op} {t:g}" for m, op, t in spec.constraints))
    identity = {
        "sweep": spec.name, "source": spec.source, "model": spec.model, "method": spec.method,
        "benchmark": spec.benchmark, "split": spec.split, "n": spec.n, "offset": spec.offset,
        "scenario": {"kind": spec.scenario_kind, "T": spec.T, "B": spec.B}, "trial_id": chosen["trial_id"],
        "score": {name: round(float(value), 6) for name, value in zip(spec.goals, chosen["objective_values"])},
        "data_sha256": selection.data_sha256, "case_ids_sha256": case_ids_sha256(ids), "case_ids": ids,
    }
    header = [
        f"# {spec.method} on {spec.model}: tuned by kebench sweep '{spec.name}' ({spec.source}), {spec.search} search,",
        f"# {len(trials)} trials on {spec.benchmark}/{spec.split} n={spec.n} offset={spec.offset}, "
        f"{spec.scenario_kind} T={spec.T}" + (f" B={spec.B}" if spec.scenario_kind == "batched" else "") + ";",
        f"# chosen: trial {chosen['trial_id']} ({how}): {_scores_text(spec, chosen)}.",
        "# Use it as a grid entry {name: " + spec.method + ", hparams_file: THIS_FILE}; a grid whose reported cases",
        "# overlap the dev cases below is refused.",
    ]
    write_export(path, header, identity, chosen["hparams"])
    return chosen


# --------------------------------------------------------------------------- the command

def front_table(spec: SweepSpec, store: Path | None = None, limit: int | None = None) -> str:
    """Markdown: the ranked trials (front first) with the searched hyperparameters and the scores."""
    from kebench.core.metrics import label as metric_label
    from results.sweeps import FRONT_MARK

    trials = ranked_trials(spec, store)
    searched = [name for name, _, _ in spec.space]
    metrics = sorted({m for t in trials for m in t["means"]}, key=lambda m: objectives().index(m) if m in objectives() else 99)
    head = ["#", "trial", *searched, *(metric_label(m) for m in metrics), "Avg.", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials[:limit]:
        hp = [_fmt(t["hparams"].get(name)) for name in searched]
        scores = [f"{t['means'][m]:.3f}" if m in t["means"] else "–" for m in metrics]
        avg = average(t["means"])
        lines.append("| " + " | ".join([str(t["rank"]), t["trial_id"] or "", *hp, *scores,
                                        "–" if avg is None else f"{avg:.3f}", FRONT_MARK if t["front"] else ""]) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "–" if value is None else value_text(value)


def best_yaml(results: Any, spec: SweepSpec) -> str:
    """The chosen configuration's searched hyperparameters as YAML (``export_best`` writes the full file)."""
    try:
        chosen = choose_best(spec)
        values = {name: chosen["hparams"].get(name) for name, _, _ in spec.space}
        score = _scores_text(spec, chosen)
    except KebenchError:
        best = results.get_best_result(metric=spec.metric, mode=spec.goal_modes[0])
        values = {name: best.config[name] for name, _, _ in spec.space}
        score = f"{spec.metric}={best.metrics.get(spec.metric, float('nan')):.3f}"
    header = (f"# best of {spec.total_trials} trials on {spec.benchmark}/dev n={spec.n}, {spec.scenario_kind}: "
              f"{score}\n")
    return header + yaml.safe_dump(values, sort_keys=True)


def sweep_command(args: Any) -> int:
    """``kebench sweep``: run or resume, print the ranked trials / Pareto front, optionally export the choice.

    ``args``: ``sweep`` (path), ``num_cpus``, ``data_dir``, and optionally ``restart`` and ``export``."""
    spec = load_sweep(args.sweep)
    export = getattr(args, "export", None)
    if export is not None and Path(export).is_dir():
        raise KebenchError(f"--export {export} is a directory; name a YAML file")
    outcome = run_sweep(spec, data_dir=args.data_dir, num_cpus=args.num_cpus, restart=bool(getattr(args, "restart", False)),
                        ray_address=getattr(args, "ray_address", None), num_gpus=getattr(args, "num_gpus", None))
    out = sys.stdout
    verb = "resumed" if outcome.resumed else "ran"
    if outcome.interrupted:
        print(f"kebench: sweep {spec.name} interrupted: {outcome.stored} of {outcome.expected} trials stored in "
              f"{outcome.store}; run the same command again to resume (--restart starts afresh)", file=sys.stderr)
        return 130
    print(f"{spec.name}: {verb}; {outcome.stored} trials in the store {outcome.store} ({outcome.failed} failed); "
          f"kebench table --store {spec.store} --table sweep", file=out)
    print(front_table(spec, outcome.store), file=out)
    print(best_yaml(outcome.results, spec), file=out)
    if export is not None:
        chosen = export_best(spec, export, outcome.store, args.data_dir)
        print(f"exported trial {chosen['trial_id']} ({_scores_text(spec, chosen)}) to {export}", file=out)
    return 1 if outcome.failed else 0
