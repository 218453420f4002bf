"""Scoring protocols: how the edited model's answers are obtained and scored.

A protocol has a name, the metrics it fills, named settings (a frozen dataclass; defaults leave the
protocol's tag, and so every cell id, unchanged), how it computes the unedited model's references once per
model and case (``references``) and how it scores cases through the edited model's logits function
(``score``).  Every row carries its protocol's tag (``kebench.core.protocols``: ``wild`` or
``wild(context=chat)``), and tables never average across tags.

Built in:

* ``teacher_forced`` (the default): EasyEdit's token accuracy given the gold prefix (``benchmarks.metrics``);
* ``generation``: EasyEdit's vanilla generation, k answer tokens generated greedily (GRACE's own protocol,
  ``benchmarks.generation``);
* ``wild``: QAEdit's evaluation in the wild, the answer generated freely and stopped naturally, normalized
  exact match and token F1 (``benchmarks.wild``).

The protocols a cell is scored under come from the cell: the grid's ``protocols:`` (grid-wide or per
benchmark entry; default ``DEFAULT_PROTOCOLS``) unioned with what its method requires
(``Editor.required_protocols``: GRACE adds ``generation``).  A new protocol is one registered class::

    from kebench import ScoringProtocol, register_protocol

    @register_protocol("my-protocol")
    class Mine(ScoringProtocol):
        def references(self, model, cases): ...  # {(case_id, key, index): unedited output} for locality
        def score(self, model, cases, references, metrics, grouped=False): ...  # one CaseScores per case
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

import torch

from benchmarks.case import EditCase
from benchmarks.generation import PROTOCOL_GENERATION, generate
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn, predict, token_accuracy
from benchmarks.scoring import (PAPER_METRICS, CaseScores, LocalityKey, ScoredItem, ScoredModel, aggregate,
                                locality_items, scored_items)
from benchmarks.wild import WildSettings, describe_wild, wild_references, wild_scores
from kebench.core.errors import KebenchError
from kebench.core.protocols import WILD, format_spec, parse_spec

#: what a cell is scored under when its grid names no protocols (cell ids leave this set out)
DEFAULT_PROTOCOLS: tuple[str, ...] = (PROTOCOL_TEACHER_FORCED,)

Predictions = tuple[list[torch.Tensor], list[torch.Tensor]]


class ScoringProtocol(ABC):
    """How cases are scored under one protocol; an instance carries its settings (``settings_class``)."""

    name: ClassVar[str]
    #: the metrics this protocol fills (besides what a benchmark leaves out): its registered metric names
    metrics: ClassVar[tuple[str, ...]] = PAPER_METRICS
    #: it can score several independently edited cases in one batch, each row routed by ``TFBatch.groups``
    #: (the single scenario's ``parallel_cases``); a protocol that cannot makes such cells edit one by one
    groups_supported: ClassVar[bool] = False
    #: a frozen dataclass of named settings, each with a default (None: the protocol has none)
    settings_class: ClassVar[type | None] = None

    def __init__(self, settings: Any = None) -> None:
        if settings is None and self.settings_class is not None:
            settings = self.settings_class()
        self.settings = settings

    @property
    def tag(self) -> str:
        """The row tag: the name, with the settings that differ from their defaults."""
        if self.settings is None:
            return self.name
        default = self.settings_class()  # type: ignore[misc]
        changed = {f.name: getattr(self.settings, f.name) for f in dataclasses.fields(self.settings)
                   if getattr(self.settings, f.name) != getattr(default, f.name)}
        return format_spec(self.name, changed)

    def describe(self, logits_fn: LogitsFn | None = None) -> str:
        """One provenance line on what the numbers depend on (settings, decoding); "" when nothing beyond
        the name.  ``logits_fn``: the edited model's, where the line depends on it (KV cache or re-run)."""
        return ""

    @abstractmethod
    def references(self, model: ScoredModel, cases: Sequence[EditCase]) -> dict[LocalityKey, Any]:
        """The unedited model's output for every locality prompt of ``cases`` (``model`` is the unedited one)."""

    @abstractmethod
    def score(self, model: ScoredModel, cases: Sequence[EditCase], references: Mapping[LocalityKey, Any],
              metrics: Sequence[str] = PAPER_METRICS, grouped: bool = False) -> list[CaseScores]:
        """One ``CaseScores`` per case (tagged ``self.tag``), None-free: a metric that does not apply is left out.

        ``grouped``: each case was edited independently (case-parallel single editing); every row's batch
        carries the index of its case in ``cases`` (``TFBatch.groups``) so ``logits_fn`` can route it."""

    @property
    def module(self) -> str:
        """Where a plug-in protocol is defined (a grid's workers import it); kebench's own are ``benchmarks.*``."""
        return type(self).__module__


P = TypeVar("P", bound=type[ScoringProtocol])
_REGISTRY: dict[str, type[ScoringProtocol]] = {}
_INSTANCES: dict[str, ScoringProtocol] = {}


def register_protocol(name: str) -> Callable[[P], P]:
    """Register a ``ScoringProtocol`` subclass under ``name`` (re-registering the same class is a no-op)."""
    def decorate(cls: P) -> P:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"protocol {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_protocol(spec: str) -> ScoringProtocol:
    """The protocol a tag or spec names (``wild``, ``wild(context=chat)``), with its settings."""
    name, raw = parse_spec(spec)
    if name not in _REGISTRY:
        raise KebenchError(f"unknown protocol '{name}'; known: {', '.join(protocol_names())}")
    cls = _REGISTRY[name]
    settings = _settings(cls, raw, spec)
    instance = cls(settings)
    return _INSTANCES.setdefault(instance.tag, instance)


def protocol_tag(spec: str) -> str:
    """The canonical tag of a spec (settings at their defaults dropped, the rest sorted)."""
    return get_protocol(spec).tag


def protocol_names() -> list[str]:
    return list(_REGISTRY)


def check_protocols(protocols: Sequence[str]) -> None:
    """Every entry names a registered protocol with valid settings, and there is at least one."""
    if not protocols:
        raise KebenchError(f"no protocol given; known: {', '.join(protocol_names())}")
    for spec in protocols:
        get_protocol(spec)


def cell_protocols(requested: Iterable[str] | None, required: Iterable[str] = ()) -> tuple[str, ...]:
    """The tags a cell is scored under: ``requested`` (None: ``DEFAULT_PROTOCOLS``), then what its method
    requires, each once, in that order."""
    chosen = [*(DEFAULT_PROTOCOLS if requested is None else requested), *required]
    check_protocols(chosen)
    return tuple(dict.fromkeys(protocol_tag(spec) for spec in chosen))


def protocol_spec(entry: Any) -> str:
    """A grid's ``protocols:`` entry as a spec: a string, or a one-key mapping ``{wild: {context: chat}}``."""
    if isinstance(entry, Mapping) and len(entry) == 1:
        (name, settings), = entry.items()
        if settings is None:
            settings = {}
        if isinstance(name, str) and isinstance(settings, Mapping):
            return format_spec(name, {str(k): v for k, v in settings.items()})
    if isinstance(entry, str):
        return entry
    raise KebenchError(f"protocol entry {entry!r}: expected a name, NAME(key=value,...) or {{name: {{key: value}}}}")


def _settings(cls: type[ScoringProtocol], raw: Mapping[str, str], spec: str) -> Any:
    """The settings dataclass from a spec's raw strings, each converted to its field's type (int, bool, str)."""
    if cls.settings_class is None:
        if raw:
            raise KebenchError(f"protocol '{spec}': {cls.name} has no settings")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls.settings_class)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            raise KebenchError(f"protocol '{spec}': unknown setting '{key}'; known: {', '.join(fields)}")
        kind = fields[key].type
        values[key] = _convert(kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind)), text, spec, key)
    try:
        return cls.settings_class(**values)
    except ValueError as exc:
        raise KebenchError(f"protocol '{spec}': {exc}") from None


def _convert(kind: str, text: str, spec: str, key: str) -> Any:
    if kind == "bool":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif kind == "int":
        try:
            return int(text)
        except ValueError:
            pass
    elif kind == "str":
        return text
    raise KebenchError(f"protocol '{spec}': setting '{key}' must be {kind}, got '{text}'")


# --------------------------------------------------------------------------- token-level protocols

class TokenProtocol(ScoringProtocol):
    """Protocols that score answer tokens position by position: Rel/Gen/Por = the fraction of answer
    tokens predicted, Loc = the fraction of positions where the edited model agrees with the unedited one
    (EasyEdit's definitions).  Subclasses say how the predicted tokens are obtained (``predict``)."""

    @abstractmethod
    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        """(predicted answer tokens, gold answer tokens) for every (prompt, answer) pair, in order."""

    def references(self, model: ScoredModel, cases: Sequence[EditCase]) -> dict[LocalityKey, Any]:
        items = locality_items(cases)
        if not items:
            return {}
        outputs, _ = self.predict(model.logits_fn, model.tokenizer, [(i.prompt, i.answer) for i in items],
                                  model.pad_token_id, model.device, model.batch_size)
        return {item.locality_key: output for item, output in zip(items, outputs)}

    def score(self, model: ScoredModel, cases: Sequence[EditCase], references: Mapping[LocalityKey, Any],
              metrics: Sequence[str] = PAPER_METRICS, grouped: bool = False) -> list[CaseScores]:
        if grouped and not self.groups_supported:
            raise KebenchError(f"protocol {self.tag} cannot score case-parallel groups")
        items = scored_items(cases, metrics)
        groups = [item.case_index for item in items] if grouped else None
        pairs = [(item.prompt, item.answer) for item in items]
        predictions, golds = (self.predict(model.logits_fn, model.tokenizer, pairs, model.pad_token_id, model.device,
                                           model.batch_size, groups=groups) if pairs else ([], []))
        details: dict[str, dict[str, str]] = {case.case_id: {} for case in cases}
        values: list[tuple[ScoredItem, dict[str, float]]] = []
        for item, predicted, gold in zip(items, predictions, golds):
            found = details[item.case_id]
            if item.metric == "loc":
                reference = references.get(item.locality_key)
                if reference is None:
                    raise KeyError(f"no pre-edit {self.tag} locality output for {'/'.join(map(str, item.locality_key))}")
                value = token_accuracy(predicted, reference)
                if value < 1.0 and "loc_prompt" not in found:
                    found.update(loc_prompt=item.prompt, loc_output=_decode(model.tokenizer, predicted),
                                 loc_unedited=_decode(model.tokenizer, reference))
            else:
                value = token_accuracy(predicted, gold)
                if item.metric == "rel":
                    found["rel_output"] = _decode(model.tokenizer, predicted)
            values.append((item, {item.metric: value}))
        return aggregate(cases, values, self.tag, details)


def _decode(tokenizer, tokens: torch.Tensor) -> str:
    """The argmax (or generated) answer tokens as text, for the drill-down."""
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=False)


@register_protocol(PROTOCOL_TEACHER_FORCED)
class TeacherForced(TokenProtocol):
    """EasyEdit's teacher-forced definitions: the argmax at each answer position given the gold prefix
    (``benchmarks.metrics.predict``)."""

    groups_supported = True

    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        return predict(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size, groups=groups)


@register_protocol(PROTOCOL_GENERATION)
class Generation(TokenProtocol):
    """EasyEdit's vanilla generation: k answer tokens greedily generated from the prompt alone
    (``benchmarks.generation.generate``)."""

    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        if groups is not None:
            raise KebenchError(f"protocol {self.name} cannot score case-parallel groups")
        return generate(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size)

    def describe(self, logits_fn: LogitsFn | None = None) -> str:
        return (f"protocol {self.tag}: EasyEdit's vanilla generation (k = the answer's token count, greedy, "
                "re-run per step), token accuracy")


# --------------------------------------------------------------------------- evaluation in the wild

@register_protocol(WILD)
class Wild(ScoringProtocol):
    """QAEdit's evaluation in the wild (``benchmarks.wild``): the question in a context, greedy decoding
    stopped at ".", a newline or end-of-text; Rel/Gen/Por = normalized exact match (token F1 beside it),
    Loc = the unrelated prompt's answer unchanged as a string."""

    metrics = ("rel", "gen", "loc", "por", "rel_f1", "gen_f1", "por_f1")
    groups_supported = True
    settings_class = WildSettings

    def references(self, model: ScoredModel, cases: Sequence[EditCase]) -> dict[LocalityKey, Any]:
        return wild_references(model, cases, self.settings)

    def score(self, model: ScoredModel, cases: Sequence[EditCase], references: Mapping[LocalityKey, Any],
              metrics: Sequence[str] = PAPER_METRICS, grouped: bool = False) -> list[CaseScores]:
        return wild_scores(model, cases, references, metrics, self.settings, self.tag, grouped)

    def describe(self, logits_fn: LogitsFn | None = None) -> str:
        return f"protocol {self.tag}: {describe_wild(self.settings, logits_fn)}"
