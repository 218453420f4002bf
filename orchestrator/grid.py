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
import difflib
import hashlib
import importlib.metadata
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from benchmarks.registry import SPLITS, get_benchmark, select_cases
from methods.base import build_hparams, get_method, hparams_dict, hparams_origin, load_hparams
from kebench.core.errors import KebenchError
from kebench.core.models import (DEFAULT_DTYPE, DTYPE_CHOICES, Precision, canonical_model, check_model_name, model_facts,
                                  model_revision, resolve_precision)
from orchestrator.scenarios import SCENARIO_KINDS, Scenario

CODE_VERSION_ENV = "KEBENCH_CODE_VERSION"
TOP_KEYS = ("name", "store", "resources", "models", "benchmarks", "scenarios", "methods", "seeds", "max_retries",
            "data_dir", "dtype")
REQUIRED_TOP_KEYS = ("name", "models", "benchmarks", "scenarios", "methods")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
BENCHMARK_KEYS = ("name", "split", "n", "offset")
SCENARIO_KEYS = ("kind", "T", "B", "downstream", "downstream_n", "parallel_cases")
METHOD_KEYS = ("name", "label", "hparams", "hparams_file", "dtype")
DEFAULT_SEEDS = (0,)
DEFAULT_MAX_RETRIES = 2
# Grid names and method labels end up in store paths and hive partition values: keep them path-safe.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
_CELL_ID_CHARS = 16
#: seeds are stored in an int64 column (results/store.py): a larger one would fail after the cell ran
MAX_SEED = 2**63 - 1


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

    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def hparams_source(self, model: str) -> str:
        """Where the hyperparameters come from, for every row's provenance (file and content hash, or the
        file they were derived from for a model without its own YAML)."""
        if not self.hparams_file:
            return hparams_origin(self.name, model).describe(self.name)
        path = Path(self.hparams_file)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        from orchestrator.sweep import hparams_file_origin

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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready, fully defaulted copy of the grid, for a manifest beside the results."""
        return {
            "name": self.name,
            "store": self.store,
            "resources": dataclasses.asdict(self.resources),
            "models": list(self.models),
            "benchmarks": [dataclasses.asdict(b) for b in self.benchmarks],
            "scenarios": [s.identity() for s in self.scenarios],
            "methods": [{"name": m.name, "label": m.label, "hparams": _thaw(m.overrides_dict()),
                         **({"hparams_file": m.hparams_file} if m.hparams_file else {}),
                         **({"dtype": m.dtype} if m.dtype else {})} for m in self.methods],
            "dtype": self.dtype,
            "seeds": list(self.seeds),
            "max_retries": self.max_retries,
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
        }

    @property
    def trains_cases_in_parallel(self) -> bool:
        """K > 1 cases of a method with a case-parallel path share a batch: the same training as one by one, rounded
        differently (issue 25), so such a cell is not the one-by-one cell.  Methods without the path edit one by
        one whatever K says, and keep the one-by-one id."""
        return self.scenario.parallel_cases > 1 and get_method(self.method).has_case_parallel_path()

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode("utf-8")).hexdigest()[:_CELL_ID_CHARS]

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


def expand(grid: GridSpec, data_dir: str | os.PathLike[str] | None = None) -> list[Cell]:
    """All cells of ``grid``: models × benchmarks × scenarios × methods × seeds, in that nesting order.

    ``data_dir`` (else the grid's ``data_dir``, else the default lookup) is where the benchmark files
    are read, once per benchmark spec, for the case count and the data hash.
    """
    source = grid.source
    root = data_dir if data_dir is not None else grid.data_dir
    version = code_version()
    selections: list[tuple[int, str]] = []  # (n, data_sha256) per benchmark spec
    loaded = []
    for index, bench in enumerate(grid.benchmarks):
        try:
            selection = select_cases(bench.name, bench.split, bench.n, bench.offset, root)
        except KebenchError as exc:
            raise KebenchError(f"{source}: benchmarks[{index}]: {_one_line(exc)}") from None
        for scenario in grid.scenarios:
            _check_streams(source, index, bench, selection.n, scenario)
        selections.append((selection.n, selection.data_sha256))
        loaded.append(selection)

    hparams_cache: dict[tuple[int, str, str], str] = {}
    checked: set[tuple[int, str, str, int]] = set()
    cells: list[Cell] = []
    for model in grid.models:
        for bench, (n, data_sha256) in zip(grid.benchmarks, selections):
            for scenario in grid.scenarios:
                for m_index, method in enumerate(grid.methods):
                    key = (m_index, model, scenario.kind)
                    if key not in hparams_cache:
                        resolved = _resolve_or_fail(source, m_index, method, model, scenario.kind)
                        hparams_cache[key] = canonical_json(hparams_dict(resolved))
                    b_index = grid.benchmarks.index(bench)
                    check_key = (m_index, model, scenario.kind, b_index)
                    if check_key not in checked:
                        checked.add(check_key)
                        _check_method_fits(source, m_index, method, model, scenario.kind,
                                           _resolve_or_fail(source, m_index, method, model, scenario.kind),
                                           loaded[b_index], f"benchmarks[{b_index}]")
                    precision = cell_precision(grid, method, model)
                    for seed in grid.seeds:
                        cells.append(Cell(model, bench.name, bench.split, n, bench.offset, scenario, method.name,
                                          method.label, hparams_cache[key], seed, data_sha256, version,
                                          model_revision(model), method.hparams_source(model), precision.key))
    _check_unique_ids(source, cells)
    from orchestrator.sweep import check_hparams_file_leakage  # an exported hparams_file must not have seen these cases

    check_hparams_file_leakage(grid, cells, root)
    return cells


def cell_precision(grid: GridSpec, method: MethodSpec, model: str) -> Precision:
    """The precision a method entry's cells run in: its ``dtype`` (else the grid's), resolved for the method,
    the checkpoint's own dtype and whether cells run on GPUs (``resources.num_gpus``)."""
    facts = model_facts(model)
    return resolve_precision(method.dtype or grid.dtype, get_method(method.name).edits_weights,
                             facts.dtype if facts else None, grid.resources.num_gpus > 0)


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
                           f"{_one_line(exc)}") from None


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
            f"{size} for scenario {scenario.label}; choose n as a multiple of {size}"
        )


# --------------------------------------------------------------------------- loading and validation

def load_grid(path: str | os.PathLike[str]) -> GridSpec:
    """Read and validate a grid YAML; every problem is a one-line ``KebenchError`` naming the file."""
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise KebenchError(f"{source}: grid file not found")
    if not file.is_file():
        raise KebenchError(f"{source}: not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KebenchError(f"{source}: cannot read: {_one_line(exc)}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise KebenchError(f"{source}: invalid YAML: {_yaml_problem(exc)}") from None
    return parse_grid(raw, source)


def parse_grid(mapping: Any, source: str) -> GridSpec:
    """Validate an already-parsed grid mapping; ``source`` prefixes every error message."""
    if not isinstance(mapping, dict):
        raise KebenchError(f"{source}: a grid must be a mapping with keys {', '.join(REQUIRED_TOP_KEYS)}; "
                           f"got {_describe(mapping)}")
    _check_keys(mapping, TOP_KEYS, source, "at top level")
    for key in REQUIRED_TOP_KEYS:
        if key not in mapping:
            raise KebenchError(f"{source}: missing required key '{key}' at top level")

    name = _safe_name(mapping["name"], source, "name")
    store = _string(mapping.get("store", f"runs/{name}"), source, "store")
    resources = _resources(mapping.get("resources", {}), source)
    models = _models(mapping["models"], source)
    benchmarks = _benchmarks(mapping["benchmarks"], source)
    scenarios = _scenarios(mapping["scenarios"], source)
    methods = _methods(mapping["methods"], source)
    seeds = _seeds(mapping.get("seeds", list(DEFAULT_SEEDS)), source)
    max_retries = _integer(mapping.get("max_retries", DEFAULT_MAX_RETRIES), source, "max_retries", minimum=0)
    data_dir = mapping.get("data_dir")
    if data_dir is not None:
        data_dir = _string(data_dir, source, "data_dir")
    dtype = _dtype(mapping.get("dtype", DEFAULT_DTYPE), source, "dtype")

    for index, bench in enumerate(benchmarks):
        if bench.n is not None:
            for scenario in scenarios:
                _check_streams(source, index, bench, bench.n, scenario)
    _validate_hparams(methods, models, scenarios, source)
    return GridSpec(name, store, resources, models, benchmarks, scenarios, methods, seeds, max_retries, data_dir,
                    source, dtype)


def _dtype(value: Any, source: str, where: str) -> str:
    if value not in DTYPE_CHOICES:
        raise KebenchError(f"{source}: {where} must be one of {', '.join(DTYPE_CHOICES)}, got {_describe(value)}")
    return value


def _resources(value: Any, source: str) -> Resources:
    raw = _mapping(value, source, "resources")
    _check_keys(raw, RESOURCE_KEYS, source, "in resources")
    defaults = Resources()
    return Resources(
        num_cpus=_number(raw.get("num_cpus", defaults.num_cpus), source, "resources.num_cpus"),
        num_gpus=_number(raw.get("num_gpus", defaults.num_gpus), source, "resources.num_gpus"),
    )


def _models(value: Any, source: str) -> tuple[str, ...]:
    items = _nonempty_list(value, source, "models")
    models: list[str] = []
    for index, item in enumerate(items):
        where = f"models[{index}]"
        model = _string(item, source, where)
        try:
            check_model_name(model)
            model = canonical_model(model)  # a path: folder is recorded absolute
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}: {_one_line(exc)}") from None
        _no_duplicate(model, models, source, where, "model")
        models.append(model)
    return tuple(models)


def _benchmarks(value: Any, source: str) -> tuple[BenchmarkSpec, ...]:
    items = _nonempty_list(value, source, "benchmarks")
    specs: list[BenchmarkSpec] = []
    for index, item in enumerate(items):
        where = f"benchmarks[{index}]"
        raw = _mapping(item, source, where)
        _check_keys(raw, BENCHMARK_KEYS, source, f"in {where}")
        if "name" not in raw:
            raise KebenchError(f"{source}: {where}: missing required key 'name'")
        name = _string(raw["name"], source, f"{where}.name")
        try:
            get_benchmark(name)
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}.name: {_one_line(exc)}") from None
        split = _string(raw.get("split", "test"), source, f"{where}.split")
        if split not in SPLITS:
            raise KebenchError(f"{source}: {where}.split: unknown split '{split}'; known: {', '.join(SPLITS)}")
        n = raw.get("n")
        if n is not None:
            n = _integer(n, source, f"{where}.n", minimum=1)
        offset = _integer(raw.get("offset", 0), source, f"{where}.offset", minimum=0)
        spec = BenchmarkSpec(name, split, n, offset)
        _no_duplicate(spec, specs, source, where, "benchmark", shown=spec.title)
        specs.append(spec)
    return tuple(specs)


def _scenarios(value: Any, source: str) -> tuple[Scenario, ...]:
    items = _nonempty_list(value, source, "scenarios")
    scenarios: list[Scenario] = []
    for index, item in enumerate(items):
        where = f"scenarios[{index}]"
        raw = _mapping(item, source, where)
        _check_keys(raw, SCENARIO_KEYS, source, f"in {where}")
        if "kind" not in raw:
            raise KebenchError(f"{source}: {where}: missing required key 'kind'")
        kind = _string(raw["kind"], source, f"{where}.kind")
        if kind not in SCENARIO_KINDS:
            raise KebenchError(f"{source}: {where}.kind: unknown scenario '{kind}'; known: {', '.join(SCENARIO_KINDS)}")
        t_values = _int_or_list(raw.get("T", 1), source, f"{where}.T")
        b_values = _int_or_list(raw.get("B", 1), source, f"{where}.B")
        downstream = _string(raw["downstream"], source, f"{where}.downstream") if "downstream" in raw else None
        downstream_n = _integer(raw["downstream_n"], source, f"{where}.downstream_n", 1) if "downstream_n" in raw else None
        parallel = _integer(raw["parallel_cases"], source, f"{where}.parallel_cases", 1) if "parallel_cases" in raw else 1
        for b in b_values:
            for t in t_values:
                try:
                    scenario = Scenario(kind, T=t, B=b, downstream=downstream, downstream_n=downstream_n,
                                        parallel_cases=parallel)
                except KebenchError as exc:
                    raise KebenchError(f"{source}: {where}: {_one_line(exc)}") from None
                _no_duplicate(scenario, scenarios, source, where, "scenario", shown=scenario.label)
                scenarios.append(scenario)
    return tuple(scenarios)


def _methods(value: Any, source: str) -> tuple[MethodSpec, ...]:
    items = _nonempty_list(value, source, "methods")
    specs: list[MethodSpec] = []
    labels: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"methods[{index}]"
        if isinstance(item, str):
            raw: dict[Any, Any] = {"name": item}
        elif isinstance(item, dict):
            raw = item
            _check_keys(raw, METHOD_KEYS, source, f"in {where}")
            if "name" not in raw:
                raise KebenchError(f"{source}: {where}: missing required key 'name'")
        else:
            raise KebenchError(f"{source}: {where} must be a method name or a mapping with keys "
                               f"{', '.join(METHOD_KEYS)}, got {_describe(item)}")
        name = _string(raw["name"], source, f"{where}.name" if isinstance(item, dict) else where)
        try:
            hparams_class = get_method(name).hparams_class
        except KebenchError as exc:
            raise KebenchError(f"{source}: {where}: {_one_line(exc)}") from None
        label = _safe_name(raw.get("label", name), source, f"{where}.label")
        if label in labels:
            raise KebenchError(f"{source}: {where}.label: duplicate method label '{label}' "
                               f"(also methods[{labels[label]}]); give each entry its own label")
        labels[label] = index
        overrides = _overrides(raw.get("hparams", {}), hparams_class, name, source, f"{where}.hparams")
        hparams_file = None
        if "hparams_file" in raw:
            file = Path(_string(raw["hparams_file"], source, f"{where}.hparams_file")).expanduser()
            if not file.is_file():
                raise KebenchError(f"{source}: {where}.hparams_file: {file} is not a file "
                                   "(relative paths are read from the current directory)")
            hparams_file = str(file.resolve())
        dtype = _dtype(raw["dtype"], source, f"{where}.dtype") if "dtype" in raw else None
        specs.append(MethodSpec(name, label, overrides, hparams_file, dtype))
    return tuple(specs)


def _overrides(value: Any, hparams_class: type, method: str, source: str, where: str) -> tuple[tuple[str, Any], ...]:
    raw = _mapping(value, source, where)
    known = [f.name for f in dataclasses.fields(hparams_class)]
    pairs: list[tuple[str, Any]] = []
    for key, item in raw.items():
        if key not in known:
            raise KebenchError(f"{source}: {where}: unknown hyperparameter {key!r} for method '{method}'"
                               f"{_did_you_mean(key, known)}; known: {', '.join(known)}")
        pairs.append((key, _freeze(item, source, f"{where}.{key}")))
    return tuple(sorted(pairs))


def _validate_hparams(methods: Sequence[MethodSpec], models: Sequence[str], scenarios: Sequence[Scenario],
                      source: str) -> None:
    """Resolve every method × model × scenario kind now, so a bad override or a missing hyperparameter
    YAML fails before any task starts; also reject two entries that resolve to the same computation."""
    kinds = list(dict.fromkeys(s.kind for s in scenarios))
    seen: dict[tuple[str, str, str, str, str], int] = {}
    for index, method in enumerate(methods):
        for model in models:
            for kind in kinds:
                hparams = _resolve_or_fail(source, index, method, model, kind)
                _check_method_fits(source, index, method, model, kind, hparams, None, None)
                resolved = canonical_json(hparams_dict(hparams))
                key = (method.name, model, kind, resolved, method.dtype or "")  # a dtype of its own: another computation
                if key in seen:
                    other = methods[seen[key]]
                    raise KebenchError(
                        f"{source}: methods[{index}] ('{method.label}') resolves to the same hyperparameters as "
                        f"methods[{seen[key]}] ('{other.label}') for model '{model}', scenario {kind}: the cells "
                        "would be the same computation; remove one or change its hparams"
                    )
                seen[key] = index


def _resolve_or_fail(source: str, index: int, method: MethodSpec, model: str, kind: str) -> Any:
    try:
        return resolve_hparams(method, model, kind)
    except KebenchError as exc:
        raise KebenchError(f"{source}: methods[{index}] ('{method.label}', model '{model}', scenario {kind}): "
                           f"{_one_line(exc)}") from None


def _seeds(value: Any, source: str) -> tuple[int, ...]:
    items = _nonempty_list(value, source, "seeds")
    seeds: list[int] = []
    for index, item in enumerate(items):
        where = f"seeds[{index}]"
        seed = _integer(item, source, where, minimum=0, maximum=MAX_SEED)
        _no_duplicate(seed, seeds, source, where, "seed")
        seeds.append(seed)
    return tuple(seeds)


# --------------------------------------------------------------------------- small checkers

def _check_keys(mapping: Mapping[Any, Any], known: Sequence[str], source: str, where: str) -> None:
    for key in mapping:
        if key not in known:
            raise KebenchError(f"{source}: unknown key {key!r} {where}{_did_you_mean(key, known)}; "
                               f"known: {', '.join(known)}")


def _did_you_mean(key: Any, known: Sequence[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _mapping(value: Any, source: str, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise KebenchError(f"{source}: {where} must be a mapping, got {_describe(value)}")
    return value


def _nonempty_list(value: Any, source: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _describe(value)
        raise KebenchError(f"{source}: {where} must be a non-empty list, got {got}")
    return value


def _string(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KebenchError(f"{source}: {where} must be a non-empty string, got {_describe(value)}")
    return value


def _safe_name(value: Any, source: str, where: str) -> str:
    text = _string(value, source, where)
    if not _SAFE_NAME.fullmatch(text):
        raise KebenchError(f"{source}: {where} must be letters, digits and . _ + = - (it names files and "
                           f"partitions), got {text!r}")
    return text


def _integer(value: Any, source: str, where: str, minimum: int, maximum: int | None = None) -> int:
    """YAML ``true`` is a Python bool, which is an int subclass: reject it explicitly."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KebenchError(f"{source}: {where} must be an integer >= {minimum}, got {_describe(value)}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise KebenchError(f"{source}: {where} must be {kind}, got {value}")
    if maximum is not None and value > maximum:
        raise KebenchError(f"{source}: {where} must be at most {maximum} (it is stored as a 64-bit integer), got {value}")
    return value


def _int_or_list(value: Any, source: str, where: str) -> tuple[int, ...]:
    """T and B take one value or a list of values (one scenario each)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise KebenchError(f"{source}: {where} must be a positive integer or a non-empty list of them, got an empty list")
    values: list[int] = []
    for position, item in enumerate(items):
        item_where = f"{where}[{position}]" if isinstance(value, list) else where
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise KebenchError(f"{source}: {item_where} must be a positive integer, got {_describe(item)}")
        _no_duplicate(item, values, source, item_where, "value")
        values.append(item)
    return tuple(values)


def _number(value: Any, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise KebenchError(f"{source}: {where} must be a number >= 0, got {_describe(value)}")
    return float(value)


def _freeze(value: Any, source: str, where: str) -> Any:
    """Lists become tuples so specs stay hashable; hyperparameters are scalars or lists of scalars."""
    if isinstance(value, list):
        return tuple(_freeze(item, source, where) for item in value)
    if isinstance(value, dict):
        raise KebenchError(f"{source}: {where} must be a scalar or a list, got a mapping")
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    if isinstance(value, dict):
        return {key: _thaw(item) for key, item in value.items()}
    return value


def _no_duplicate(item: Any, seen: Iterable[Any], source: str, where: str, what: str, shown: str | None = None) -> None:
    if item in seen:
        raise KebenchError(f"{source}: {where}: duplicate {what} {shown if shown is not None else repr(item)}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip()


# --------------------------------------------------------------------------- strict YAML

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML otherwise resolves silently (last one wins)."""


def _construct_strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: let the normal constructor report it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return _one_line(exc)
