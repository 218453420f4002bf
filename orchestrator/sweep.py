"""Hyperparameter sweeps with Ray Tune (BaFT's α/β/γ margins, subspace rank, learning rate, ...).

A sweep file names the cells to tune on (always a *dev* split: tuning on the reported cases would leak)
and a search space over the method's hyperparameters::

    name: baft-margins
    model: smollm2-135m
    method: baft
    benchmark: {name: zsre, split: dev, n: 20}
    scenario: {kind: continual, T: 10}
    metric: avg                     # rel | gen | loc | por | avg (mean of the benchmark's metrics)
    samples: 8
    seed: 0
    resources: {num_cpus: 1, num_gpus: 0}
    space:
      alpha: {loguniform: [0.001, 0.1]}
      beta: {uniform: [0.01, 0.2]}
      gamma: {choice: [0.0, 0.02, 0.05]}
      rank: {grid: [4, 8, 12]}

Each trial edits the cases stream by stream and reports the running means after every stream, so an
early-stopping scheduler (``scheduler: asha``) has something to prune on.  The trials' configs and
scores are written to ``<store>/trials.parquet``; the best configuration is printed as YAML that can be
pasted into ``methods/hparams/<method>/<model>.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from kebench.core.errors import KebenchError

SPACE_KINDS = ("uniform", "loguniform", "choice", "grid", "randint")
SWEEP_KEYS = ("name", "model", "method", "benchmark", "scenario", "metric", "samples", "seed", "resources", "space",
              "store", "scheduler")


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
    metric: str
    samples: int
    seed: int
    num_cpus: float
    num_gpus: float
    space: tuple[tuple[str, str, tuple[Any, ...]], ...]  # (hyperparameter, kind, arguments)
    store: str
    scheduler: str
    source: str


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KebenchError(f"{source}: sweep file not found") from None
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
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise KebenchError(f"{source}: unknown key '{unknown[0]}'; known: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "model", "method", "benchmark", "scenario", "space"):
        if key not in raw:
            raise KebenchError(f"{source}: missing required key '{key}'")
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
    if bench.get("split", "dev") != "dev":
        raise KebenchError(f"{source}: benchmark.split must be 'dev' (sweeps tune on dev, tables report test)")
    metric = raw.get("metric", "avg")
    if metric not in objectives():
        raise KebenchError(f"{source}: metric '{metric}' unknown; known: {', '.join(objectives())}")
    fields = {f.name for f in dataclasses.fields(hparams_class)}
    space = []
    if not isinstance(raw["space"], dict) or not raw["space"]:
        raise KebenchError(f"{source}: space must be a non-empty mapping of hyperparameters")
    for name, spec in raw["space"].items():
        if name not in fields:
            raise KebenchError(f"{source}: space.{name}: not a hyperparameter of {raw['method']}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise KebenchError(f"{source}: space.{name} must be one of {{{', '.join(SPACE_KINDS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise KebenchError(f"{source}: space.{name}.{kind} needs a non-empty list")
        space.append((name, kind, tuple(args)))
    resources = raw.get("resources", {}) or {}
    samples = raw.get("samples", 8)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples <= 0:
        raise KebenchError(f"{source}: samples must be a positive integer, got {samples!r}")
    scheduler = raw.get("scheduler", "fifo")
    if scheduler not in ("fifo", "asha"):
        raise KebenchError(f"{source}: scheduler must be fifo or asha, got {scheduler!r}")
    return SweepSpec(
        name=str(raw["name"]), model=raw["model"], method=raw["method"], benchmark=bench["name"], split="dev",
        n=int(bench.get("n", 20)), scenario_kind=scenario.kind, T=scenario.T, B=scenario.B, metric=metric,
        samples=samples, seed=int(raw.get("seed", 0)), num_cpus=float(resources.get("num_cpus", 1)),
        num_gpus=float(resources.get("num_gpus", 0)), space=tuple(space),
        store=str(raw.get("store", f"runs/sweeps/{raw['name']}")), scheduler=scheduler, source=source,
    )


def objectives() -> list[str]:
    """What a sweep can optimise: any registered metric, or ``avg`` (mean of the benchmark's metrics)."""
    from kebench.core.metrics import metric_names

    return [*metric_names(), "avg"]


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
        "randint": lambda a: tune.randint(*a),
    }
    return {name: make[kind](args) for name, kind, args in spec.space}


def trial(config: Mapping[str, Any], spec: SweepSpec, data_dir: str | None) -> None:
    """One Ray Tune trial: run the scenario stream by stream, reporting running means after each."""
    from ray import tune

    from benchmarks.evaluate import compute_pre_edit
    from benchmarks.registry import get_benchmark, select_cases
    from methods.base import load_hparams
    from kebench.core.models import load_model
    from orchestrator.scenarios import Scenario, make_streams, plain_logits, run_scenario
    from results.rows import case_rows, per_case
    from results.summary import summarize

    lm = load_model(spec.model)
    bench = get_benchmark(spec.benchmark)
    scenario = Scenario(spec.scenario_kind, T=spec.T, B=spec.B)
    cases = select_cases(spec.benchmark, spec.split, spec.n, 0, data_dir).cases
    hparams = load_hparams(spec.method, spec.model, scenario.kind, dict(config))
    pre = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases)
    rows: list[dict[str, Any]] = []
    for stream in make_streams(cases, scenario):
        stream_cases = [case for call in stream for case in call]
        result = run_scenario(lm, spec.method, hparams, stream_cases, scenario, spec.seed, bench.metrics, pre=pre)
        # The common protocol only: GRACE also reports its generation protocol, which must not pool in.
        rows.extend(row for row in per_case(case_rows(result.cases)) if row["protocol"] == "teacher_forced")
        summary = summarize(rows, bench.metrics)
        scores = {metric: value for metric, value in summary.means.items() if value is not None}
        tune.report({**scores, "avg": summary.avg, "cases": len(rows), "seconds_per_edit": result.seconds_per_edit})


def run_sweep(spec: SweepSpec, data_dir: str | None = None, num_cpus: int | None = None) -> "Any":
    """Run the sweep on a local Ray instance (or the one already initialised); returns the ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from benchmarks.registry import select_cases
    from orchestrator.scenarios import Scenario, make_streams

    cases = select_cases(spec.benchmark, spec.split, spec.n, 0, data_dir).cases  # fail before Ray starts
    make_streams(cases, Scenario(spec.scenario_kind, T=spec.T, B=spec.B))
    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        started_here = True
    store = Path(spec.store).resolve()
    scheduler = (ASHAScheduler(time_attr="cases", grace_period=max(1, spec.T * spec.B), max_t=spec.n)
                 if spec.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(trial, spec=spec, data_dir=data_dir),
                                    {"cpu": spec.num_cpus, "gpu": spec.num_gpus})
    try:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode="max", num_samples=spec.samples, scheduler=scheduler),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(store / "ray"), verbose=0),
        )
        results = tuner.fit()
        _write_trials(results, store / "trials.parquet", spec)
        return results
    finally:
        if started_here:
            ray.shutdown()


def _write_trials(results: Any, path: Path, spec: SweepSpec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = results.get_dataframe()
    keep = [c for c in frame.columns if c.startswith("config/") or c in (*objectives(), "cases", "seconds_per_edit", "trial_id")]
    table = pa.Table.from_pandas(frame[keep], preserve_index=False) if hasattr(frame, "columns") else None
    if table is None:
        return
    table = table.append_column("sweep", pa.array([spec.name] * table.num_rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def best_yaml(results: Any, spec: SweepSpec) -> str:
    best = results.get_best_result(metric=spec.metric, mode="max")
    chosen = {name: best.config[name] for name, _, _ in spec.space}
    score = best.metrics.get(spec.metric)
    header = f"# best of {spec.samples} trials on {spec.benchmark}/dev n={spec.n}, {spec.scenario_kind}: {spec.metric}={score:.3f}\n"
    return header + yaml.safe_dump(chosen, sort_keys=True)
