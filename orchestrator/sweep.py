"""Hyperparameter sweeps with Ray Tune (BaFT's α/β/γ margins, subspace rank, learning rate, ...).

A sweep file (``orchestrator.sweep_spec``: its format and checks) names the dev cells to tune on, the
objectives and a search space over the method's hyperparameters.

Search: ``optuna`` is Ray Tune's ``OptunaSearch`` with Optuna's TPE sampler (seeded; multivariate; a
third of the trials, at least 2 and at most 10, are random start-up trials), which is multi-objective
(MOTPE) for ``objectives: [...]`` and constrained (``Trial.set_constraint``) for ``objective: {...,
subject_to: ...}``; ``random`` is Tune's ``BasicVariantGenerator`` (grid axes crossed with ``samples``
random draws, as Tune does); ``grid`` crosses every ``grid``/``choice`` axis once.

A trial is a cell (``orchestrator.cell.run_cell``, as a grid worker runs one): the model in the precision
policy's dtype, the benchmark's own scorer, provenance with the hyperparameter file, its hash and the torch
thread count.  It reports the running means to Tune after every stream (``on_stream``), so an
early-stopping scheduler (``scheduler: asha``, single objective only) has something to prune on.  The
objectives are read from the rows of the sweep's ``protocol``; a metric scored under a protocol of its own
(ConvSent's ES/DD) from its own rows.

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
ids and their hash; the format: ``orchestrator.exports``), whose leakage check refuses a grid whose
reported cases overlap them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from benchmarks.protocols import cell_protocols
from benchmarks.registry import get_benchmark, select_cases
from kebench.core.errors import KebenchError
from kebench.core.metrics import average, get_metric, is_metric, metric_names
from kebench.core.metrics import label as metric_label
from kebench.core.numerics import DEFAULT_NUMERICS, numerics_env
from methods.base import get_method
from methods.hparams import hparams_dict, load_hparams
from orchestrator.cell import CellRequest, CellResult, ModelCache, run_cell
from kebench.core.models import model_revision
from orchestrator.exports import case_ids_sha256, check_export_target, write_export
from orchestrator.grid import canonical_json, code_version, precision_for
from orchestrator.ray_session import check_local_resources, check_ray_address, ray_initialized, start_ray
from orchestrator.scenarios import make_streams, peak_rss_mb
from orchestrator.sweep_spec import SweepSpec, load_sweep, objectives, parse_sweep
from results.rows import cell_row, per_case
from results.store import (CELLS_DIR, StoreLock, check_store_writable, has_files, next_attempt, package_versions,
                           write_cell_attempt)
from results.summary import summarize
from results.sweeps import FRONT_MARK, objective_value, sweep_groups, sweep_note, trial_records, value_text
from results.views import connect

__all__ = ["SweepSpec", "export_best", "load_sweep", "make_search", "parse_sweep", "run_sweep", "sweep_command"]

_CHECKPOINT_ENV = "TUNE_GLOBAL_CHECKPOINT_S"
#: how often Tune saves its experiment state and copies it into ``<store>/ray/<name>`` (Tune's defaults,
#: "auto" >= 10 s and a 300 s sync period, would restore a killed sweep from a state minutes old, whose
#: searcher has not yet created trials the store already holds)
STATE_PERIOD_S = 0.5


def _param_space(spec: SweepSpec) -> dict[str, Any]:
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


def make_search(spec: SweepSpec) -> Any:
    """The Tune search algorithm for ``spec.search`` (with ``max_concurrent``)."""
    if spec.search in ("random", "grid"):
        return BasicVariantGenerator(max_concurrent=spec.max_concurrent or 0, random_state=spec.seed)

    startup = max(2, min(10, spec.samples // 3))
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup, multivariate=True)
    search = ConstrainedOptunaSearch(
        metric=list(spec.goals) if spec.multi else spec.metric,
        mode=list(spec.goal_modes) if spec.multi else spec.goal_modes[0],
        sampler=sampler, constraints=spec.constraints)
    if spec.max_concurrent:
        return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)
    return search


# --------------------------------------------------------------------------- the trial (a Ray actor)

_CACHE = ModelCache()  # per actor process: the loaded model and the unedited model's outputs (Tune reuses actors)


def objective_scores(rows: Sequence[Mapping[str, Any]], protocol: str, metrics: Sequence[str]) -> dict[str, float]:
    """What a trial is ranked on: the means of the benchmark's ``metrics`` over the rows of ``protocol`` and
    their Avg., plus every registered metric scored under a protocol of its own (ConvSent's ES/DD) over its
    own rows (``results.sweeps.trial_means`` reads the store the same way)."""
    cases = per_case(rows)
    summary = summarize([row for row in cases if row["protocol"] == protocol], metrics)
    scores = {metric: value for metric, value in summary.means.items() if value is not None}
    if summary.avg is not None:
        scores["avg"] = summary.avg
    for metric in metric_names():
        own = get_metric(metric).protocol
        if own is not None and metric not in scores:
            value = summarize([row for row in cases if row["protocol"] == own], [metric]).means[metric]
            if value is not None:
                scores[metric] = value
    return scores


def trial_request(spec: SweepSpec, config: Mapping[str, Any]) -> CellRequest:
    """A trial's cell: the sweep's setup with the searched values over the method's YAML, in the precision the
    grid that runs its export would use."""
    return CellRequest(spec.model, spec.benchmark, spec.split, spec.n, spec.offset, spec.scenario, spec.method,
                       load_hparams(spec.method, spec.model, spec.scenario_kind, dict(config)), spec.seed,
                       precision_for(spec.dtype, spec.method, spec.model, spec.num_gpus > 0), spec.hparams_source,
                       cell_protocols((spec.protocol,), get_method(spec.method).required_protocols))


def trial(config: Mapping[str, Any], spec: SweepSpec, data_dir: str | None,
          stored: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One Ray Tune trial: one cell, reporting running means after each stream; the last report carries every
    case row and what the cell row needs.  A trial the store already holds (see ``stored``) is replayed: its
    stored scores are reported and nothing is recomputed."""

    trial_id = tune.get_context().get_trial_id()
    if stored and trial_id in stored:
        previous = stored[trial_id]
        if previous.get("status") != "ok":
            raise RuntimeError(f"trial {trial_id} failed before (stored): {previous.get('error')}")
        tune.report({**previous["scores"], "replayed": 1, "final": 1, "stream": -1, "cases": previous["cases"]})
        return

    request = trial_request(spec, config)
    metrics = get_benchmark(spec.benchmark).metrics
    streams = spec.n // request.scenario.cases_per_stream
    started = time.time()

    def report(index: int, partial: CellResult) -> None:
        final = index == streams - 1
        metrics_now: dict[str, Any] = {
            **objective_scores(partial.case_rows, spec.stored_protocol, metrics),
            "cases": (index + 1) * request.scenario.cases_per_stream, "stream": index, "final": int(final),
            "replayed": 0, "seconds_per_edit": partial.fields["seconds_per_edit"]}
        if final or spec.scheduler == "asha":  # an early-stopped trial is stored with the rows it has
            metrics_now["rows"] = json.dumps(partial.case_rows, separators=(",", ":"))
            metrics_now["cell"] = json.dumps({
                "hparams": hparams_dict(request.hparams), "fields": partial.fields, "notes": partial.notes,
                "peak_rss_mb": float(peak_rss_mb()), "started_at": started, "finished_at": time.time(),
                "streams": index + 1, "of_streams": streams, "data_sha256": partial.data_sha256,
            }, separators=(",", ":"), default=str)
        tune.report(metrics_now)

    run_cell(request, _CACHE, data_dir, on_stream=report)


# --------------------------------------------------------------------------- trials into the store

def trial_cell_id(spec: SweepSpec, trial_id: str) -> str:
    """A trial's cell id: the sweep's name, its experiment and Tune's trial id, never a grid cell's (an experiment
    from before experiments had ids hashes without one, so its trials keep their ids)."""
    text = canonical_json({"kind": "tune", "sweep": spec.name, "trial_id": trial_id,
                           **({"experiment": spec.experiment} if spec.experiment else {})})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _is_stored(store: Path, spec: SweepSpec, trial_id: str) -> bool:
    return next_attempt(store, trial_cell_id(spec, trial_id)) > 1


def _trial_key(spec: SweepSpec, trial_id: str, hparams: Any, data_sha256: str, n: int | None = None) -> dict[str, Any]:
    """What a trial's row says of the trial itself (``results.rows.cell_row``'s key)."""
    return {
        "cell_id": trial_cell_id(spec, trial_id), "model": spec.model, "benchmark": spec.benchmark,
        "split": spec.split, "n": spec.n if n is None else n, "offset": spec.offset, "scenario": spec.scenario_kind,
        "T": spec.T, "B": spec.B, "method": spec.method, "label": spec.method, "seed": spec.seed,
        "hparams": hparams, "code_version": code_version(), "data_sha256": data_sha256,
        "kind": "tune", "sweep": spec.name, "trial_id": trial_id,
    }


def store_trial(store: Path, spec: SweepSpec, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any] | None,
                error: str | None, data_sha256: str) -> bool:
    """Write one finished trial as a cell attempt (driver only); False when it is stored already or has no rows."""
    if _is_stored(store, spec, trial_id):
        return False
    note = sweep_note({**spec.info(), "trial_id": trial_id})
    if error is not None:
        now = dt.datetime.now(dt.timezone.utc)
        key = _trial_key(spec, trial_id, json.dumps(dict(config), sort_keys=True, default=str), data_sha256)
        write_cell_attempt(store, cell_row(key, attempt=1, status="failed", error=error[:500], provenance=note,
                                           fields={"packages": package_versions(), "started_at": now,
                                                   "finished_at": now}), [])
        return True
    result = result or {}
    if "cell" not in result or "rows" not in result:
        return False  # a replayed trial, or one stopped before its first report
    cell = json.loads(result["cell"])
    notes = list(cell["notes"])
    stopped = cell["streams"] < cell["of_streams"]
    if stopped:
        notes.append(f"stopped early by {spec.scheduler} after {cell['streams']} of {cell['of_streams']} streams")
    key = _trial_key(spec, trial_id, cell["hparams"], cell["data_sha256"],
                     cell["streams"] * spec.scenario.cases_per_stream if stopped else None)
    fields = {**cell["fields"], "seconds_per_edit": result.get("seconds_per_edit"), "peak_rss_mb": cell["peak_rss_mb"],
              "packages": package_versions(), "started_at": cell["started_at"], "finished_at": cell["finished_at"]}
    write_cell_attempt(store, cell_row(key, attempt=1, status="ok", fields=fields, provenance="; ".join([*notes, note])),
                       json.loads(result["rows"]))
    return True


def _saved_state_text(experiment: Path) -> str:
    """The experiment state Tune last copied into the experiment directory (what ``Tuner.restore`` reads)."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda path: path.stat().st_mtime)
    try:
        return states[-1].read_text(encoding="utf-8") if states else ""
    except OSError:
        return ""


def _trial_store_callback(spec: SweepSpec, store: Path, data_sha256: str, experiment: Path) -> Any:
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
            self.pending[trial.trial_id] = (dict(trial.config), None, _trial_error(trial))
            self._flush()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            self._flush()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._flush(force=True)  # after Tune's final, forced save of the experiment state

    return TrialStore()


def _trial_error(trial: Any) -> str:
    """A failed trial's reason in one line, as a failed grid cell's (``orchestrator.cell.failure_text``): the
    exception its cell raised, unwrapped from Ray's task error.  Read from the trial's local error file: Tune
    writes it before it calls the callbacks, and copies it to the experiment's storage only later."""
    from ray import cloudpickle

    error = None
    try:
        path = trial.pickled_error_file
        if path and Path(path).is_file():
            error = cloudpickle.loads(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - an unreadable error file: say what Tune says
        error = None
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    if shown is not None:
        lines = str(shown).strip().splitlines()
        return f"{type(shown).__name__}: {lines[0] if lines else ''}"
    return " ".join(str(getattr(trial, "error_msg", None) or "trial failed").split()) or "trial failed"


def stored_trials(store: Path, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, error, scores, cases} of this sweep's trials in the store (what a replay reports)."""
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
            scores.update((m, v) for m, v in trial_["means"].items()  # ConvSent's ES/DD: their own protocol
                          if m not in metrics and v is not None and is_metric(m) and get_metric(m).protocol)
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
    #: the sweep as it ran: with its experiment's id, which the ranking and the export are fenced by
    spec: SweepSpec | None = None

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


#: what else makes a resumed experiment the same experiment: its data, its base hyperparameter YAML, its model
IDENTITY_KEYS = ("data_sha256", "hparams_source", "model_revision")
MARKER = "kebench-sweep.json"


def sweep_identity(spec: SweepSpec, data_sha256: str) -> dict[str, str]:
    """The hashes a sweep's numbers depend on beyond its file: the benchmark data, the method's base YAML (file
    and sha256, in ``hparams_source``) and the model's revision."""
    return {"data_sha256": data_sha256, "hparams_source": spec.hparams_source, "model_revision": model_revision(spec.model)}


def _check_fingerprint(spec: SweepSpec, path: Path, identity: Mapping[str, str]) -> str:
    """A resumed experiment must be the same experiment: neither the sweep file's search nor the data, base
    YAML or model may have changed (a one-line error saying ``--restart``); returns the experiment's id ("" for
    one started before experiments had ids)."""
    marker = path / MARKER
    if not marker.is_file():
        return ""
    try:
        before = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    now = json.loads(json.dumps(spec.fingerprint()))
    ignored = {*IDENTITY_KEYS, "experiment"}
    changed = sorted(key for key in (set(before) | set(now)) - ignored if before.get(key) != now.get(key))
    if changed:
        raise KebenchError(f"{spec.source}: '{changed[0]}' changed since sweep '{spec.name}' started in {path}; "
                           "run with --restart to start afresh")
    what = {"data_sha256": f"the benchmark data of {spec.benchmark}/{spec.split}",
            "hparams_source": f"the base hyperparameters of {spec.method} on {spec.model}",
            "model_revision": f"model {spec.model}"}
    for key in IDENTITY_KEYS:  # an experiment from before these were recorded has none to compare
        if key in before and before[key] != identity[key]:
            raise KebenchError(f"{spec.source}: {what[key]} changed since sweep '{spec.name}' started in {path} "
                               f"({_short(before[key])} → {_short(identity[key])}); its trials would be ranked across "
                               "both: run with --restart to start afresh")
    return str(before.get("experiment", ""))


def _short(value: str) -> str:
    return value if len(value) <= 24 else f"{value[:12]}…"


def _prepare_experiment(spec: SweepSpec, restart: bool, identity: Mapping[str, str]) -> tuple[Path, bool, str]:
    """The experiment directory, whether it can be resumed, and its id; a restart (or an experiment killed
    before Tune saved any state) moves the old directory aside as ``<name>.replaced-<time>`` and starts a new
    experiment, whose id the old trials in the store do not carry (they never rank with the new ones)."""

    experiment = _experiment_dir(spec)
    resumable = experiment.is_dir() and tune.Tuner.can_restore(str(experiment))
    if experiment.exists() and (restart or not resumable):
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        shutil.move(str(experiment), str(experiment.with_name(f"{spec.name}.replaced-{stamp}")))
        resumable = False
    if resumable:
        return experiment, True, _check_fingerprint(spec, experiment, identity)
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    seed = canonical_json({**spec.fingerprint(), **identity, "started": started, "pid": os.getpid()})
    return experiment, False, hashlib.sha256(seed.encode("utf-8")).hexdigest()[:12]


def run_sweep(spec: SweepSpec, data_dir: str | None = None, num_cpus: int | None = None,
              restart: bool = False, ray_address: str | None = None, num_gpus: float | None = None) -> SweepOutcome:
    """Run (or resume) the sweep on a local Ray instance, the cluster at ``ray_address``, or the session this
    process already holds (``orchestrator.ray_session``, as a grid does)."""


    selection = select_cases(spec.benchmark, spec.split, spec.n, spec.offset, data_dir)  # fail before Ray starts
    make_streams(selection.cases, spec.scenario)
    identity = sweep_identity(spec, selection.data_sha256)
    if ray_address:
        check_ray_address(ray_address)
    elif not ray_initialized():
        check_local_resources(spec.source, spec.num_cpus, num_cpus, num_gpus)
    store = check_store_writable(Path(spec.store).resolve())
    lock = StoreLock(store, "sweep", f"set another 'store:' in {spec.source}")
    lock.acquire()
    try:
        experiment, resumable, experiment_id = _prepare_experiment(spec, restart, identity)
    except BaseException:
        lock.release()
        raise
    spec = dataclasses.replace(spec, experiment=experiment_id)
    os.environ.setdefault(_CHECKPOINT_ENV, str(STATE_PERIOD_S))  # Tune's experiment state, kept fresh
    started_here = False
    try:
        # trials compute under the default numerics (kebench.core.numerics), recorded in every trial's row
        started_here = start_ray(ray_address, num_cpus, num_gpus, numerics_env(DEFAULT_NUMERICS))
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
        marker = experiment / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({**spec.fingerprint(), **identity, "experiment": spec.experiment},
                                         sort_keys=True), encoding="utf-8")
        # Only tables go to stdout: Tune prints its configuration box and hints with print().
        with contextlib.redirect_stdout(sys.stderr), _one_line_trial_errors():
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
                            interrupted=done < spec.total_trials or len(now_stored) < spec.total_trials, store=store,
                            spec=spec)
    finally:
        if started_here:
            ray.shutdown()
        lock.release()


class _OneLineErrors(logging.Filter):
    """Tune logs a failed trial with the whole remote traceback; the reason is stored with the trial (and shown in
    its row of the table), so stderr gets one line: Tune's message and the exception's first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            cause = getattr(exc, "cause", None)
            shown = cause if isinstance(cause, BaseException) else exc
            text = str(shown).strip().splitlines()
            record.msg = f"{record.getMessage()}: {type(shown).__name__}: {text[0] if text else ''}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def _one_line_trial_errors():
    logger = logging.getLogger("ray.tune.execution.tune_controller")
    guard = _OneLineErrors()
    logger.addFilter(guard)
    try:
        yield
    finally:
        logger.removeFilter(guard)


def _write_trials(results: Any, path: Path, spec: SweepSpec) -> None:
    """A flat summary of this experiment's trials (configs and final scores) beside the store."""
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
    """This sweep's stored trials on its setup and of one experiment, ranked as ``kebench table --table sweep``
    ranks them: ``spec.experiment`` (as ``run_sweep`` returns it), else the experiment that ran last (trials of
    an experiment that ``--restart`` replaced never mix in)."""
    store = Path(store or spec.store)
    if not has_files(store, CELLS_DIR):
        return []
    setup = (spec.model, spec.method, spec.benchmark, spec.split, spec.n, spec.offset, spec.scenario_kind, spec.T, spec.B)
    with connect(store) as con:
        matching = [(keys, trials) for keys, trials in sweep_groups(con, spec.name)
                    if (keys["model"], keys["method"], keys["benchmark"], keys["split"], keys["n"], keys["offset"],
                        keys["scenario"], keys["T"], keys["B"]) == setup]
    if spec.experiment:
        return next((trials for keys, trials in matching if keys["experiment"] == spec.experiment), [])
    return matching[-1][1] if matching else []  # sweep_groups lists a sweep's experiments in the order they ran


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
    return " ".join(f"{name}={objective_value(chosen['means'], name):.3f}" for name in
                    dict.fromkeys([*spec.goals, *(c[0] for c in spec.constraints)]))


def export_best(spec: SweepSpec, path: str | os.PathLike[str], store: Path | None = None,
                data_dir: str | None = None) -> dict[str, Any]:
    """Write the chosen trial's full resolved hyperparameters as a hyperparameter YAML with a header naming
    the sweep, its dev split and score, and a ``# kebench-sweep: {...}`` identity line; returns the chosen trial."""

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
        f"{spec.scenario.label};",
        f"# chosen: trial {chosen['trial_id']} ({how}): {_scores_text(spec, chosen)}.",
        "# Use it as a grid entry {name: " + spec.method + ", hparams_file: THIS_FILE}; a grid whose reported cases",
        "# overlap the dev cases below is refused.",
    ]
    write_export(path, header, identity, chosen["hparams"])
    return chosen


# --------------------------------------------------------------------------- the command

def front_table(spec: SweepSpec, store: Path | None = None, limit: int | None = None) -> str:
    """Markdown: the ranked trials (front first) with the searched hyperparameters and the scores."""
    trials = ranked_trials(spec, store)
    searched = [name for name, _, _ in spec.space]
    metrics = sorted({m for t in trials for m in t["means"]}, key=lambda m: objectives().index(m) if m in objectives() else 99)
    head = ["#", "trial", *searched, *(metric_label(m) for m in metrics), "Avg.", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials[:limit]:
        hp = [_fmt(t["hparams"].get(name)) for name in searched]
        scores = [f"{t['means'][m]:.3f}" if m in t["means"] else "–" for m in metrics]
        avg = objective_value(t["means"], "avg")
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
        if not any(trial["status"] == "ok" for trial in ranked_trials(spec)):
            raise KebenchError(_no_trial_finished(spec)) from None  # not Tune's "No best trial found"
        best = results.get_best_result(metric=spec.metric, mode=spec.goal_modes[0])
        values = {name: best.config[name] for name, _, _ in spec.space}
        score = f"{spec.metric}={best.metrics.get(spec.metric, float('nan')):.3f}"
    header = (f"# best of {spec.total_trials} trials on {spec.benchmark}/dev n={spec.n}, {spec.scenario_kind}: "
              f"{score}\n")
    return header + yaml.safe_dump(values, sort_keys=True)


def _no_trial_finished(spec: SweepSpec, store: Path | None = None) -> str:
    """One line for a sweep none of whose trials finished: how many failed and the first reason."""
    failed = [t for t in ranked_trials(spec, store) if t["status"] != "ok"]
    first = " ".join(str(failed[0]["error"] or "").split())[:200] if failed else "none stored"
    return (f"sweep '{spec.name}': no trial finished ({len(failed)} failed; first: {first}); nothing to rank or "
            f"export (kebench table --store {spec.store} --table sweep lists them)")


def sweep_command(args: Any, spec: SweepSpec | None = None) -> int:
    """``kebench sweep``: run or resume, print the ranked trials / Pareto front, optionally export the choice.

    ``args``: ``sweep`` (path), ``num_cpus``, ``data_dir``, and optionally ``restart`` and ``export``; ``spec``:
    the sweep file already loaded (and ``--export`` checked) by the caller."""
    export = getattr(args, "export", None)
    if spec is None:
        spec = load_sweep(args.sweep)
        if export is not None:
            check_export_target(export)  # before the trials run, not after
    outcome = run_sweep(spec, data_dir=args.data_dir, num_cpus=args.num_cpus, restart=bool(getattr(args, "restart", False)),
                        ray_address=getattr(args, "ray_address", None), num_gpus=getattr(args, "num_gpus", None))
    spec = outcome.spec or spec  # with its experiment: the ranking and the export see this experiment's trials
    out = sys.stdout
    verb = "resumed" if outcome.resumed else "ran"
    if outcome.interrupted:
        print(f"kebench: sweep {spec.name} interrupted: {outcome.stored} of {outcome.expected} trials stored in "
              f"{outcome.store}; run the same command again to resume (--restart starts afresh)", file=sys.stderr)
        return 130
    print(f"{spec.name}: {verb}; {outcome.stored} trials in the store {outcome.store} ({outcome.failed} failed); "
          f"kebench table --store {spec.store} --table sweep", file=out)
    print(front_table(spec, outcome.store), file=out)
    try:
        print(best_yaml(outcome.results, spec), file=out)
    except KebenchError as exc:  # found only by running the trials: exit 1, as a grid with failed cells
        print(f"kebench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if export is not None:
        chosen = export_best(spec, export, outcome.store, args.data_dir)
        print(f"exported trial {chosen['trial_id']} ({_scores_text(spec, chosen)}) to {export}", file=out)
    return 1 if outcome.failed else 0
