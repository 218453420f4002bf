"""The editor contract and the method registry.

A method is one module: an ``Editor`` subclass registered with ``@register_method("name")``, one frozen
hyperparameter dataclass, and one YAML per model (loaded by ``methods.hparams``).  Methods outside this
package register through the ``kebench.methods`` entry-point group; one that fails to import is
reported (``kebench.core.plugins.failures``) and the rest still load.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence, TypeVar

import torch

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, forward_logits, prefix_causal
from kebench.core import plugins
from kebench.core.errors import KebenchError, RunError
from kebench.core.models import LoadedModel

ENTRY_POINT_GROUP = "kebench.methods"


@dataclass(frozen=True)
class EditStats:
    """What one ``Editor.apply`` call did."""

    steps: int
    loss: float


class RestoreError(RunError):
    """``restore()`` did not return the model to its original outputs (checked after every stream)."""


class NonFiniteError(RuntimeError):
    """An edit produced a non-finite loss or update; the cell is recorded as failed ("non-finite")."""


class Editor(ABC):
    """Edits a loaded model in place and can put it back exactly.

    ``apply`` takes a list of cases as *one* edit call (a single edit, or one batch of a batched
    stream); consecutive calls accumulate (continual editing).  ``restore`` returns the model to the
    state it had when the editor was built, bit for bit.  ``logits`` runs the edited model on a
    teacher-forced batch; the default is the plain forward pass, which suits editors that change
    weights or hook modules.  Every protocol scores through ``logits``, so the editor is in one state
    whether it is teacher-forced or generates (``benchmarks.decoding``).

    Generation keeps a KV cache only for a ``logits`` marked ``benchmarks.metrics.prefix_causal`` (its output at
    a position depends only on the tokens up to it, and it runs ``forward_logits``, which honours
    ``TFBatch.cache``); the default is marked.  An override is re-run on the whole sequence at every
    decoding step unless it is marked itself: right for routers that read the whole sequence.
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type]
    #: protocols (``benchmarks.protocols``) every cell of this method is scored under, beside the ones the cell
    #: asks for (teacher-forced by default): GRACE adds EasyEdit's "generation", the protocol EasyEdit gives it
    required_protocols: ClassVar[tuple[str, ...]] = ()
    #: where this method's ``<name>/<model>.yaml`` files live; None: ``hparams/`` beside the module that
    #: defines the class (kebench's own methods: ``methods/hparams``)
    hparams_dir: ClassVar[str | Path | None] = None
    #: False for methods whose hyperparameters all have defaults and need no YAML (``unedited``)
    needs_hparams_file: ClassVar[bool] = True
    #: True for methods that change the model's own weights (ROME, MEMIT, FT-L/FT-M): under ``dtype: auto``
    #: on a half-precision model they run with the modules they change in float32 (``lm.edit_dtype``)
    edits_weights: ClassVar[bool] = False
    #: True where one ``apply`` of several cases is one joint edit (MEMIT's batch update, the fine-tuning and
    #: representation methods' joint training); False where it applies them one after another (ROME, GRACE,
    #: MELO), which a scenario that means B > 1 as one joint call refuses (lifelong: ``ScenarioKind.joint_calls``)
    batch_edits: ClassVar[bool] = True

    def __init__(self, lm: LoadedModel, hparams: Any, seed: int) -> None:
        self.lm = lm
        self.hparams = hparams
        self.seed = seed

    @abstractmethod
    def apply(self, cases: Sequence[EditCase]) -> EditStats: ...

    @abstractmethod
    def restore(self) -> None: ...

    @abstractmethod
    def trainable_parameters(self) -> int:
        """Parameters the method learns (0 for closed-form editors such as ROME)."""

    def paper_parameters(self) -> int | None:
        """The count under the convention of the paper's Table 3 where it differs from what is trained
        (BaFT); None elsewhere.  The params table shows it beside the measured count."""
        return None

    @classmethod
    def provenance(cls, hparams: Any) -> str:
        """One line on what the numbers depend on beyond model, data and hyperparameters (e.g. the corpus of
        precomputed statistics), added to every result row's provenance; "" when there is nothing."""
        return ""

    @classmethod
    def check_hparams(cls, hparams: Any, num_layers: int | None, hidden_size: int | None,
                      benchmark: Any = None) -> None:
        """Cheap checks of ``hparams`` against the model's shape, before any weights load (grid expansion,
        ``kebench edit``); raise a one-line ``KebenchError`` naming the field.  ``num_layers`` /
        ``hidden_size`` are None when the model's config is not known without loading it.
        ``benchmark``: the ``CaseSelection`` the cell edits (or None), for methods that need something
        of the cases (WISE: unrelated training texts).

        The default checks, where present: ``layer``/``layers`` and fields ending in ``_layers`` lie in
        ``0..num_layers-1``; fields ending in ``_layer`` may also count from the end (``-1``: the last
        layer); ``rank`` lies in ``1..hidden_size``.  Override it (and call ``super()``) for more.
        """
        values = dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else {}
        for key, value in values.items():
            is_list = key == "layers" or key.endswith("_layers")
            is_one = key == "layer" or key.endswith("_layer")
            if num_layers is None or not (is_list or is_one):
                continue
            items = value if isinstance(value, (list, tuple)) else [value]
            low = -num_layers if is_one and key != "layer" else 0
            for item in items:
                if isinstance(item, int) and not isinstance(item, bool) and not low <= item < num_layers:
                    raise KebenchError(f"{cls.name}: {key}: layer {item} out of range for a model with {num_layers} "
                                       f"layers (0..{num_layers - 1})")
        rank = values.get("rank")
        if hidden_size is not None and isinstance(rank, int) and not isinstance(rank, bool) \
                and not 0 < rank <= hidden_size:
            raise KebenchError(f"{cls.name}: rank must be in 1..{hidden_size} (the model's hidden size), got {rank}")

    @prefix_causal
    def logits(self, batch: TFBatch) -> torch.Tensor:
        return forward_logits(self.lm.model, batch)

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any] | None:
        """The layer hyperparameters for a model of ``num_layers`` layers that has no YAML of its own (the rest
        comes from the nearest shipped YAML); None: keep that YAML's.  A method overrides it with the
        relative-depth rule its shipped YAMLs follow (``methods.hparams.at_depth``; ``tests/test_any_model.py``
        checks every rule against the YAMLs)."""
        return None

    @classmethod
    def requirements(cls, hparams: Any) -> tuple[Any, ...]:
        """What an editor with these hyperparameters reads beyond the model and its cases, for a grid to
        prepare once before any cell starts (ROME/MEMIT: second-moment statistics, ``methods.stats.StatsNeed``;
        the grid's pre-pass is ``methods.stats.missing_jobs``); () when nothing.  A cell whose requirement
        was not prepared computes it itself, so this only moves work, never changes a number."""
        return ()

    def artifacts(self, cases: Sequence[EditCase]) -> dict[str, Any]:
        """Small JSON-ready data about the edited model, taken after a stream's edits and before restore
        (BaFT: per-basis gate weights on edited, rephrased and unrelated inputs); stored per cell."""
        return {}

    @classmethod
    def has_case_parallel_path(cls) -> bool:
        """Whether the single scenario's ``parallel_cases`` can train this method's cases in one batch (it overrides
        ``independent`` or ``edit_in_parallel``); a given model or precision may still decline at run time."""
        return cls.independent.__func__ is not Editor.independent.__func__ or \
            cls.edit_in_parallel.__func__ is not Editor.edit_in_parallel.__func__

    @classmethod
    def independent(cls, lm: LoadedModel, hparams: Any, seed: int, copies: int) -> "IndependentEdits | None":
        """``copies`` editors of this method that train that many *independent* single edits in one batch
        (the single scenario's ``parallel_cases``), or None where the method cannot (then the scenario
        edits its cases one by one).  Each case must train exactly as in a one-by-one run: same seed, same
        initial state, its own loss, optimizer state and stopping rule (equal to rounding; tested in float64)."""
        return None

    @classmethod
    def edit_in_parallel(cls, lm: LoadedModel, hparams: Any, seed: int, cases: Sequence[EditCase],
                         window: int) -> "Iterator[EditedCases] | None":
        """Single edits of ``cases``, ``window`` at a time, as groups of finished cases to score; None where the
        method has no case-parallel path (``independent`` gives None).

        This default trains the cases in chunks of ``window`` through ``independent``: a chunk runs until its
        slowest case stops.  A method whose trainer can take new cases while others train overrides it and keeps
        the batch full (the representation methods do).  The caller scores each yielded group, restores it, and
        closes the iterator when it stops early (which restores whatever is still training).
        """
        cases = list(cases)
        torch.manual_seed(seed)
        first = cls.independent(lm, hparams, seed, min(window, len(cases)))
        return None if first is None else _chunked(cls, lm, hparams, seed, cases, window, first)


def group_runs(batch: TFBatch) -> list[tuple[int, int, int]]:
    """(case index, first row, end row) of each run of consecutive rows that ``batch.groups`` gives one case."""
    if batch.groups is None:
        raise KebenchError("case-parallel logits need TFBatch.groups (the case of each row)")
    groups = batch.groups.tolist()
    runs, start = [], 0
    for row in range(1, len(groups) + 1):
        if row == len(groups) or groups[row] != groups[start]:
            runs.append((groups[start], start, row))
            start = row
    return runs


def _chunked(cls: type[Editor], lm: LoadedModel, hparams: Any, seed: int, cases: list[EditCase], window: int,
             first: "IndependentEdits") -> "Iterator[EditedCases]":
    group: IndependentEdits | None = first
    for start in range(0, len(cases), window):
        chunk = cases[start : start + window]
        if start > 0:
            torch.manual_seed(seed)
            group = cls.independent(lm, hparams, seed, len(chunk))
        if group is None or len(group.editors) != len(chunk):
            raise RuntimeError(f"{cls.name}.independent gave no editors for {len(chunk)} cases")
        started = time.perf_counter()
        try:
            stats = group.apply(chunk)
        except BaseException:
            group.restore()
            raise
        yield EditedCases(group, chunk, stats, time.perf_counter() - started)


@dataclass(frozen=True)
class EditedCases:
    """Cases whose single edits finished (``Editor.edit_in_parallel``): ``group.editors[i]`` edited ``cases[i]``;
    ``group.logits`` routes rows by ``TFBatch.groups`` (an index into ``cases``); the caller restores ``group``.
    ``seconds`` is the training wall time spent since the previous group was handed out."""

    group: "IndependentEdits"
    cases: list[EditCase]
    stats: list[EditStats]
    seconds: float


class IndependentEdits(ABC):
    """Single edits of several cases at once: case ``i`` of ``apply`` is edited by ``editors[i]`` alone.

    ``logits`` runs the model with every row routed through the editor its ``TFBatch.groups`` entry names;
    ``restore`` restores every editor.
    """

    editors: Sequence[Editor]

    @abstractmethod
    def apply(self, cases: Sequence[EditCase]) -> list[EditStats]: ...

    @abstractmethod
    def logits(self, batch: TFBatch) -> torch.Tensor: ...

    @abstractmethod
    def restore(self) -> None: ...


E = TypeVar("E", bound=type[Editor])
_REGISTRY: dict[str, type[Editor]] = {}


def register_method(name: str) -> Callable[[E], E]:
    def decorate(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise plugins.NameTaken("method", name, _REGISTRY[name].__module__)
        if not dataclasses.is_dataclass(getattr(cls, "hparams_class", None)):
            raise TypeError(f"method {name!r}: hparams_class must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


_loaded = False
#: modules of this package that hold no method: the contract, hyperparameter loading, the statistics cache
_NOT_METHODS = frozenset({"base", "hparams", "stats"})


def _load_methods() -> None:
    """Import every method module in this package (they register themselves), then plug-ins.

    Marked loaded only when every module was tried, so a failure is never silently skipped later.
    """
    global _loaded
    if _loaded:
        return
    package = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in _NOT_METHODS:
            importlib.import_module(f"methods.{info.name}")
    plugins.load_group(ENTRY_POINT_GROUP)
    _loaded = True


def method_names() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def method_source(name: str) -> str:
    """Where a method comes from: "kebench", the plug-in distribution that registered it, or its module."""
    _load_methods()
    module = _REGISTRY[name].__module__  # not get_method: kebench list shows a name a plug-in also claims
    if module.startswith("methods."):
        return "kebench"
    return plugins.distribution_of_module(module) or module


def get_method(name: str) -> type[Editor]:
    _load_methods()
    if name not in _REGISTRY:
        plugin_names = sorted(n for n in _REGISTRY if not _REGISTRY[n].__module__.startswith("methods."))
        builtin = sorted(n for n in _REGISTRY if n not in plugin_names)
        known = ", ".join(builtin) + (f"; plug-ins: {', '.join(plugin_names)}" if plugin_names else "")
        broken = plugins.failures(ENTRY_POINT_GROUP)
        hint = f"; {len(broken)} plug-in(s) failed to load (kebench list shows why)" if broken else ""
        raise KebenchError(f"unknown method '{name}'; known: {known}{hint}")
    plugins.check_unclaimed("method", name)
    return _REGISTRY[name]
