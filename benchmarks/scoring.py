"""What every scoring protocol shares: the scored model, the scored prompts of a case, and the scores.

A protocol (``benchmarks.protocols``) turns the cases into prompts (``scored_items``), runs them through
``ScoredModel.logits_fn`` and returns one ``CaseScores`` per case; locality compares with the unedited
model's outputs under the same protocol, computed once per model and case (``PreEdit``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn, keyed_mean

LocalityKey = tuple[str, str, int]  # (case_id, locality key, prompt index)
PAPER_METRICS = ("rel", "gen", "loc", "por")


@dataclass(frozen=True)
class ScoredModel:
    """A model as a protocol sees it: its logits function (the edited or the unedited model) and how to
    feed it.  ``batch_size``: rows per forward."""

    logits_fn: LogitsFn
    tokenizer: Any
    pad_token_id: int
    device: torch.device
    batch_size: int = 32


@dataclass(frozen=True)
class CaseScores:
    """One case's scores under one protocol: ``values`` holds (metric, value) for every metric that
    applies to it (names from ``kebench.core.metrics``); ``details`` what the leaderboard's drill-down
    shows for a failed case (the decoded argmax or generated text on the edit prompt, the first changed
    locality answer)."""

    case_id: str
    values: tuple[tuple[str, float], ...]
    protocol: str = PROTOCOL_TEACHER_FORCED
    details: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    def get(self, metric: str) -> float | None:
        return self.as_dict().get(metric)

    @property
    def rel(self) -> float | None:
        return self.get("rel")

    @property
    def gen(self) -> float | None:
        return self.get("gen")

    @property
    def loc(self) -> float | None:
        return self.get("loc")

    @property
    def por(self) -> float | None:
        return self.get("por")

    def with_values(self, extra: dict[str, float]) -> "CaseScores":
        return dataclasses.replace(self, values=self.values + tuple(sorted(extra.items())))


@dataclass(frozen=True)
class PreEdit:
    """The unedited model's references, per protocol tag and locality item (teacher forcing: the argmax
    tokens; ``generation``: the generated tokens; ``wild``: the generated answer text).

    A per-model cache: ``benchmarks.evaluate.with_protocols`` adds, in place, what a cell's protocols
    lack, so a grid worker computes each protocol's references once per model and case, not once per cell.
    """

    references: dict[str, dict[LocalityKey, Any]] = field(default_factory=dict)

    def reference(self, protocol: str) -> Mapping[LocalityKey, Any]:
        return self.references.get(protocol, {})


@dataclass(frozen=True)
class ScoredItem:
    """One scored prompt of a case: ``metric`` is rel, gen, por or loc; ``key``/``index`` locate a
    portability or locality prompt (KnowEdit keys); ``answers`` the gold answer and its aliases."""

    case_index: int
    case_id: str
    metric: str
    key: str
    index: int
    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def locality_key(self) -> LocalityKey:
        return (self.case_id, self.key, self.index)


def _answers(answer: str, aliases: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([answer, *aliases]))


def scored_items(cases: Sequence[EditCase], metrics: Sequence[str] = PAPER_METRICS) -> list[ScoredItem]:
    """Every prompt the given metrics score, case by case (so one case's items are consecutive)."""
    items: list[ScoredItem] = []
    for number, case in enumerate(cases):
        if "rel" in metrics:
            items.append(ScoredItem(number, case.case_id, "rel", "", 0, case.prompt, (case.target_new,)))
        if "gen" in metrics:
            items += [ScoredItem(number, case.case_id, "gen", "", index, rephrase, (case.target_new,))
                      for index, rephrase in enumerate(case.rephrase)]
        if "por" in metrics:
            items += [ScoredItem(number, case.case_id, "por", key, index, item.prompt, _answers(item.answer, item.aliases))
                      for key, prompts in case.portability.items() for index, item in enumerate(prompts)]
        if "loc" in metrics:
            items += locality_items([case], number)
    return items


def locality_items(cases: Sequence[EditCase], first_index: int = 0) -> list[ScoredItem]:
    """The locality prompts of ``cases`` (their answers only supply teacher forcing's prefix)."""
    return [ScoredItem(first_index + number, case.case_id, "loc", key, index, item.prompt, (item.answer,))
            for number, case in enumerate(cases)
            for key, prompts in case.locality.items() for index, item in enumerate(prompts)]


def aggregate(cases: Sequence[EditCase], values: Sequence[tuple[ScoredItem, dict[str, float]]], protocol: str,
              details: Mapping[str, Mapping[str, str]]) -> list[CaseScores]:
    """Per case, each metric's mean over its prompts (rel, gen: plain mean; por, loc and metrics derived from
    them: mean within a key, then over keys).  ``values``: for each scored item, its metric values (the
    item's own metric, and e.g. ``rel_f1`` beside ``rel``)."""
    per_case: dict[str, dict[str, dict[str, list[float]]]] = {case.case_id: {} for case in cases}
    for item, scored in values:
        for metric, value in scored.items():
            per_case[item.case_id].setdefault(metric, {}).setdefault(item.key, []).append(value)
    out = []
    for case in cases:
        found = per_case[case.case_id]
        means = {metric: keyed_mean(by_key) for metric, by_key in found.items()}
        ordered = [(metric, float(means[metric])) for metric in sorted(means, key=_metric_order)
                   if means[metric] is not None]
        out.append(CaseScores(case.case_id, tuple(ordered), protocol,
                              tuple(sorted(details.get(case.case_id, {}).items()))))
    return out


def _metric_order(metric: str) -> tuple[int, str]:
    head = metric.split("_", 1)[0]
    return (PAPER_METRICS.index(head) if head in PAPER_METRICS else len(PAPER_METRICS), metric)
