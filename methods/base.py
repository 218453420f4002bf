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
import importlib
import math
import pkgutil
import sys
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

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

    def artifacts(self, cases: Sequence[EditCase]) -> dict[str, Any]:
        """Small JSON-ready data about the edited model, taken after a stream's edits and before restore
        (BaFT: per-basis gate weights on edited, rephrased and unrelated inputs); stored per cell."""
        return {}


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
    return hparams_root(method) / method / f"{model}.yaml"


SCENARIO_BLOCKS = ("single", "continual", "batched")


def load_hparams(method: str, model: str, scenario: str | None = None, overrides: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> Any:
    """The method's dataclass filled from its YAML for ``model``, then ``overrides``; unknown keys are errors.

    A YAML may hold blocks named after a scenario kind (``batched: {lr: 1.0e-4, max_steps: 70}``) whose
    values replace the top-level ones when that scenario runs, as the paper's Table 5 does.
    """
    editor = get_method(method)
    cls = editor.hparams_class
    source = Path(path) if path is not None else hparams_path(method, model)
    if path is None and not editor.needs_hparams_file and not source.is_file():
        return build_hparams(cls, dict(overrides or {}), where=f"method '{method}'")
    if not source.is_file():
        raise KebenchError(f"no hyperparameters for method '{method}' on model '{model}': {source} is missing")
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
    values = {key: value for key, value in raw.items() if key not in SCENARIO_BLOCKS}
    for block in SCENARIO_BLOCKS:
        if block in raw and not isinstance(raw[block], dict):
            raise KebenchError(f"{source}: '{block}' should be a mapping of hyperparameters for that scenario")
    if scenario is not None:
        values.update(raw.get(scenario) or {})
    values.update(overrides or {})
    return build_hparams(cls, values, where=str(source))


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
