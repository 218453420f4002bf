"""The common record every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, TypeVar

V = TypeVar("V")


class FrozenMap(Mapping[str, V]):
    """A read-only, hashable mapping: ``EditCase`` is frozen all the way down, so cases can be set
    members and cache keys, and no scorer can change a case it was handed."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: Mapping[str, V] | None = None) -> None:
        self._items = tuple((items or {}).items())
        self._index = dict(self._items)

    def __getitem__(self, key: str) -> V:
        return self._index[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt with its gold answer; ``aliases`` keeps every accepted answer (``answer`` is the first)."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditCase:
    """One edit request and everything needed to score it.

    ``locality`` and ``portability`` map a key (``"nq"``, ``"Relation_Specificity"``, ...) to its
    prompts; metrics average within a key, then over keys.  ``irrelevant`` holds training-only texts
    unrelated to the edit (BaFT's locality regularizer, WISE's ``loc_prompts``); they are never the
    texts that locality is evaluated on.
    """

    case_id: str
    prompt: str
    target_new: str
    ground_truth: tuple[str, ...] = ()
    subject: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: Mapping[str, tuple[PromptAnswer, ...]] = field(default_factory=FrozenMap)
    portability: Mapping[str, tuple[PromptAnswer, ...]] = field(default_factory=FrozenMap)
    irrelevant: tuple[PromptAnswer, ...] = ()

    def __post_init__(self) -> None:
        # Loaders pass plain dicts and lists; freeze them so the case is immutable and hashable.
        for name in ("locality", "portability"):
            value = getattr(self, name)
            if not isinstance(value, FrozenMap):
                object.__setattr__(self, name, FrozenMap({k: tuple(v) for k, v in value.items()}))
        for name in ("ground_truth", "rephrase", "irrelevant"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
