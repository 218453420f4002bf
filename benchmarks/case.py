"""The common record every benchmark loader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


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
    locality: Mapping[str, tuple[PromptAnswer, ...]] = field(default_factory=dict)
    portability: Mapping[str, tuple[PromptAnswer, ...]] = field(default_factory=dict)
    irrelevant: tuple[PromptAnswer, ...] = ()
