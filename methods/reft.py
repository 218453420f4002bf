"""ReFT (LoReFT, Wu et al. 2024) as BaFT's special case W ≡ I, trained with the teacher-forcing loss only.

Φ(h) = h + Rᵀ(A h + b − R h) on the residual stream at the same layers and positions as BaFT, so the two
differ only in the basis weighting and its regularizers (BaFT paper, App. C).
"""

from __future__ import annotations

from dataclasses import dataclass

from methods._representation import EARLY_STOP_RULES, RepresentationEditor
from methods.base import register_method


@dataclass(frozen=True)
class ReFTHParams:
    layers: tuple[int, ...]
    rank: int
    lr: float
    max_steps: int
    last_prompt_tokens: int = 3
    weight_decay: float = 0.0
    early_stop_loss: float = 0.01
    early_stop_on: str = "mean_ce"  # mean_ce | sum_ce | total (no regularizers: total = mean_ce); as BaFT's
    reset_optimizer: bool = True  # a fresh AdamW state per edit call; false keeps it across a continual stream
    lr_source: str = ""  # where ``lr`` comes from; recorded in every row's provenance
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.max_steps < 0 or self.lr <= 0:
            raise ValueError("max_steps must be >= 0 and lr > 0")
        if self.early_stop_on not in EARLY_STOP_RULES:
            raise ValueError(f"early_stop_on must be one of {', '.join(EARLY_STOP_RULES)}, got {self.early_stop_on!r}")


@register_method("reft")
class ReFT(RepresentationEditor):
    hparams_class = ReFTHParams
    gated = False

    @classmethod
    def provenance(cls, hparams: ReFTHParams) -> str:
        return (f"reft: early stop={hparams.early_stop_on}<{hparams.early_stop_loss:g}; "
                f"lr_source={hparams.lr_source or 'unstated'}")
