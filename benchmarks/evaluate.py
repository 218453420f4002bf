"""Score edit cases with the teacher-forced metrics (``benchmarks.metrics``) in as few batches as possible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn, keyed_mean, mean, predict, token_accuracy

LocalityKey = tuple[str, str, int]  # (case_id, locality key, prompt index)


@dataclass(frozen=True)
class CaseScores:
    case_id: str
    rel: float | None
    gen: float | None
    loc: float | None
    por: float | None
    protocol: str = PROTOCOL_TEACHER_FORCED

    def as_dict(self) -> dict[str, float | None]:
        return {"rel": self.rel, "gen": self.gen, "loc": self.loc, "por": self.por}


@dataclass(frozen=True)
class PreEdit:
    """The unedited model's argmax over every locality answer, computed once per model and case."""

    locality_argmax: dict[LocalityKey, torch.Tensor]


def _locality_items(cases: Sequence[EditCase]) -> list[tuple[LocalityKey, tuple[str, str]]]:
    return [
        ((case.case_id, key, index), (item.prompt, item.answer))
        for case in cases
        for key, items in case.locality.items()
        for index, item in enumerate(items)
    ]


def compute_pre_edit(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                     cases: Sequence[EditCase], batch_size: int = 32) -> PreEdit:
    items = _locality_items(cases)
    if not items:
        return PreEdit({})
    predictions, _ = predict(logits_fn, tokenizer, [pair for _, pair in items], pad_token_id, device, batch_size)
    return PreEdit({key: pred for (key, _), pred in zip(items, predictions)})


def score_cases(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, cases: Sequence[EditCase],
                pre: PreEdit, metrics: Sequence[str] = ("rel", "gen", "loc", "por"), batch_size: int = 32) -> list[CaseScores]:
    """Rel/Gen/Loc/Por per case under the current (edited) model; None where a metric does not apply."""
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
    predictions, golds = predict(logits_fn, tokenizer, pairs, pad_token_id, device, batch_size) if pairs else ([], [])

    per_case: dict[str, dict[str, dict[str, list[float]]]] = {c.case_id: {} for c in cases}
    for (case_id, metric, key, index), predicted, gold in zip(slots, predictions, golds):
        if metric == "loc":
            reference = pre.locality_argmax.get((case_id, key, index))
            if reference is None:
                raise KeyError(f"no pre-edit locality output for {case_id}/{key}/{index}")
            value = token_accuracy(predicted, reference)
        else:
            value = token_accuracy(predicted, gold)
        per_case[case_id].setdefault(metric, {}).setdefault(key, []).append(value)

    scores = []
    for case in cases:
        found = per_case[case.case_id]
        scores.append(
            CaseScores(
                case_id=case.case_id,
                rel=mean(found.get("rel", {}).get("", [])),
                gen=mean(found.get("gen", {}).get("", [])),
                loc=keyed_mean(found["loc"]) if "loc" in found else None,
                por=keyed_mean(found["por"]) if "por" in found else None,
            )
        )
    return scores
