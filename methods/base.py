"""The editor contract, the method registry and hyperparameter loading.

A method is one module: an ``Editor`` subclass registered with ``@register_method("name")``, one frozen
hyperparameter dataclass, and one YAML per model.  kebench's own methods keep their YAMLs under
``methods/hparams/<name>/<model>.yaml``; a plug-in's live next to its own module
(``<plugin package>/hparams/<name>/<model>.yaml``, or wherever its ``hparams_dir`` class attribute
points).  Methods outside this package register through the ``kebench.methods`` entry-point group;
one that fails to import is reported (``kebench.core.plugins.failures``) and the rest still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import pkgutil
import sys
import time
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

import torch
import yaml

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch
from kebench.core import plugins
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
ENTRY_POINT_GROUP = "kebench.methods"


@dataclass(frozen=True)
class EditStats:
    """What one ``Editor.apply`` call did."""

    steps: int
    loss: float


class NonFiniteError(RuntimeError):
    """An edit produced a non-finite loss or update; the cell is recorded as failed ("non-finite")."""


class Editor(ABC):
    """Edits a loaded model in place and can put it back exactly.

    ``apply`` takes a list of cases as *one* edit call (a single edit, or one batch of a batched
    stream); consecutive calls accumulate (continual editing).  ``restore`` returns the model to the
    state it had when the editor was built, bit for bit.  ``logits`` runs the edited model on a
    teacher-forced batch; the default is the plain forward pass, which suits editors that change
    weights or hook modules.
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type]
    #: the protocols every case is scored under (``benchmarks.evaluate.PROTOCOLS``); GRACE adds "generation"
    protocols: ClassVar[tuple[str, ...]] = ("teacher_forced",)
    #: where this method's ``<name>/<model>.yaml`` files live; None: ``hparams/`` beside the module that
    #: defines the class (kebench's own methods: ``methods/hparams``)
    hparams_dir: ClassVar[str | Path | None] = None
    #: False for methods whose hyperparameters all have defaults and need no YAML (``unedited``)
    needs_hparams_file: ClassVar[bool] = True
    #: True for methods that change the model's own weights (ROME, MEMIT, FT-L/FT-M): under ``dtype: auto``
    #: on a half-precision model they run with the modules they change in float32 (``lm.edit_dtype``)
    edits_weights: ClassVar[bool] = False

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

    def logits(self, batch: TFBatch) -> torch.Tensor:
        return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any] | None:
        """The layer hyperparameters for a model of ``num_layers`` layers that has no YAML of its own (the rest
        comes from the nearest shipped YAML); None: keep that YAML's.  Built-in methods: ``DEPTH_RULES``."""
        rule = DEPTH_RULES.get(cls.name)
        return rule(num_layers) if rule is not None else None

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
            raise ValueError(f"method {name!r} registered twice")
        if not dataclasses.is_dataclass(getattr(cls, "hparams_class", None)):
            raise TypeError(f"method {name!r}: hparams_class must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


_loaded = False


def _load_methods() -> None:
    """Import every method module in this package (they register themselves), then plug-ins.

    Marked loaded only when every module was tried, so a failure is never silently skipped later.
    """
    global _loaded
    if _loaded:
        return
    package = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"methods.{info.name}")
    plugins.load_group(ENTRY_POINT_GROUP)
    _loaded = True


def method_names() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def method_source(name: str) -> str:
    """Where a method comes from: "kebench", the plug-in distribution that registered it, or its module."""
    module = get_method(name).__module__
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
    return _REGISTRY[name]


# --------------------------------------------------------------------------- hyperparameters

def hparams_root(method: str) -> Path:
    """The folder holding ``<method>/<model>.yaml`` for this method (see ``Editor.hparams_dir``)."""
    cls = get_method(method)
    if cls.hparams_dir is not None:
        return Path(cls.hparams_dir)
    if cls.__module__.startswith("methods."):
        return HPARAMS_DIR
    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None)
    return Path(module_file).resolve().parent / "hparams" if module_file else HPARAMS_DIR


def hparams_path(method: str, model: str) -> Path:
    """The method's own YAML for ``model`` (it may not exist: see ``hparams_origin``)."""
    return hparams_root(method) / method / f"{hparams_file_name(model) or '-'}.yaml"


SCENARIO_BLOCKS = ("single", "continual", "batched")


def load_hparams(method: str, model: str, scenario: str | None = None, overrides: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> Any:
    """The method's dataclass filled from its YAML for ``model``, then ``overrides``; unknown keys are errors.

    A YAML may hold blocks named after a scenario kind (``batched: {lr: 1.0e-4, max_steps: 70}``) whose
    values replace the top-level ones when that scenario runs, as the paper's Table 5 does.  Without a
    YAML for ``model`` the values are derived (``hparams_origin``): the nearest shipped YAML, with the
    layers its depth rule gives for this model and module names in this model's own naming.
    """
    editor = get_method(method)
    cls = editor.hparams_class
    origin = hparams_origin(method, model) if path is None else HparamsOrigin(Path(path))
    if origin.path is None:
        return build_hparams(cls, dict(overrides or {}), where=f"method '{method}'")
    source = origin.path
    raw = read_hparams_file(source)
    values = {key: value for key, value in raw.items() if key not in SCENARIO_BLOCKS}
    if scenario is not None:
        values.update(raw.get(scenario) or {})
    if origin.derived_for is not None:
        values = _derive(editor, values, origin)
    values.update(overrides or {})
    where = str(source) if origin.derived_for is None else f"{source} (derived for model '{model}')"
    return build_hparams(cls, values, where=where)


def read_hparams_file(source: Path) -> dict[str, Any]:
    """A hyperparameter YAML as a mapping (scenario blocks checked); one-line errors naming the file."""
    if not source.is_file():
        raise KebenchError(f"{source}: hyperparameter file not found")
    try:
        with open(source, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise KebenchError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError as exc:
        raise KebenchError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise KebenchError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise KebenchError(f"{source}: expected a mapping of hyperparameters")
    for block in SCENARIO_BLOCKS:
        if block in raw and not isinstance(raw[block], dict):
            raise KebenchError(f"{source}: '{block}' should be a mapping of hyperparameters for that scenario")
    return raw


# --------------------------------------------------------------------------- derived hyperparameters

@dataclass(frozen=True)
class HparamsOrigin:
    """Where a method's hyperparameters for a model come from: ``path`` (None: the dataclass defaults), and
    for a model without its own YAML the facts the layers are derived for (``derived_for``)."""

    path: Path | None
    derived_for: Any = None  # kebench.core.models.ModelFacts of the target model
    source_facts: Any = None  # ... of the model whose YAML ``path`` is

    def describe(self, method: str) -> str:
        """One line for every result row's provenance."""
        if self.path is None:
            return f"hparams: defaults of {method}"
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        shown = _shown_path(self.path)
        if self.derived_for is None:
            return f"hparams: {shown} (sha256 {digest})"
        depth = self.derived_for.num_layers
        rule = get_method(method).layer_rule(depth)
        layers = ", ".join(f"{key}={value}" for key, value in (rule or {}).items())
        how = f"{layers} by {method}'s depth rule for {depth} layers" if rule else f"for a {depth}-layer model"
        return f"hparams: derived from {shown} (sha256 {digest}), {how}"


def _shown_path(path: Path) -> str:
    """A shipped YAML relative to the project (``methods/hparams/...``: the same on every machine; the sha256
    beside it identifies the content), any other file as it is."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


#: per method, its layers as a function of the model's depth: the relative-depth rule its shipped YAMLs
#: follow (``tests/test_any_model.py`` checks each rule against them); ``Editor.layer_rule`` reads it
DEPTH_RULES: dict[str, Callable[[int], dict[str, Any]]] = {}


def depth_rule(*methods: str) -> Callable[[Callable[[int], dict[str, Any]]], Callable[[int], dict[str, Any]]]:
    def decorate(rule: Callable[[int], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
        for name in methods:
            DEPTH_RULES[name] = rule
        return rule
    return decorate


def at_depth(num_layers: int, *fractions: float) -> list[int]:
    """The layers at these fractions of the depth, rounded half up, clipped to 0..num_layers-1, deduplicated."""
    return sorted({min(num_layers - 1, max(0, math.floor(f * num_layers + 0.5))) for f in fractions})


@depth_rule("rome")
def _rome_layers(n: int) -> dict[str, Any]:
    return {"layers": at_depth(n, 0.16)}  # LLaMA-2/3: 5 of 32, SmolLM2: 5 of 30, Gemma: 4 of 28


@depth_rule("memit")
def _memit_layers(n: int) -> dict[str, Any]:
    # about n/6 consecutive layers (at most 5), from just below ROME's layer: 4..8 of 32 and 30, 3..7 of 28
    count = min(5, max(1, math.floor(n / 6 + 0.5)))
    start = max(0, at_depth(n, 0.16)[0] - 1)
    return {"layers": list(range(start, min(n, start + count)))}


@depth_rule("ft-l", "ft-m")
def _ft_layers(n: int) -> dict[str, Any]:
    return {"layers": at_depth(n, 0.66)}  # 21 of 32, 20 of 30, 18 of 28


@depth_rule("grace", "wise", "wise-light")
def _late_layer(n: int) -> dict[str, Any]:
    return {"layer": at_depth(n, 0.84)[0]}  # 27 of 32, 25 of 30, 24 of 28


@depth_rule("melo")
def _melo_layers(n: int) -> dict[str, Any]:
    router = max(0, min(at_depth(n, 0.73)[0], n - 2))  # 23 of 32, 22 of 30, 20 of 28
    return {"router_layer": router, "lora_layers": list(range(router + 1, min(n, router + 3)))}


@depth_rule("baft", "reft")
def _representation_layers(n: int) -> dict[str, Any]:
    return {"layers": at_depth(n, 0.28, 0.56, 0.74, 0.87)}  # 9,18,24,28 of 32; 8,17,22,26 of 30; 8,16,21,24 of 28


def _module_field(name: str) -> bool:
    return name in ("module", "target_modules") or name.endswith("_module") or name.endswith("_modules")


def _derive(editor: type[Editor], values: dict[str, Any], origin: HparamsOrigin) -> dict[str, Any]:
    """Another model's values re-fitted: the method's layers for this depth, module names in its naming."""
    from kebench.core.models import architecture_for_type

    target, source = origin.derived_for, origin.source_facts
    out = dict(values)
    out.update(editor.layer_rule(target.num_layers) or {})
    target_arch = architecture_for_type(target.model_type)
    source_arch = architecture_for_type(getattr(source, "model_type", "llama"))
    if target_arch is not None and target_arch != source_arch:
        for field in dataclasses.fields(editor.hparams_class):  # a default module name needs translating too
            if _module_field(field.name) and field.name not in out and field.default is not dataclasses.MISSING:
                out[field.name] = field.default
        for key, value in list(out.items()):
            if not _module_field(key):
                continue
            if isinstance(value, str):
                out[key] = target_arch.translate(value)
            elif isinstance(value, (list, tuple)):
                out[key] = list(dict.fromkeys(target_arch.translate(v) if isinstance(v, str) else v for v in value))
    return out


def hparams_file_name(model: str) -> str:
    """The YAML stem for a model: its registered name; ``hf:org/name[@rev]`` → ``org--name`` (the Hub cache's
    spelling); a ``path:`` folder has none (its hyperparameters are derived or given with ``--hparams``)."""
    if model.startswith("hf:"):
        return model[3:].partition("@")[0].replace("/", "--")
    if model.startswith("path:"):
        return ""
    return model


def hparams_origin(method: str, model: str) -> HparamsOrigin:
    """Where ``load_hparams(method, model)`` takes its values from: the method's YAML for the model, else
    (for a model whose depth is known) the nearest shipped YAML with derived layers, else an error."""
    from kebench.core.models import model_facts, parse_model_spec

    editor = get_method(method)
    stem = hparams_file_name(model)
    own = hparams_root(method) / method / f"{stem}.yaml" if stem else None
    if own is not None and own.is_file():
        return HparamsOrigin(own)
    if not editor.needs_hparams_file:
        return HparamsOrigin(None)
    try:
        parse_model_spec(model)
    except KebenchError:  # not a model kebench knows: nothing to derive from
        facts = None
    else:
        facts = model_facts(model)  # a spec whose config cannot be read fails here, in one line
    nearest = nearest_hparams_file(method, facts, exclude=model) if facts is not None else None
    if nearest is None:
        where = own if own is not None else hparams_root(method) / method
        raise KebenchError(f"no hyperparameters for method '{method}' on model '{model}': {where} is missing"
                           + ("" if facts is not None else " (and the model's depth is not known to derive them)"))
    return HparamsOrigin(nearest[0], facts, nearest[1])


def nearest_hparams_file(method: str, facts: Any, exclude: str = "") -> tuple[Path, Any] | None:
    """The method's shipped ``<registered model>.yaml`` whose model is nearest in width and depth
    (|log2 hidden ratio| + |log2 layer ratio|; ties: by name), with that model's facts."""
    from kebench.core.models import model_facts, model_names

    folder = hparams_root(method) / method
    best: tuple[float, str, Path, Any] | None = None
    for name in model_names():
        path = folder / f"{name}.yaml"
        other = model_facts(name) if name != exclude and path.is_file() else None
        if other is None:
            continue
        distance = abs(math.log2(facts.hidden_size / other.hidden_size)) + abs(math.log2(facts.num_layers / other.num_layers))
        if best is None or (distance, name) < best[:2]:
            best = (distance, name, path, other)
    return None if best is None else (best[2], best[3])


def describe_hparams(method: str, model: str, scenario: str | None = None,
                     overrides: Mapping[str, Any] | None = None, path: Path | None = None) -> tuple[str, Any]:
    """(provenance line, hyperparameters) as ``load_hparams`` would use them (``kebench hparams``)."""
    hparams = load_hparams(method, model, scenario, overrides, path)
    origin = HparamsOrigin(Path(path)) if path is not None else hparams_origin(method, model)
    return origin.describe(method), hparams


def build_hparams(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KebenchError(f"{where}: unknown hyperparameter '{unknown[0]}' for {cls.__name__}; known: {', '.join(fields)}")
    coerced = {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in values.items()}
    missing = [n for n, f in fields.items() if n not in coerced and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KebenchError(f"{where}: missing hyperparameter '{missing[0]}' for {cls.__name__}")
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise KebenchError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string and lists where tuples are wanted; fix both, reject the rest."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KebenchError(f"{where} should be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, where) for v in value)
    if hint is float:
        if isinstance(value, bool):
            raise KebenchError(f"{where} should be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise KebenchError(f"{where} should be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan/inf would only fail deep inside an optimizer or a Ray task
            raise KebenchError(f"{where} should be a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KebenchError(f"{where} should be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise KebenchError(f"{where} should be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise KebenchError(f"{where} should be a string, got {value!r}")
        return value
    return value


def hparams_dict(hparams: Any) -> dict[str, Any]:
    """JSON-ready resolved hyperparameters (tuples as lists), for result rows and the cell hash."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(hparams).items()}
