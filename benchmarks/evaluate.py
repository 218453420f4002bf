"""Score edit cases under a registered protocol (``benchmarks.protocols``), in as few batches as possible.

``teacher_forced`` (``benchmarks.metrics``) is the default protocol; ``generation``
(``benchmarks.generation``, EasyEdit's vanilla generation) is GRACE's own; ``wild`` (``benchmarks.wild``)
is QAEdit's evaluation in the wild.  Locality compares with the unedited model's outputs under the same
protocol, computed once per model and case (``PreEdit``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, LogitsFn
from benchmarks.protocols import check_protocols, get_protocol
from benchmarks.scoring import PAPER_METRICS, CaseScores, LocalityKey, PreEdit, ScoredModel, locality_items
from kebench.core.errors import KebenchError

__all__ = ["CaseScores", "LocalityKey", "PreEdit", "compute_pre_edit", "score_cases", "with_protocols"]


def compute_pre_edit(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                     cases: Sequence[EditCase], batch_size: int = 32,
                     protocols: Sequence[str] = (PROTOCOL_TEACHER_FORCED,)) -> PreEdit:
    return with_protocols(PreEdit(), logits_fn, tokenizer, pad_token_id, device, cases, protocols, batch_size)


def with_protocols(pre: PreEdit, logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                   cases: Sequence[EditCase], protocols: Sequence[str], batch_size: int = 32) -> PreEdit:
    """``pre`` with the references it lacks for ``cases`` under ``protocols`` added (``logits_fn`` = the
    unedited model); returns ``pre``.

    ``pre`` is a per-model cache (a grid worker keeps one per case selection): a cell scored under a
    protocol the cache lacks (GRACE's generation, a grid's wild) tops it up once, and every later cell of
    that model and those cases reuses the references.
    """
    check_protocols(protocols)
    model = ScoredModel(logits_fn, tokenizer, pad_token_id, device, batch_size)
    for spec in protocols:
        protocol = get_protocol(spec)
        have = pre.references.setdefault(protocol.tag, {})
        missing = [case for case in cases
                   if any(item.locality_key not in have for item in locality_items([case]))]
        if missing:
            have.update(protocol.references(model, missing))
    return pre


def score_cases(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, cases: Sequence[EditCase],
                pre: PreEdit, metrics: Sequence[str] = PAPER_METRICS, batch_size: int = 32,
                protocol: str = PROTOCOL_TEACHER_FORCED, grouped: bool = False) -> list[CaseScores]:
    """Each case's metrics under the current (edited) model and ``protocol``; a metric that does not apply to a
    case is left out of its scores.

    ``grouped``: each case was edited independently (case-parallel single editing); every row's batch
    carries the index of its case in ``cases`` (``TFBatch.groups``) so ``logits_fn`` can route it."""
    scorer = get_protocol(protocol)
    if grouped and not scorer.groups_supported:
        raise KebenchError(f"protocol {scorer.tag!r} cannot score case-parallel groups")
    model = ScoredModel(logits_fn, tokenizer, pad_token_id, device, batch_size)
    return scorer.score(model, cases, pre.reference(scorer.tag), metrics, grouped)
