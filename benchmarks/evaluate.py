"""Score edit cases in as few batches as possible, under a registered protocol (``benchmarks.protocols``).

``teacher_forced`` (``benchmarks.metrics``) is the default protocol; ``generation``
(``benchmarks.generation``, EasyEdit's vanilla generation) is GRACE's own.  All protocols score the same
answer tokens; only how the predictions are obtained differs, and locality compares with the unedited
model's outputs under the same protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn, keyed_mean, mean, token_accuracy
from benchmarks.protocols import check_protocols, get_protocol
from kebench.core.errors import KebenchError

LocalityKey = tuple[str, str, int]  # (case_id, locality key, prompt index)


@dataclass(frozen=True)
class CaseScores:
    """One case's scores under one protocol: ``values`` holds (metric, value) for every metric that
    applies to it (names from ``kebench.core.metrics``); ``details`` what the leaderboard's drill-down
    shows for a failed case (the decoded argmax tokens on the edit prompt, the first changed locality
    answer)."""

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
    """The unedited model's locality outputs, computed once per model and case: per protocol, the predicted
    tokens of every locality item (teacher-forced argmax; for ``generation``, the greedily generated tokens)."""

    references: Mapping[str, Mapping[LocalityKey, torch.Tensor]] = field(default_factory=dict)

    def reference(self, protocol: str) -> Mapping[LocalityKey, torch.Tensor]:
        return self.references.get(protocol, {})


def _locality_items(cases: Sequence[EditCase]) -> list[tuple[LocalityKey, tuple[str, str]]]:
    return [
        ((case.case_id, key, index), (item.prompt, item.answer))
        for case in cases
        for key, items in case.locality.items()
        for index, item in enumerate(items)
    ]


def compute_pre_edit(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                     cases: Sequence[EditCase], batch_size: int = 32,
                     protocols: Sequence[str] = (PROTOCOL_TEACHER_FORCED,)) -> PreEdit:
    return with_protocols(PreEdit(), logits_fn, tokenizer, pad_token_id, device, cases, protocols, batch_size)


def with_protocols(pre: PreEdit, logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                   cases: Sequence[EditCase], protocols: Sequence[str], batch_size: int = 32) -> PreEdit:
    """``pre`` plus the locality outputs it lacks for ``cases`` under ``protocols`` (``logits_fn`` = unedited model).

    A cached ``PreEdit`` built for one protocol is topped up, not recomputed, when a cell scored under
    another (GRACE's generation) runs on the same cases; ``pre`` itself is not modified.
    """
    check_protocols(protocols)
    references = dict(pre.references)
    topped_up = False
    for protocol in protocols:
        have = references.get(protocol, {})
        missing = [(key, pair) for key, pair in _locality_items(cases) if key not in have]
        if missing:
            outputs = _locality_outputs(protocol, logits_fn, tokenizer, pad_token_id, device, missing, batch_size)
            references[protocol] = {**have, **outputs}
            topped_up = True
    return PreEdit(references) if topped_up else pre


def _locality_outputs(protocol: str, logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                      items: list[tuple[LocalityKey, tuple[str, str]]], batch_size: int) -> dict[LocalityKey, torch.Tensor]:
    outputs, _ = get_protocol(protocol).predict(logits_fn, tokenizer, [pair for _, pair in items], pad_token_id,
                                                device, batch_size)
    return {key: output for (key, _), output in zip(items, outputs)}


def score_cases(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, cases: Sequence[EditCase],
                pre: PreEdit, metrics: Sequence[str] = ("rel", "gen", "loc", "por"), batch_size: int = 32,
                protocol: str = PROTOCOL_TEACHER_FORCED, grouped: bool = False) -> list[CaseScores]:
    """Rel/Gen/Loc/Por per case under the current (edited) model; None where a metric does not apply.

    ``grouped``: each case was edited independently (case-parallel single editing); every row's batch
    carries the index of its case in ``cases`` (``TFBatch.groups``) so ``logits_fn`` can route it."""
    check_protocols((protocol,))
    scorer = get_protocol(protocol)
    if grouped and not scorer.groups_supported:
        raise KebenchError(f"protocol {protocol!r} cannot score case-parallel groups")
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[str, str, str, int]] = []  # (case_id, metric, key, index) per pair
    for case in cases:
        if "rel" in metrics:
            pairs.append((case.prompt, case.target_new))
            slots.append((case.case_id, "rel", "", 0))
        if "gen" in metrics:
            for index, rephrase in enumerate(case.rephrase):
                pairs.append((rephrase, case.target_new))
                slots.append((case.case_id, "gen", "", index))
        if "por" in metrics:
            for key, items in case.portability.items():
                for index, item in enumerate(items):
                    pairs.append((item.prompt, item.answer))
                    slots.append((case.case_id, "por", key, index))
        if "loc" in metrics:
            for key, items in case.locality.items():
                for index, item in enumerate(items):
                    pairs.append((item.prompt, item.answer))
                    slots.append((case.case_id, "loc", key, index))
    groups = None
    if grouped:
        index_of = {case.case_id: index for index, case in enumerate(cases)}
        groups = [index_of[case_id] for case_id, _, _, _ in slots]
    predictions, golds = (scorer.predict(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size, groups=groups)
                          if pairs else ([], []))
    references = pre.reference(protocol)

    per_case: dict[str, dict[str, dict[str, list[float]]]] = {c.case_id: {} for c in cases}
    details: dict[str, dict[str, str]] = {c.case_id: {} for c in cases}
    for (case_id, metric, key, index), predicted, gold, (prompt, answer) in zip(slots, predictions, golds, pairs):
        if metric == "loc":
            reference = references.get((case_id, key, index))
            if reference is None:
                raise KeyError(f"no pre-edit {protocol} locality output for {case_id}/{key}/{index}")
            value = token_accuracy(predicted, reference)
            if value < 1.0 and "loc_prompt" not in details[case_id]:
                details[case_id].update(loc_prompt=prompt, loc_output=_decode(tokenizer, predicted),
                                        loc_unedited=_decode(tokenizer, reference))
        else:
            value = token_accuracy(predicted, gold)
            if metric == "rel":
                details[case_id]["rel_output"] = _decode(tokenizer, predicted)
        per_case[case_id].setdefault(metric, {}).setdefault(key, []).append(value)

    scores = []
    for case in cases:
        found = per_case[case.case_id]
        values = {
            "rel": mean(found.get("rel", {}).get("", [])),
            "gen": mean(found.get("gen", {}).get("", [])),
            "loc": keyed_mean(found["loc"]) if "loc" in found else None,
            "por": keyed_mean(found["por"]) if "por" in found else None,
        }
        scores.append(CaseScores(case.case_id, tuple((m, v) for m, v in values.items() if v is not None), protocol,
                                 tuple(sorted(details[case.case_id].items()))))
    return scores


def _decode(tokenizer, tokens: torch.Tensor) -> str:
    """The argmax (or generated) answer tokens as text, for the drill-down."""
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
