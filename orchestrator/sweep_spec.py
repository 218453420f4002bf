"""Sweep files: parse and validate a sweep YAML into a ``SweepSpec``, with every check a grid file gets.

A sweep file names the cells to tune on (always a *dev* split: tuning on the reported cases would leak)
and a search space over the method's hyperparameters::

    name: baft-margins
    model: smollm2-135m
    method: baft
    benchmark: {name: zsre, split: dev, n: 20}      # offset: 0
    scenario: {kind: continual, T: 10}              # one scenario (any declared kind and its parameters)
    objectives: [rel, loc]          # or  metric: avg  (rel | gen | loc | por | avg | any registered metric,
                                    #      e.g. ConvSent's es, scored under its own protocol)
                                    # or  objective: {maximize: rel, subject_to: {loc: ">= 0.9"}}
    protocol: teacher_forced        # the protocol the objectives are read from (default teacher_forced)
    dtype: auto                     # the precision policy, as in a grid (float32 | bfloat16 | float16 | auto)
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

The file is read with the grid's strict loader (``orchestrator._config``: duplicate keys are errors) and
checked with the same typed getters, so every problem is one line naming the file and the key path, with
a "did you mean" for a near miss.  As in a grid, the method's hyperparameters are resolved for the model
and scenario at parse time and checked against the model's shape (``Editor.check_hparams``), and every
value the space can take is checked against the method's dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from benchmarks.protocols import DEFAULT_PROTOCOLS
from benchmarks.registry import benchmark_names, get_benchmark
from kebench.core.errors import KebenchError
from kebench.core.metrics import get_metric, is_metric, metric_names
from kebench.core.models import DEFAULT_DTYPE, DTYPE_CHOICES, check_model_name
from methods.base import get_method, method_names
from methods.hparams import build_hparams, hparams_dict
from orchestrator import _config as cfg
from orchestrator.grid import (MethodSpec, check_method_fits, parse_protocols, parse_scenario_entry,
                               resolve_hparams)
from orchestrator.scenarios import Scenario

SPACE_KINDS = ("uniform", "loguniform", "choice", "grid", "randint")
SWEEP_KEYS = ("name", "model", "method", "benchmark", "scenario", "metric", "objectives", "objective", "samples",
              "seed", "resources", "space", "store", "scheduler", "search", "max_concurrent", "protocol", "dtype")
REQUIRED_KEYS = ("name", "model", "method", "benchmark", "scenario", "space")
BENCHMARK_KEYS = ("name", "split", "n", "offset")
SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("fifo", "asha")
CONSTRAINT_OPS = (">=", "<=")
OBJECTIVE_KEYS = ("maximize", "minimize", "subject_to")
#: the protocol trials are ranked on unless the file says otherwise (GRACE's generation rows must not pool in)
DEFAULT_PROTOCOL = DEFAULT_PROTOCOLS[0]


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
    protocol: str = DEFAULT_PROTOCOL
    dtype: str = DEFAULT_DTYPE
    scenario_params: tuple[tuple[str, Any], ...] = ()  # the scenario kind's own parameters
    #: where the values not searched come from (the method's YAML and its hash), for every trial's provenance
    hparams_source: str = ""
    #: the Tune experiment the trials belong to (``orchestrator.sweep`` sets it when it starts or resumes one):
    #: trials of an experiment that ``--restart`` replaced, or that ran on other data, never rank with these
    experiment: str = ""

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.scenario_kind, T=self.T, B=self.B, params=self.scenario_params)

    @property
    def goals(self) -> tuple[str, ...]:
        return self.objectives or (self.metric,)

    @property
    def goal_modes(self) -> tuple[str, ...]:
        return self.modes or tuple(metric_mode(name) for name in self.goals)

    @property
    def multi(self) -> bool:
        return len(self.goals) > 1

    @property
    def stored_protocol(self) -> str:
        """The tag the objectives' rows carry in the store (ConvSent stores its teacher-forced proxy apart)."""
        return get_benchmark(self.benchmark).row_protocol(self.protocol)

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
                "protocol": self.stored_protocol, **({"experiment": self.experiment} if self.experiment else {})}

    def fingerprint(self) -> dict[str, Any]:
        """Everything that makes a resumed experiment the same experiment (settings at their default are left
        out, so an experiment started before they existed resumes)."""
        out = {"model": self.model, "method": self.method, "benchmark": self.benchmark, "split": self.split,
               "n": self.n, "offset": self.offset, "scenario": [self.scenario_kind, self.T, self.B],
               "objectives": list(self.goals), "modes": list(self.goal_modes),
               "constraints": [list(c) for c in self.constraints], "search": self.search, "samples": self.samples,
               "seed": self.seed, "space": [[n, k, list(a)] for n, k, a in self.space], "scheduler": self.scheduler}
        if self.scenario_params:
            out["scenario_params"] = [[name, cfg.thaw(value)] for name, value in self.scenario_params]
        if self.protocol != DEFAULT_PROTOCOL:
            out["protocol"] = self.protocol
        if self.dtype != DEFAULT_DTYPE:
            out["dtype"] = self.dtype
        return out


def metric_mode(name: str) -> str:
    """max for ``avg``, an unknown name and a metric whose higher values are better; min otherwise (DD)."""
    return "max" if name == "avg" or not is_metric(name) or get_metric(name).higher_is_better else "min"


def objectives() -> list[str]:
    """What a sweep can optimise: any registered metric, or ``avg`` (mean of the benchmark's metrics)."""
    return [*metric_names(), "avg"]


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    return parse_sweep(cfg.load_yaml_file(path, "sweep"), str(path))


def parse_sweep(raw: Any, source: str) -> SweepSpec:
    """Validate a sweep mapping; every error is one line naming the file and the key path."""
    if not isinstance(raw, dict):
        raise KebenchError(f"{source}: a sweep must be a mapping with keys {', '.join(REQUIRED_KEYS)}; "
                           f"got {cfg.describe(raw)}")
    cfg.check_keys(raw, SWEEP_KEYS, source, "at top level")
    cfg.require_keys(raw, REQUIRED_KEYS, source, "at top level")
    name = cfg.safe_name(raw["name"], source, "name")
    model = _model(raw["model"], source)
    method = cfg.choice(raw["method"], method_names(), source, "method")
    bench_name, n, offset = _benchmark(raw["benchmark"], source)
    scenario = _scenario(raw["scenario"], source)
    if n % scenario.cases_per_stream:
        raise KebenchError(f"{source}: benchmark.n={n} does not split into streams of {scenario.cases_per_stream} "
                           f"for scenario {scenario.label}")
    dtype = cfg.choice(raw.get("dtype", DEFAULT_DTYPE), DTYPE_CHOICES, source, "dtype")
    protocol = parse_protocols([raw.get("protocol", DEFAULT_PROTOCOL)], source, "protocol")[0]
    base, hparams_source = _base_hparams(method, model, scenario, source)
    space = _space(raw["space"], method, model, base, source)
    goals, modes, constraints = _objectives(raw, source)
    search = cfg.choice(raw.get("search", "optuna"), SEARCHES, source, "search")
    samples = cfg.integer(raw.get("samples", 8), source, "samples", minimum=1)
    _check_search(search, space, samples, "samples" in raw, len(goals) > 1 or bool(constraints), source)
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = cfg.integer(max_concurrent, source, "max_concurrent", minimum=1)
    scheduler = cfg.choice(raw.get("scheduler", "fifo"), SCHEDULERS, source, "scheduler")
    if scheduler == "asha" and (len(goals) > 1 or constraints):
        raise KebenchError(f"{source}: scheduler: asha prunes on one metric; use fifo with several objectives or constraints")
    num_cpus, num_gpus = _resources(raw.get("resources", {}), source)
    return SweepSpec(
        name=name, model=model, method=method, benchmark=bench_name, split="dev", n=n, scenario_kind=scenario.kind,
        T=scenario.T, B=scenario.B, metric=goals[0], samples=1 if search == "grid" else samples,
        seed=cfg.integer(raw.get("seed", 0), source, "seed", minimum=0, maximum=cfg.MAX_SEED), num_cpus=num_cpus,
        num_gpus=num_gpus, space=space, store=cfg.string(raw.get("store", f"runs/sweeps/{name}"), source, "store"),
        scheduler=scheduler, source=source, offset=offset, search=search, max_concurrent=max_concurrent,
        objectives=goals, modes=modes, constraints=constraints, protocol=protocol, dtype=dtype,
        scenario_params=scenario.params, hparams_source=hparams_source,
    )


def _model(value: Any, source: str) -> str:
    model = cfg.string(value, source, "model")
    try:
        check_model_name(model)
    except KebenchError as exc:
        raise cfg.within(source, "model", exc) from None
    return model


def _benchmark(value: Any, source: str) -> tuple[str, int, int]:
    raw = cfg.mapping(value, source, "benchmark")
    cfg.check_keys(raw, BENCHMARK_KEYS, source, "in benchmark")
    cfg.require_keys(raw, ("name",), source, "benchmark")
    name = cfg.choice(raw["name"], benchmark_names(), source, "benchmark.name")
    if raw.get("split", "dev") != "dev":
        raise KebenchError(f"{source}: benchmark.split must be 'dev' (sweeps tune on dev, tables report test), "
                           f"got {raw.get('split')!r}")
    n = cfg.integer(raw.get("n", 20), source, "benchmark.n", minimum=1)
    return name, n, cfg.integer(raw.get("offset", 0), source, "benchmark.offset", minimum=0)


def _scenario(value: Any, source: str) -> Scenario:
    """The one scenario trials run (a grid entry's syntax; no downstream check, no axes)."""
    raw = cfg.mapping(value, source, "scenario")
    for key in ("downstream", "downstream_n", "parallel_cases"):
        if key in raw:
            raise KebenchError(f"{source}: scenario.{key}: a sweep tunes on the edits alone; leave it out")
    scenarios = parse_scenario_entry(raw, source, "scenario")
    if len(scenarios) != 1:
        raise KebenchError(f"{source}: scenario: a sweep tunes on one scenario; give each parameter one value")
    return scenarios[0]


def _base_hparams(method: str, model: str, scenario: Scenario, source: str) -> tuple[Any, str]:
    """The method's hyperparameters on ``model`` for the scenario (what every trial starts from) and where they
    come from (its YAML, read and hashed once), resolved and checked against the model's shape now, as a
    grid's are."""
    entry = MethodSpec(method, method)
    try:
        hparams = resolve_hparams(entry, model, scenario.kind)
        check_method_fits(method, model, hparams)
        described = entry.hparams_source(model)
    except KebenchError as exc:
        raise cfg.within(source, f"method ('{method}', model '{model}', scenario {scenario.kind})", exc) from None
    return hparams, described


def _space(value: Any, method: str, model: str, base: Any, source: str) -> tuple[tuple[str, str, tuple[Any, ...]], ...]:
    """The search space, every value a trial can take checked now, as a grid checks its overrides: against the
    method's hyperparameter types (a real-valued range for an integer is refused), its dataclass's own checks
    and the model's config (layers in range, rank at most the hidden size), so a bad value is one line before
    Tune starts instead of failed trials and "No best trial found" after it."""
    raw = cfg.mapping(value, source, "space")
    if not raw:
        raise KebenchError(f"{source}: space must be a non-empty mapping of hyperparameters")
    hparams_class = get_method(method).hparams_class
    known = [f.name for f in dataclasses.fields(hparams_class)]
    hints = typing.get_type_hints(hparams_class)
    space = []
    for name, spec in raw.items():
        where = f"space.{name}"
        if name not in known:
            raise KebenchError(f"{source}: {where}: not a hyperparameter of {method}{cfg.did_you_mean(name, known)}; "
                               f"known: {', '.join(known)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            hint = cfg.did_you_mean(next(iter(spec), None), SPACE_KINDS) if isinstance(spec, dict) else ""
            raise KebenchError(f"{source}: {where} must be one of {{{', '.join(SPACE_KINDS)}: [...]}}{hint}")
        kind, args = next(iter(spec.items()))
        args = tuple(_space_arguments(kind, args, source, f"{where}.{kind}"))
        if kind in ("uniform", "loguniform") and _is_integer(hints.get(name)):
            raise KebenchError(f"{source}: {where}.{kind}: {name} is an integer hyperparameter and {kind} draws real "
                               f"numbers; use randint: [{args[0]}, {args[1]}] or choice: [...]")
        for value in _probe_values(kind, args):  # each value the trials can take must fit the dataclass and model
            try:
                hparams = build_hparams(hparams_class, {**hparams_dict(base), name: value},
                                        where=f"{where}.{kind} value {_shown(value)}")
                check_method_fits(method, model, hparams)
            except KebenchError as exc:
                message = cfg.one_line(exc)
                prefix = f"{where}.{kind} value {_shown(value)}"
                raise KebenchError(f"{source}: {message if message.startswith(prefix) else f'{prefix}: {message}'}"
                                   ) from None
        space.append((name, kind, args))
    return tuple(space)


def _is_integer(hint: Any) -> bool:
    """``int`` or ``int | None``."""
    if hint is int:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and int in typing.get_args(hint) \
        and float not in typing.get_args(hint)


def _shown(value: Any) -> str:
    return f"{value!r}" if not isinstance(value, (list, tuple)) else f"[{', '.join(map(repr, value))}]"


def _space_arguments(kind: str, args: Any, source: str, where: str) -> list[Any]:
    if not isinstance(args, list) or not args:
        raise KebenchError(f"{source}: {where} needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) == 2 and any(isinstance(a, float) and not math.isfinite(a) for a in args):
            raise KebenchError(f"{source}: {where} needs finite [low, high], got {args}")
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                or not args[0] < args[1]:
            raise KebenchError(f"{source}: {where} needs [low, high] numbers with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise KebenchError(f"{source}: {where} needs low > 0, got {args[0]}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise KebenchError(f"{source}: {where} needs [low, high] integers, got {args}")
    for index, item in enumerate(args):
        cfg.freeze(item, source, f"{where}[{index}]")  # a mapping cannot be a hyperparameter value
    return args


def _probe_values(kind: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values of a space axis worth checking: every listed one, both ends of a range (as the reals a
    continuous range draws)."""
    if kind == "randint":
        return (args[0], args[1] - 1)  # Tune's randint excludes high
    if kind in ("uniform", "loguniform"):
        return (float(args[0]), float(args[1]))
    return args


def _objectives(raw: Mapping[str, Any], source: str) -> tuple[tuple[str, ...], tuple[str, ...],
                                                               tuple[tuple[str, str, float], ...]]:
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
        return tuple(names), tuple(metric_mode(name) for name in names), ()
    if "objective" in raw:
        return _constrained(raw["objective"], source)
    name = _objective_name(raw.get("metric", "avg"), source, "metric")
    return (name,), (metric_mode(name),), ()


def _objective_name(value: Any, source: str, where: str) -> str:
    if value not in objectives():
        raise KebenchError(f"{source}: {where} '{value}' unknown{cfg.did_you_mean(value, objectives())}; "
                           f"known: {', '.join(objectives())}")
    return value


def _constrained(spec: Any, source: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str, float], ...]]:
    """``objective: {maximize: METRIC, subject_to: {METRIC: '>= X'}}`` (or ``minimize:``)."""
    if not isinstance(spec, dict) or set(spec) - set(OBJECTIVE_KEYS) \
            or len([k for k in spec if k in ("maximize", "minimize")]) != 1:
        raise KebenchError(f"{source}: objective must be {{maximize: METRIC, subject_to: {{METRIC: '>= X'}}}} "
                           "(or minimize:)")
    direction = "maximize" if "maximize" in spec else "minimize"
    name = _objective_name(spec[direction], source, f"objective.{direction}")
    subject = spec.get("subject_to") or {}
    if not isinstance(subject, dict):
        raise KebenchError(f"{source}: objective.subject_to must be a mapping {{METRIC: '>= X'}}")
    constraints = []
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
    return (name,), ("max" if direction == "maximize" else "min",), tuple(constraints)


def _check_search(search: str, space: tuple, samples: int, samples_given: bool, several: bool, source: str) -> None:
    if search == "grid":
        continuous = [name for name, kind, _ in space if kind not in ("grid", "choice")]
        if continuous:
            raise KebenchError(f"{source}: search: grid needs grid or choice for every hyperparameter; "
                               f"space.{continuous[0]} is continuous")
        if samples_given and samples != 1:
            raise KebenchError(f"{source}: samples: search grid runs every grid point once; leave samples out")
    if several and search != "optuna":
        raise KebenchError(f"{source}: search must be optuna for several objectives or constraints, got {search!r}")


def _resources(value: Any, source: str) -> tuple[float, float]:
    raw = cfg.mapping(value if value is not None else {}, source, "resources")
    cfg.check_keys(raw, ("num_cpus", "num_gpus"), source, "in resources")
    return (cfg.number(raw.get("num_cpus", 1), source, "resources.num_cpus"),
            cfg.number(raw.get("num_gpus", 0), source, "resources.num_gpus"))
