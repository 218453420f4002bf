"""Scoring protocols: how the edited model's answers are obtained before they are scored.

A protocol turns (prompt, answer) pairs into (predicted tokens, gold tokens) through the edited model's
``logits_fn``; the metrics then compare them the same way under every protocol (``benchmarks.evaluate``),
and locality compares with the unedited model's outputs under the same protocol.  Every row carries its
protocol's name, and tables never average across protocols.

The protocols a cell is scored under come from the cell: the grid's ``protocols:`` (grid-wide or per
benchmark entry; default ``DEFAULT_PROTOCOLS``) unioned with what its method requires
(``Editor.required_protocols``: GRACE adds EasyEdit's ``generation``).  A new protocol is one registered
class::

    from kebench import ScoringProtocol, register_protocol

    @register_protocol("my-protocol")
    class Mine(ScoringProtocol):
        def predict(self, logits_fn, tokenizer, pairs, pad_token_id, device, batch_size=32, groups=None):
            ...  # (predicted tokens, gold tokens) per pair, in order
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, Sequence, TypeVar

import torch

from benchmarks.generation import PROTOCOL_GENERATION, generate
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn, predict
from kebench.core.errors import KebenchError

#: what a cell is scored under when its grid names no protocols (cell ids leave this set out)
DEFAULT_PROTOCOLS: tuple[str, ...] = (PROTOCOL_TEACHER_FORCED,)

Predictions = tuple[list[torch.Tensor], list[torch.Tensor]]


class ScoringProtocol(ABC):
    """How the predictions for scored pairs are obtained (one instance per registered name)."""

    name: ClassVar[str]
    #: it can score several independently edited cases in one batch, each row routed by ``TFBatch.groups``
    #: (the single scenario's ``parallel_cases``); a protocol that cannot makes such cells edit one by one
    groups_supported: ClassVar[bool] = False

    @abstractmethod
    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        """(predicted answer tokens, gold answer tokens) for every (prompt, answer) pair, in order."""

    @property
    def module(self) -> str:
        """Where a plug-in protocol is defined (a grid's workers import it); kebench's own are ``benchmarks.*``."""
        return type(self).__module__


P = TypeVar("P", bound=type[ScoringProtocol])
_REGISTRY: dict[str, ScoringProtocol] = {}


def register_protocol(name: str) -> Callable[[P], P]:
    """Register a ``ScoringProtocol`` subclass under ``name`` (re-registering the same class is a no-op)."""
    def decorate(cls: P) -> P:
        existing = _REGISTRY.get(name)
        if existing is not None and type(existing) is not cls:
            raise ValueError(f"protocol {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return decorate


def get_protocol(name: str) -> ScoringProtocol:
    if name not in _REGISTRY:
        raise KebenchError(f"unknown protocol '{name}'; known: {', '.join(protocol_names())}")
    return _REGISTRY[name]


def protocol_names() -> list[str]:
    return list(_REGISTRY)


def check_protocols(protocols: Sequence[str]) -> None:
    """Every name is a registered protocol, and there is at least one."""
    unknown = [p for p in protocols if p not in _REGISTRY]
    if unknown or not protocols:
        raise KebenchError(f"unknown protocol '{unknown[0] if unknown else ''}'; known: {', '.join(protocol_names())}")


def cell_protocols(requested: Iterable[str] | None, required: Iterable[str] = ()) -> tuple[str, ...]:
    """The protocols a cell is scored under: ``requested`` (None: ``DEFAULT_PROTOCOLS``), then what its method
    requires, each once, in that order."""
    chosen = tuple(dict.fromkeys([*(DEFAULT_PROTOCOLS if requested is None else requested), *required]))
    check_protocols(chosen)
    return chosen


@register_protocol(PROTOCOL_TEACHER_FORCED)
class TeacherForced(ScoringProtocol):
    """EasyEdit's teacher-forced definitions: the argmax at each answer position given the gold prefix
    (``benchmarks.metrics.predict``)."""

    groups_supported = True

    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        return predict(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size, groups=groups)


@register_protocol(PROTOCOL_GENERATION)
class Generation(ScoringProtocol):
    """EasyEdit's vanilla generation: k answer tokens greedily generated from the prompt alone
    (``benchmarks.generation.generate``)."""

    def predict(self, logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
                device: torch.device, batch_size: int = 32, groups: Sequence[int] | None = None) -> Predictions:
        if groups is not None:
            raise KebenchError(f"protocol {self.name} cannot score case-parallel groups")
        return generate(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size)
