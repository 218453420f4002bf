"""The editor contract, the method registry and hyperparameter loading.

A method is one module: an ``Editor`` subclass registered with ``@register_method("name")``, one frozen
hyperparameter dataclass, and one YAML per model under ``methods/hparams/<name>/<model>.yaml``.
Methods outside this package register through the ``kebench.methods`` entry-point group.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
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
from orchestrator.errors import KebenchError
from orchestrator.models import LoadedModel

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

    @classmethod
    def provenance(cls, hparams: Any) -> str:
        """One line on what the numbers depend on beyond model, data and hyperparameters (e.g. the corpus of
        precomputed statistics), added to every result row's provenance; "" when there is nothing."""
        return ""

    def logits(self, batch: TFBatch) -> torch.Tensor:
        return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


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
    """Import every method module in this package (they register themselves), then plug-ins."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"methods.{info.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def method_names() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Editor]:
    _load_methods()
    if name not in _REGISTRY:
        raise KebenchError(f"unknown method '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- hyperparameters

def hparams_path(method: str, model: str) -> Path:
    return HPARAMS_DIR / method / f"{model}.yaml"


SCENARIO_BLOCKS = ("single", "continual", "batched")


def load_hparams(method: str, model: str, scenario: str | None = None, overrides: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> Any:
    """The method's dataclass filled from its YAML for ``model``, then ``overrides``; unknown keys are errors.

    A YAML may hold blocks named after a scenario kind (``batched: {lr: 1.0e-4, max_steps: 70}``) whose
    values replace the top-level ones when that scenario runs, as the paper's Table 5 does.
    """
    cls = get_method(method).hparams_class
    source = path or hparams_path(method, model)
    if not source.is_file():
        raise KebenchError(f"no hyperparameters for method '{method}' on model '{model}': {source} is missing")
    with open(source, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            raise KebenchError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
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
            return float(value)
        except (TypeError, ValueError):
            raise KebenchError(f"{where} should be a number, got {value!r}") from None
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
