"""Benchmark registry: one decorator per loader, looked up by name."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence, TypeVar

from benchmarks.case import EditCase
from benchmarks.data import data_file, file_sha256, resolve_data_dir
from kebench.core import plugins
from kebench.core.errors import KebenchError

ENTRY_POINT_GROUP = "kebench.benchmarks"

SPLITS = ("dev", "test", "all")


class Benchmark(ABC):
    """A loader of ``EditCase``s.  Subclasses set the class attributes and implement ``load``."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    #: a note that every result row of this benchmark carries (a substituted split, a proxy metric)
    provenance_note: ClassVar[str] = ""
    #: the protocol tag its teacher-forced rows carry when the benchmark's own scoring is substituted by
    #: a teacher-forced proxy (ConvSent), so that such rows never pool with the real protocol's
    proxy_protocol: ClassVar[str | None] = None

    def row_protocol(self, scored: str) -> str:
        """The protocol tag stored for a case scored under ``scored``."""
        return self.proxy_protocol if self.proxy_protocol and scored == "teacher_forced" else scored

    @abstractmethod
    def files(self, split: str) -> tuple[str, ...]:
        """The data files (relative to the data directory) that ``split`` reads (or may read: see ``files_read``)."""

    def files_read(self, split: str, data_dir: Path) -> tuple[str, ...]:
        """The files ``split`` reads given what ``data_dir`` holds (they make the data hash); ``files`` unless a
        benchmark chooses between files by what is present (WikiData_recent's official test split)."""
        return self.files(split)

    def provenance(self, split: str, data_dir: Path) -> str:
        """The note every row of ``split`` carries: ``provenance_note`` unless it depends on the files read."""
        return self.provenance_note

    @abstractmethod
    def load(self, split: str, data_dir: Path) -> list[EditCase]:
        """All cases of ``split``, in a fixed order."""

    def load_with_drops(self, split: str, data_dir: Path) -> tuple[list[EditCase], dict[str, int]]:
        """``load``'s cases and, per case id, how many optional prompts its record had that the loader
        dropped (KnowEdit's portability/locality prompts without an answer); ``select_cases`` reports the
        count for the cases it selects."""
        return self.load(split, data_dir), {}

    def extra_scorer(self, split: str, data_dir: Path) -> "ExtraScorer | None":
        """Metrics of the benchmark's own that the shared teacher-forced scorer cannot compute (ConvSent's
        ES/DD need the unedited model's full distributions); None for most benchmarks."""
        return None


class ExtraScorer(Protocol):
    """Scores registered metrics under its own ``protocol``: ``before`` runs on the unedited model before a
    stream's edits, ``after`` on the edited model, returning ``{case_id: {metric: value}}``."""

    protocol: str

    def before(self, unedited: Callable, lm: Any, cases: Sequence[EditCase]) -> Any: ...

    def after(self, edited: Callable, lm: Any, cases: Sequence[EditCase], state: Any) -> dict[str, dict[str, float]]: ...


_REGISTRY: dict[str, type[Benchmark]] = {}
B = TypeVar("B", bound=type[Benchmark])


def register_benchmark(name: str) -> Callable[[B], B]:
    def decorate(cls: B) -> B:
        if name in _REGISTRY:
            raise plugins.NameTaken("benchmark", name, _REGISTRY[name].__module__)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def benchmark_names() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def benchmark_source(name: str) -> str:
    """"kebench", or the plug-in distribution (else module) that registered the benchmark."""
    module = _REGISTRY[name].__module__
    if module.startswith("benchmarks."):
        return "kebench"
    return plugins.distribution_of_module(module) or module


def get_benchmark(name: str) -> Benchmark:
    _import_builtin()
    if name not in _REGISTRY:
        broken = plugins.failures(ENTRY_POINT_GROUP)
        hint = f"; {len(broken)} plug-in(s) failed to load (kebench list shows why)" if broken else ""
        raise KebenchError(f"unknown benchmark '{name}'; known: {', '.join(sorted(_REGISTRY))}{hint}")
    plugins.check_unclaimed("benchmark", name)
    return _REGISTRY[name]()


# --- downstream checks: a score of the (edited) model on an unrelated task (PIQA, paper Table 8) ----


@dataclass(frozen=True)
class DownstreamCheck:
    """``score(logits_fn, lm, n, data_dir) -> (value, items)``: accuracy-like, higher is better."""

    name: str
    description: str
    score: Callable[..., tuple[float, int]]


_DOWNSTREAM: dict[str, DownstreamCheck] = {}


def register_downstream(name: str, description: str) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        if name in _DOWNSTREAM:
            raise ValueError(f"downstream check {name!r} registered twice")
        _DOWNSTREAM[name] = DownstreamCheck(name, description, fn)
        return fn

    return decorate


def downstream_names() -> list[str]:
    _import_builtin()
    return sorted(_DOWNSTREAM)


def get_downstream(name: str) -> DownstreamCheck:
    _import_builtin()
    if name not in _DOWNSTREAM:
        raise KebenchError(f"unknown downstream check '{name}'; known: {', '.join(sorted(_DOWNSTREAM))}")
    return _DOWNSTREAM[name]


_NOT_LOADERS = {"case", "data", "registry", "metrics", "evaluate", "generation", "manifest", "fetch", "protocols"}


_imported = False


def _import_builtin() -> None:
    """Import every loader module in this package (each registers its benchmarks on import), then the
    ``kebench.benchmarks`` entry-point plug-ins; a broken plug-in is recorded, not raised."""
    global _imported
    if _imported:
        return
    package = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in _NOT_LOADERS:
            importlib.import_module(f"benchmarks.{info.name}")
    plugins.load_group(ENTRY_POINT_GROUP)
    _imported = True


def split_of(key: str, dev_fraction_percent: int = 10) -> str:
    """A fixed, order-independent dev/test assignment: the same text always lands in the same split."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "dev" if bucket < dev_fraction_percent else "test"


@dataclass(frozen=True)
class CaseSelection:
    """The cases a run uses and where they came from (for provenance and the cell hash)."""

    benchmark: str
    split: str
    offset: int
    n: int
    cases: tuple[EditCase, ...]
    data_sha256: str
    provenance_note: str


def select_cases(
    benchmark: str, split: str = "test", n: int | None = None, offset: int = 0, data_dir: str | Path | None = None
) -> CaseSelection:
    """Load ``benchmark`` and take cases ``[offset, offset + n)`` of ``split`` (all when ``n`` is None)."""
    bench = get_benchmark(benchmark)
    if split not in SPLITS:
        raise KebenchError(f"unknown split '{split}' for benchmark '{benchmark}'; known: {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    cases, drops = bench.load_with_drops(split, root)
    if offset < 0:
        raise KebenchError(f"offset must be >= 0, got {offset}")
    if n is not None and n <= 0:
        raise KebenchError(f"n must be > 0, got {n}")
    end = len(cases) if n is None else offset + n
    if end > len(cases):
        raise KebenchError(
            f"n={n} with offset={offset} exceeds the {len(cases)} cases of {benchmark}/{split}"
        )
    digest = hashlib.sha256()
    for relative in bench.files_read(split, root):
        # The content's hash, wherever it was read from (a gzipped copy hashes as its content).
        digest.update(file_sha256(data_file(root, relative)).encode())
    chosen = tuple(cases[offset:end])
    note = bench.provenance(split, root)
    dropped = sum(drops.get(case.case_id, 0) for case in chosen)
    if dropped:
        records = sum(1 for case in chosen if drops.get(case.case_id, 0))
        drop_note = (f"dropped {dropped} portability/locality prompt(s) with an empty prompt or no non-empty answer "
                     f"from {records} of the {len(chosen)} selected records (as KnowEdit does)")
        note = f"{note}; {drop_note}" if note else drop_note
    return CaseSelection(benchmark, split, offset, len(chosen), chosen, digest.hexdigest(), note)
