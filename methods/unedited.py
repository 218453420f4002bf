"""``unedited``: the reference row.  No edit at all, so Rel/Gen/Por are the model's own scores on the
edit prompts and Loc is 1.00 by definition; every table and the leaderboard show it first, so each
method's number has its baseline next to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from benchmarks.case import EditCase
from methods.base import Editor, EditStats, register_method


@dataclass(frozen=True)
class UneditedHParams:
    pass


@register_method("unedited")
class Unedited(Editor):
    hparams_class = UneditedHParams
    needs_hparams_file = False

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        return EditStats(steps=0, loss=0.0)

    def restore(self) -> None:
        pass

    def trainable_parameters(self) -> int:
        return 0
