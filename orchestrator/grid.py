"""Grid specs: parse and validate a grid YAML, then expand it into cells with stable ids.

A grid names models, benchmarks, scenarios, methods (with hyperparameter overrides) and seeds; its
cells are their cartesian product.  A grid runs for hours on a cluster, so every mistake that can be
found before the first task starts is found here, eagerly: unknown keys, wrong types, unknown names,
hyperparameter overrides that the method's dataclass rejects, and sample sizes that do not split into
the scenario's streams.  Every such error is a ``KebenchError`` with one line naming the grid file and
the offending key.

``Cell.cell_id`` hashes everything that changes the numbers a cell produces (and nothing else), so the
result store can skip cells it already holds when a grid is resumed or extended.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


from benchmarks.registry import SPLITS, get_benchmark, select_cases
from methods.base import get_method
from methods.hparams import build_hparams, hparams_dict, hparams_origin, load_hparams
from kebench.core.errors import KebenchError
from kebench.core.models import (DEFAULT_DTYPE, DTYPE_CHOICES, Precision, canonical_model, check_model_name, model_facts,
                                  model_revision, resolve_precision)
from kebench.core.numerics import DEFAULT_NUMERICS, PORTABLE, check_numerics
from orchestrator import _config as cfg
from benchmarks.protocols import cell_protocols, protocol_names, protocol_spec, protocol_tag
from kebench.core.scenarios import get_scenario_kind, is_scenario, scenario_names
from orchestrator.exports import check_hparams_file_leakage, hparams_file_origin
from orchestrator.scenarios import COMMON_KEYS, Scenario

CODE_VERSION_ENV = "KEBENCH_CODE_VERSION"
TOP_KEYS = ("name", "store", "resources", "models", "benchmarks", "scenarios", "methods", "seeds", "max_retries",
            "data_dir", "dtype", "protocols", "numerics", "timeout_s")
REQUIRED_TOP_KEYS = ("name", "models", "benchmarks", "scenarios", "methods")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
BENCHMARK_KEYS = ("name", "split", "n", "offset", "protocols")
METHOD_KEYS = ("name", "label", "hparams", "hparams_file", "dtype", "timeout_s")
DEFAULT_SEEDS = (0,)
DEFAULT_MAX_RETRIES = 2
_CELL_ID_CHARS = 16


# --------------------------------------------------------------------------- the parsed spec

@dataclass(frozen=True)
class Resources:
    """What one cell's Ray task asks for (a cluster grid asks ``num_gpus: 1``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class BenchmarkSpec:
    """Which cases a cell edits: ``[offset, offset + n)`` of ``split`` (``n`` None: the whole split)."""

    name: str
    split: str = "test"
    n: int | None = None
    offset: int = 0
    #: the scoring protocols of this entry's cells (``benchmarks.protocols``); None: the grid's
    protocols: tuple[str, ...] | None = None

    @property
    def title(self) -> str:
        size = "all" if self.n is None else f"n={self.n}"
        return f"{self.name}/{self.split} ({size}, offset={self.offset})"


@dataclass(frozen=True)
class MethodSpec:
    """A method under a display label with hyperparameter overrides.

    ``overrides`` is a sorted tuple of (key, value) pairs with lists frozen into tuples, so the spec
    stays hashable; ``overrides_dict()`` gives the mapping ``load_hparams`` wants.
    """

    name: str
    label: str
    overrides: tuple[tuple[str, Any], ...] = ()
    #: a hyperparameter YAML used instead of the method's own ``<model>.yaml`` (absolute path), e.g. a
    #: plug-in's file or a sweep's exported best configuration
    hparams_file: str | None = None
    #: this entry's precision (float32, bfloat16, float16, auto); None: the grid's ``dtype``
    dtype: str | None = None
    #: this entry's per-cell time limit in seconds; None: the grid's ``timeout_s`` (not in the cell id: a limit
    #: decides whether a cell finishes, never its numbers)
    timeout_s: float | None = None

    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def hparams_source(self, model: str) -> str:
        """Where the hyperparameters come from, for every row's provenance (file and content hash, or the
        file they were derived from for a model without its own YAML)."""
        if not self.hparams_file:
            return hparams_origin(self.name, model).describe(self.name)
        path = Path(self.hparams_file)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        origin = hparams_file_origin(path)
        return f"hparams: {path} (sha256 {digest})" + (f", {origin}" if origin else "")


@dataclass(frozen=True)
class GridSpec:
    """A validated grid file; ``expand`` turns it into cells."""

    name: str
    store: str
    resources: Resources
    models: tuple[str, ...]
    benchmarks: tuple[BenchmarkSpec, ...]
    scenarios: tuple[Scenario, ...]  # expanded: one entry per (kind, T, B)
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    max_retries: int
    data_dir: str | None
    source: str  # the grid file (or what the caller named the mapping); prefixes every error
    dtype: str = DEFAULT_DTYPE  # the precision cells run in unless a method entry says otherwise
    #: the scoring protocols of every cell (``benchmarks.protocols``) unless a benchmark entry names its own;
    #: None: the default set, which no cell id records
    protocols: tuple[str, ...] | None = None
    #: the floating-point path of every cell (``kebench.core.numerics``: native | portable), grid-wide
    numerics: str = DEFAULT_NUMERICS
    #: the hyperparameters of each (method entry, model, scenario kind), resolved once by ``parse_grid``
    resolved: Mapping[tuple[int, str, str], "ResolvedHparams"] = field(default_factory=dict, compare=False)
    #: seconds a cell may run (from when its worker starts it, its model load included) before the driver stops
    #: its worker and stores it as failed; None: no limit.  A method entry's ``timeout_s`` wins.
    timeout_s: float | None = None

    def timeout_for(self, label: str) -> float | None:
        """The time limit of the cells of the method entry labelled ``label``."""
        entry = next((method for method in self.methods if method.label == label), None)
        return entry.timeout_s if entry is not None and entry.timeout_s is not None else self.timeout_s

    def hparams_for(self, index: int, model: str, kind: str) -> "ResolvedHparams":
        """Method entry ``index``'s hyperparameters on ``model`` for ``kind`` (resolved at parse time; a spec
        built by hand resolves them here)."""
        key = (index, model, kind)
        if key not in self.resolved:
            return resolve_entry(self.source, index, self.methods[index], model, kind)
        return self.resolved[key]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready, fully defaulted copy of the grid, for a manifest beside the results."""
        return {
            "name": self.name,
            "store": self.store,
            "resources": dataclasses.asdict(self.resources),
            "models": list(self.models),
            "benchmarks": [{key: (list(value) if isinstance(value, tuple) else value)
                            for key, value in dataclasses.asdict(b).items() if key != "protocols" or value}
                           for b in self.benchmarks],
            "scenarios": [s.identity() for s in self.scenarios],
            "methods": [{"name": m.name, "label": m.label, "hparams": cfg.thaw(m.overrides_dict()),
                         **({"hparams_file": m.hparams_file} if m.hparams_file else {}),
                         **({"dtype": m.dtype} if m.dtype else {}),
                         **({"timeout_s": m.timeout_s} if m.timeout_s is not None else {})} for m in self.methods],
            "dtype": self.dtype,
            **({"protocols": list(self.protocols)} if self.protocols else {}),
            "numerics": self.numerics,
            "seeds": list(self.seeds),
            "max_retries": self.max_retries,
            **({"timeout_s": self.timeout_s} if self.timeout_s is not None else {}),
            "data_dir": self.data_dir,
            "source": self.source,
        }


# --------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One unit of work: one method with resolved hyperparameters on one model, case set, scenario and seed.

    ``hparams`` is the resolved hyperparameter set as canonical JSON (not the overrides): a change to a
    method's YAML defaults changes the cell id, and the worker rebuilds exactly what was hashed.
    ``n`` is the number of cases actually selected, also when the grid asked for the whole split.
    """

    model: str
    benchmark: str
    split: str
    n: int
    offset: int
    scenario: Scenario
    method: str
    label: str
    hparams: str
    seed: int
    data_sha256: str
    code_version: str
    model_revision: str = ""  # what identifies the weights (wheel version, hub id): new weights, new cells
    #: the hyperparameter file (and its hash) the values came from: provenance only, since ``hparams``
    #: already holds every resolved value that the id hashes
    hparams_source: str = ""
    #: the resolved precision (``kebench.core.models.Precision.key``, e.g. ``bfloat16+float32-edits``);
    #: "" or "float32" is the default, left out of the id so that older cells keep theirs
    dtype: str = ""
    #: the protocols the cell is scored under when they are not its method's default set (the default
    #: protocols plus ``Editor.required_protocols``); () for the default, left out of the id as ``dtype`` is
    protocols: tuple[str, ...] = ()
    #: the floating-point path the cell computes under (``kebench.core.numerics``).  Only ``portable`` enters
    #: the id: a native number is what every cell computed before the setting existed (so no stored id moves),
    #: and a portable number differs from it, so it must not share its id, whichever of the two is the default
    numerics: str = ""

    @property
    def precision(self) -> Precision:
        return Precision.parse(self.dtype or "float32")

    @property
    def hparams_dict(self) -> dict[str, Any]:
        return json.loads(self.hparams)

    def hparams_object(self) -> Any:
        """The method's hyperparameter dataclass, rebuilt from the hashed values (not from the YAML again)."""
        cls = get_method(self.method).hparams_class
        return build_hparams(cls, self.hparams_dict, where=f"cell {self.cell_id} ({self.method})")

    def identity(self) -> dict[str, Any]:
        """Everything that changes the numbers.  The label is display only: two labels with identical
        resolved hyperparameters are the same computation, so it is left out."""
        return {
            "model": self.model,
            "benchmark": self.benchmark,
            "split": self.split,
            "offset": self.offset,
            "n": self.n,
            "scenario": self.scenario.identity(),
            "method": self.method,
            "hparams": self.hparams_dict,
            "seed": self.seed,
            "data_sha256": self.data_sha256,
            "code_version": self.code_version,
            "model_revision": self.model_revision,
            **({} if self.precision.is_default else {"dtype": self.precision.key}),
            **({"parallel_cases": self.scenario.parallel_cases} if self.trains_cases_in_parallel else {}),
            **({"protocols": list(self.protocols)} if self.protocols else {}),
            **({"numerics": PORTABLE} if self.numerics == PORTABLE else {}),
        }

    @property
    def trains_cases_in_parallel(self) -> bool:
        """K > 1 cases of a method with a case-parallel path share a batch: the same training as one by one, rounded
        differently (issue 25), so such a cell is not the one-by-one cell.  Methods without the path edit one by
        one whatever K says, and keep the one-by-one id."""
        return self.scenario.parallel_cases > 1 and get_method(self.method).has_case_parallel_path()

    @functools.cached_property
    def cell_id(self) -> str:
        # cached: a plan or a resume asks for it several times per cell, and hashing is most of their time
        return hashlib.sha256(canonical_json(self.identity()).encode("utf-8")).hexdigest()[:_CELL_ID_CHARS]

    def row_key(self) -> dict[str, Any]:
        """What the cell's row in the store says of the cell itself, ok or failed (``results.rows.cell_row``)."""
        return {**self.key_dict(), "cell_id": self.cell_id, "hparams": self.hparams, "code_version": self.code_version,
                "data_sha256": self.data_sha256, "downstream": self.scenario.downstream}

    def key_dict(self) -> dict[str, Any]:
        """The columns that identify a cell in result rows and tables."""
        return {
            "model": self.model,
            "benchmark": self.benchmark,
            "split": self.split,
            "n": self.n,
            "offset": self.offset,
            "scenario": self.scenario.kind,
            "T": self.scenario.T,
            "B": self.scenario.B,
            "method": self.method,
            "label": self.label,
            "seed": self.seed,
        }

    @property
    def title(self) -> str:
        """A short human-readable name for logs and progress bars."""
        return f"{self.model} {self.benchmark}/{self.split} {self.scenario.label} {self.label} seed={self.seed}"


def canonical_json(value: Any) -> str:
    """The one serialization that hashes are taken over: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def code_version() -> str:
    """What identifies the code that computes a cell; ``$KEBENCH_CODE_VERSION`` wins (e.g. a git hash)."""
    override = os.environ.get(CODE_VERSION_ENV, "").strip()
    if override:
        return override
    try:
        return "kebench-" + importlib.metadata.version("kebench")
    except importlib.metadata.PackageNotFoundError:
        return "kebench-dev"


def resolve_hparams(method: MethodSpec, model: str, scenario_kind: str) -> Any:
    """The method's hyperparameter dataclass for ``model`` and ``scenario_kind`` with the spec's overrides."""
    path = Path(method.hparams_file) if method.hparams_file else None
    return load_hparams(method.name, model, scenario_kind, method.overrides_dict(), path=path)


@dataclass(frozen=True)
class ResolvedHparams:
    """One (method entry, model, scenario kind)'s hyperparameters: the dataclass, its canonical JSON (what the
    cell id hashes) and where they came from (the YAML and its hash, for every row's provenance)."""

    hparams: Any
    json: str
    source: str


def resolve_entry(source: str, index: int, method: MethodSpec, model: str, kind: str,
                  described: str | None = None) -> ResolvedHparams:
    """Resolve method entry ``index`` on ``model`` for ``kind``; a failure names the entry.  ``described``: the
    entry's provenance line on ``model`` when the caller has it (it reads and hashes the YAML)."""
    try:
        hparams = resolve_hparams(method, model, kind)
        where = described if described is not None else method.hparams_source(model)
    except KebenchError as exc:
        raise KebenchError(f"{source}: methods[{index}] ('{method.label}', model '{model}', scenario {kind}): "
                           f"{cfg.one_line(exc)}") from None
    return ResolvedHparams(hparams, canonical_json(hparams_dict(hparams)), where)


def expand(grid: GridSpec, data_dir: str | os.PathLike[str] | None = None) -> list[Cell]:
    """All cells of ``grid``: models × benchmarks × scenarios × methods × seeds, in that nesting order.

    ``data_dir`` (else the grid's ``data_dir``, else the default lookup) is where the benchmark files
    are read, once per benchmark spec, for the case count and the data hash.  The hyperparameters were
    resolved by ``parse_grid``; here each (entry, model, kind) is checked once against each case selection.
    """
    source = grid.source
    root = data_dir if data_dir is not None else grid.data_dir
    version = code_version()
    selections = []
    for index, bench in enumerate(grid.benchmarks):
        try:
            selection = select_cases(bench.name, bench.split, bench.n, bench.offset, root)
        except KebenchError as exc:
            raise cfg.within(source, f"benchmarks[{index}]", exc) from None
        for scenario in grid.scenarios:
            _check_streams(source, index, bench, selection.n, scenario)
        selections.append(selection)

    checked: set[tuple[int, str, str, int]] = set()
    cells: list[Cell] = []
    for model in grid.models:
        revision = model_revision(model)
        for b_index, (bench, selection) in enumerate(zip(grid.benchmarks, selections)):
            for scenario in grid.scenarios:
                for m_index, method in enumerate(grid.methods):
                    resolved = grid.hparams_for(m_index, model, scenario.kind)
                    if (m_index, model, scenario.kind, b_index) not in checked:
                        checked.add((m_index, model, scenario.kind, b_index))
                        _check_method_fits(source, m_index, method, model, scenario.kind, resolved.hparams,
                                           selection, f"benchmarks[{b_index}]")
                    precision = cell_precision(grid, method, model)
                    protocols = _cell_protocols(bench.protocols or grid.protocols, method.name)
                    for seed in grid.seeds:
                        cells.append(Cell(model, bench.name, bench.split, selection.n, bench.offset, scenario,
                                          method.name, method.label, resolved.json, seed, selection.data_sha256,
                                          version, revision, resolved.source, precision.key, protocols,
                                          grid.numerics))
    _check_unique_ids(source, cells)
    check_hparams_file_leakage(grid, cells, root)  # an exported hparams_file must not have seen these cases
    return cells


def _cell_protocols(requested: tuple[str, ...] | None, method: str) -> tuple[str, ...]:
    """What a cell records of its protocols: () when they are its method's default set (so no id moves),
    else the full set it is scored under."""
    required = get_method(method).required_protocols
    chosen = cell_protocols(requested, required)
    return () if chosen == cell_protocols(None, required) else chosen


def cell_precision(grid: GridSpec, method: MethodSpec, model: str) -> Precision:
    """The precision a method entry's cells run in: its ``dtype`` (else the grid's), resolved for the method,
    the checkpoint's own dtype and whether cells run on GPUs (``resources.num_gpus``)."""
    return precision_for(method.dtype or grid.dtype, method.name, model, grid.resources.num_gpus > 0)


def precision_for(requested: str, method: str, model: str, accelerator: bool) -> Precision:
    """The precision policy every cell runs under, grid cell, sweep trial or ``kebench edit``: ``requested``
    (``float32``, ``bfloat16``, ``float16``, ``auto``) resolved for the method (does it edit weights?), the
    checkpoint's own dtype and whether the cell runs on an accelerator."""
    facts = model_facts(model)
    return resolve_precision(requested, get_method(method).edits_weights, facts.dtype if facts else None, accelerator)


def check_method_fits(method: str, model: str, hparams: Any, selection: Any = None) -> None:
    """The method's own cheap checks (``Editor.check_hparams``) of ``hparams`` against the model's layer
    count and hidden size, read from its config without loading weights, and the cases it will edit."""
    facts = model_facts(model)
    get_method(method).check_hparams(hparams, facts.num_layers if facts else None,
                                     facts.hidden_size if facts else None, selection)


def _check_method_fits(source: str, index: int, method: MethodSpec, model: str, kind: str, hparams: Any,
                       selection: Any, bench_where: str | None) -> None:
    try:
        check_method_fits(method.name, model, hparams, selection)
    except KebenchError as exc:
        on = f", {bench_where} {selection.benchmark}/{selection.split}" if bench_where else ""
        raise KebenchError(f"{source}: methods[{index}] ('{method.label}', model '{model}', scenario {kind}{on}): "
                           f"{cfg.one_line(exc)}") from None


def _check_unique_ids(source: str, cells: Sequence[Cell]) -> None:
    """Two cells with one id would run the same computation twice and collide in the store."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        other = seen.setdefault(cell.cell_id, cell)
        if other is not cell:
            raise KebenchError(f"{source}: cells '{other.title}' and '{cell.title}' are the same computation "
                               f"(cell_id {cell.cell_id}); remove one")


def _check_streams(source: str, index: int, bench: BenchmarkSpec, n: int, scenario: Scenario) -> None:
    """The scenario splits the cases into streams of T·B (``make_streams``); a remainder would be dropped
    silently or fail hours into a run, so it is an error up front."""
    size = scenario.cases_per_stream
    if n % size:
        raise KebenchError(
            f"{source}: benchmarks[{index}] ({bench.name}/{bench.split}, n={n}) does not split into streams of "
            f"{size} for scenario {scenario.label}{' (fewer cases than one stream)' if n < size else ''}; choose n as a "
            f"multiple of {size}"
        )


# --------------------------------------------------------------------------- loading and validation

def load_grid(path: str | os.PathLike[str]) -> GridSpec:
    """Read and validate a grid YAML; every problem is a one-line ``KebenchError`` naming the file."""
    return parse_grid(cfg.load_yaml_file(path, "grid"), str(path))


def parse_grid(mapping: Any, source: str) -> GridSpec:
    """Validate an already-parsed grid mapping; ``source`` prefixes every error message."""
    if not isinstance(mapping, dict):
        raise KebenchError(f"{source}: a grid must be a mapping with keys {', '.join(REQUIRED_TOP_KEYS)}; "
                           f"got {cfg.describe(mapping)}")
    cfg.check_keys(mapping, TOP_KEYS, source, "at top level")
    for key in REQUIRED_TOP_KEYS:
        if key not in mapping:
            raise KebenchError(f"{source}: missing required key '{key}' at top level")

    name = cfg.safe_name(mapping["name"], source, "name")
    store = cfg.string(mapping.get("store", f"runs/{name}"), source, "store")
    resources = _resources(mapping.get("resources", {}), source)
    models = _models(mapping["models"], source)
    benchmarks = _benchmarks(mapping["benchmarks"], source)
    scenarios = _scenarios(mapping["scenarios"], source)
    methods = _methods(mapping["methods"], source)
    seeds = _seeds(mapping.get("seeds", list(DEFAULT_SEEDS)), source)
    max_retries = cfg.integer(mapping.get("max_retries", DEFAULT_MAX_RETRIES), source, "max_retries", minimum=0)
    data_dir = mapping.get("data_dir")
    if data_dir is not None:
        data_dir = cfg.string(data_dir, source, "data_dir")
    dtype = _dtype(mapping.get("dtype", DEFAULT_DTYPE), source, "dtype")
    protocols = parse_protocols(mapping["protocols"], source, "protocols") if "protocols" in mapping else None
    timeout_s = time_limit(mapping["timeout_s"], source, "timeout_s") if "timeout_s" in mapping else None
    numerics = check_numerics(mapping.get("numerics", DEFAULT_NUMERICS), f"{source}: numerics")

    for index, bench in enumerate(benchmarks):
        if bench.n is not None:
            for scenario in scenarios:
                _check_streams(source, index, bench, bench.n, scenario)
    _check_methods_take(methods, scenarios, source)
    resolved = _resolve_all(methods, models, scenarios, source)
    return GridSpec(name, store, resources, models, benchmarks, scenarios, methods, seeds, max_retries, data_dir,
                    source, dtype, protocols, numerics, resolved, timeout_s)


def time_limit(value: Any, source: str, where: str) -> float:
    """A per-cell time limit: a finite number of seconds > 0 (null is not a limit; leave the key out)."""
    seconds = cfg.number(value, source, where)
    if seconds <= 0:
        raise KebenchError(f"{source}: {where} must be a number of seconds > 0, got {cfg.describe(value)}")
    return seconds


def parse_protocols(value: Any, source: str, where: str) -> tuple[str, ...]:
    """A ``protocols:`` list: registered scoring protocols (``benchmarks.protocols``), each once, as canonical
    tags.  An entry is a name, ``name(key=value,...)`` or ``{name: {key: value}}`` (the wild protocol's
    settings); settings at their defaults are dropped, so ``wild(context=question)`` is ``wild``."""
    items = cfg.nonempty_list(value, source, where)
    tags: list[str] = []
    for index, item in enumerate(items):
        try:
            spec = protocol_spec(item)
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}[{index}]: {exc}") from None
        cfg.choice(spec.split("(", 1)[0].strip(), protocol_names(), source, f"{where}[{index}]")
        try:
            tag = protocol_tag(spec)
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}[{index}]: {exc}") from None
        cfg.no_duplicate(tag, tags, source, f"{where}[{index}]", "entry")
        tags.append(tag)
    return tuple(tags)


def _dtype(value: Any, source: str, where: str) -> str:
    if value not in DTYPE_CHOICES:
        raise KebenchError(f"{source}: {where} must be one of {', '.join(DTYPE_CHOICES)}, got {cfg.describe(value)}")
    return value


def _resources(value: Any, source: str) -> Resources:
    raw = cfg.mapping(value, source, "resources")
    cfg.check_keys(raw, RESOURCE_KEYS, source, "in resources")
    defaults = Resources()
    return Resources(
        num_cpus=cfg.number(raw.get("num_cpus", defaults.num_cpus), source, "resources.num_cpus"),
        num_gpus=cfg.number(raw.get("num_gpus", defaults.num_gpus), source, "resources.num_gpus"),
    )


def _models(value: Any, source: str) -> tuple[str, ...]:
    items = cfg.nonempty_list(value, source, "models")
    models: list[str] = []
    for index, item in enumerate(items):
        where = f"models[{index}]"
        model = cfg.string(item, source, where)
        try:
            check_model_name(model)
            model = canonical_model(model)  # a path: folder is recorded absolute
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}: {cfg.one_line(exc)}") from None
        cfg.no_duplicate(model, models, source, where, "model")
        models.append(model)
    return tuple(models)


def _benchmarks(value: Any, source: str) -> tuple[BenchmarkSpec, ...]:
    items = cfg.nonempty_list(value, source, "benchmarks")
    specs: list[BenchmarkSpec] = []
    for index, item in enumerate(items):
        where = f"benchmarks[{index}]"
        raw = cfg.mapping(item, source, where)
        cfg.check_keys(raw, BENCHMARK_KEYS, source, f"in {where}")
        if "name" not in raw:
            raise KebenchError(f"{source}: {where}: missing required key 'name'")
        name = cfg.string(raw["name"], source, f"{where}.name")
        try:
            get_benchmark(name)
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}.name: {cfg.one_line(exc)}") from None
        split = cfg.string(raw.get("split", "test"), source, f"{where}.split")
        if split not in SPLITS:
            raise KebenchError(f"{source}: {where}.split: unknown split '{split}'; known: {', '.join(SPLITS)}")
        n = raw.get("n")
        if n is not None:
            n = cfg.integer(n, source, f"{where}.n", minimum=1)
        offset = cfg.integer(raw.get("offset", 0), source, f"{where}.offset", minimum=0)
        protocols = parse_protocols(raw["protocols"], source, f"{where}.protocols") if "protocols" in raw else None
        spec = BenchmarkSpec(name, split, n, offset, protocols)
        cfg.no_duplicate(spec, specs, source, where, "benchmark", shown=spec.title)
        specs.append(spec)
    return tuple(specs)


def _scenarios(value: Any, source: str) -> tuple[Scenario, ...]:
    items = cfg.nonempty_list(value, source, "scenarios")
    scenarios: list[Scenario] = []
    for index, item in enumerate(items):
        where = f"scenarios[{index}]"
        for scenario in parse_scenario_entry(item, source, where):
            cfg.no_duplicate(scenario, scenarios, source, where, "scenario", shown=scenario.label)
            scenarios.append(scenario)
    return tuple(scenarios)


def parse_scenario_entry(item: Any, source: str, where: str) -> list[Scenario]:
    """One scenario entry of a grid (or a sweep): its kind (``kebench.core.scenarios``), T and B, the kind's own
    parameters, and the downstream and case-parallel settings.  A list for T, B or a single-valued parameter
    is an axis: one scenario per value (B outermost)."""
    raw = cfg.mapping(item, source, where)
    if "kind" not in raw:
        raise KebenchError(f"{source}: {where}: missing required key 'kind'")
    kind_name = cfg.string(raw["kind"], source, f"{where}.kind")
    if not is_scenario(kind_name):
        raise KebenchError(f"{source}: {where}.kind: unknown scenario '{kind_name}'"
                           f"{cfg.did_you_mean(kind_name, scenario_names())}; known: {', '.join(scenario_names())}")
    kind = get_scenario_kind(kind_name)
    cfg.check_keys(raw, (*COMMON_KEYS, *(param.name for param in kind.params)), source, f"in {where}")
    axes: list[tuple[str, tuple[Any, ...]]] = [("B", cfg.int_or_list(raw.get("B", 1), source, f"{where}.B")),
                                               ("T", cfg.int_or_list(raw.get("T", 1), source, f"{where}.T"))]
    for param in kind.params:
        if param.name in raw:
            value = raw[param.name]
            axes.append((param.name, (value,) if param.many or not isinstance(value, list)
                         else cfg.int_or_list(value, source, f"{where}.{param.name}")))
    downstream = cfg.string(raw["downstream"], source, f"{where}.downstream") if "downstream" in raw else None
    downstream_n = (cfg.integer(raw["downstream_n"], source, f"{where}.downstream_n", 1)
                    if "downstream_n" in raw else None)
    parallel = (cfg.integer(raw["parallel_cases"], source, f"{where}.parallel_cases", 1)
                if "parallel_cases" in raw else 1)
    scenarios = []
    for values in itertools.product(*(choices for _, choices in axes)):
        chosen = dict(zip((name for name, _ in axes), values))
        params = tuple((name, value) for name, value in chosen.items() if name not in ("T", "B"))
        try:
            scenarios.append(Scenario(kind_name, T=chosen["T"], B=chosen["B"], downstream=downstream,
                                      downstream_n=downstream_n, parallel_cases=parallel, params=params))
        except KebenchError as exc:
            raise cfg.within(source, where, exc) from None
    return scenarios


def _methods(value: Any, source: str) -> tuple[MethodSpec, ...]:
    items = cfg.nonempty_list(value, source, "methods")
    specs: list[MethodSpec] = []
    labels: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"methods[{index}]"
        if isinstance(item, str):
            raw: dict[Any, Any] = {"name": item}
        elif isinstance(item, dict):
            raw = item
            cfg.check_keys(raw, METHOD_KEYS, source, f"in {where}")
            if "name" not in raw:
                raise KebenchError(f"{source}: {where}: missing required key 'name'")
        else:
            raise KebenchError(f"{source}: {where} must be a method name or a mapping with keys "
                               f"{', '.join(METHOD_KEYS)}, got {cfg.describe(item)}")
        name = cfg.string(raw["name"], source, f"{where}.name" if isinstance(item, dict) else where)
        try:
            hparams_class = get_method(name).hparams_class
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}: {cfg.one_line(exc)}") from None
        label = cfg.safe_name(raw.get("label", name), source, f"{where}.label")
        if label in labels:
            raise KebenchError(f"{source}: {where}.label: duplicate method label '{label}' "
                               f"(also methods[{labels[label]}]); give each entry its own label")
        labels[label] = index
        overrides = _overrides(raw.get("hparams", {}), hparams_class, name, source, f"{where}.hparams")
        hparams_file = None
        if "hparams_file" in raw:
            file = Path(cfg.string(raw["hparams_file"], source, f"{where}.hparams_file")).expanduser()
            if not file.is_file():
                raise KebenchError(f"{source}: {where}.hparams_file: {file} is not a file "
                                   "(relative paths are read from the current directory)")
            hparams_file = str(file.resolve())
        dtype = _dtype(raw["dtype"], source, f"{where}.dtype") if "dtype" in raw else None
        timeout_s = time_limit(raw["timeout_s"], source, f"{where}.timeout_s") if "timeout_s" in raw else None
        specs.append(MethodSpec(name, label, overrides, hparams_file, dtype, timeout_s))
    return tuple(specs)


def _overrides(value: Any, hparams_class: type, method: str, source: str, where: str) -> tuple[tuple[str, Any], ...]:
    raw = cfg.mapping(value, source, where)
    known = [f.name for f in dataclasses.fields(hparams_class)]
    pairs: list[tuple[str, Any]] = []
    for key, item in raw.items():
        if key not in known:
            raise KebenchError(f"{source}: {where}: unknown hyperparameter {key!r} for method '{method}'"
                               f"{cfg.did_you_mean(key, known)}; known: {', '.join(known)}")
        pairs.append((key, cfg.freeze(item, source, f"{where}.{key}")))
    return tuple(sorted(pairs))


def _check_methods_take(methods: Sequence[MethodSpec], scenarios: Sequence[Scenario], source: str) -> None:
    """Every method entry can run every scenario (lifelong refuses B > 1 for a method that edits a call's cases one
    after another): refused here, naming the entry, rather than in a worker hours later."""
    for scenario in scenarios:
        for index, method in enumerate(methods):
            try:
                scenario.check_method(method.name)
            except KebenchError as exc:
                raise KebenchError(f"{source}: methods[{index}] ('{method.label}'): {cfg.one_line(exc)}") from None


def _resolve_all(methods: Sequence[MethodSpec], models: Sequence[str], scenarios: Sequence[Scenario],
                 source: str) -> dict[tuple[int, str, str], ResolvedHparams]:
    """Resolve every method entry × model × scenario kind once, now, so a bad override or a missing
    hyperparameter YAML fails before any task starts (and expansion does not resolve them again); also
    reject two entries that resolve to the same computation."""
    kinds = list(dict.fromkeys(s.kind for s in scenarios))
    resolved: dict[tuple[int, str, str], ResolvedHparams] = {}
    seen: dict[tuple[str, str, str, str, str], int] = {}
    for index, method in enumerate(methods):
        for model in models:
            described = None  # the entry's YAML is read and hashed once per model, not once per kind or cell
            for kind in kinds:
                entry = resolve_entry(source, index, method, model, kind, described)
                described = entry.source
                _check_method_fits(source, index, method, model, kind, entry.hparams, None, None)
                key = (method.name, model, kind, entry.json, method.dtype or "")  # a dtype of its own: another computation
                if key in seen:
                    other = methods[seen[key]]
                    raise KebenchError(
                        f"{source}: methods[{index}] ('{method.label}') resolves to the same hyperparameters as "
                        f"methods[{seen[key]}] ('{other.label}') for model '{model}', scenario {kind}: the cells "
                        "would be the same computation; remove one or change its hparams"
                    )
                seen[key] = index
                resolved[(index, model, kind)] = entry
    return resolved


def _seeds(value: Any, source: str) -> tuple[int, ...]:
    items = cfg.nonempty_list(value, source, "seeds")
    seeds: list[int] = []
    seen: set[int] = set()  # a set, not the list: 200,000 seeds would take minutes to check (issue 31)
    for index, item in enumerate(items):
        where = f"seeds[{index}]"
        seed = cfg.integer(item, source, where, minimum=0, maximum=cfg.MAX_SEED)
        cfg.no_duplicate(seed, seen, source, where, "seed")
        seen.add(seed)
        seeds.append(seed)
    return tuple(seeds)
