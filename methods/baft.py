"""BaFT: basis-level representation fine-tuning (Liu et al., ICLR 2025).

Φ(h) = h + Rᵀ W(h)(A h + b − R h) on the residual stream, with one logistic regression per basis for
W(h) (paper §2.3, App. C).  The training loss (§2.4, Eq. 4) is

    L = L_CE + R_bal + R_loc,

* L_CE: teacher-forcing cross-entropy on the target tokens (mean over tokens);
* R_bal, the incremental load balancing: with w̄_k(t) the mean weight of basis k over the selected
  positions of the current and all past edits, Σ_k (w̄_k(t) − w̄(t))² / ((r − 1) w̄(t)), where
  w̄(t) = (1/r) Σ_k w̄_k(t).  Past edits enter as constants: only the current edit's weights get a
  gradient.  It is averaged over the intervened layers;
* R_loc, the locality margin, when the cases carry irrelevant texts:
  mean[max(0, w(h_ir) − α)] + mean[max(0, β − w(h))] + max(0, γ − (mean max_k w_k(h) − mean max_k w_k(h_ir))),
  means over the selected positions and bases, averaged over layers.

R_bal and R_loc are rescaled to the CE's magnitude at every step (see ``_representation._same_magnitude``).
Early stopping reads the CE (< ``early_stop_loss``).  In continual editing the same intervention keeps
training across edits, with a fresh AdamW state per edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from benchmarks.case import EditCase
from methods._representation import RepresentationEditor
from methods.base import register_method
from kebench.core.errors import KebenchError


@dataclass(frozen=True)
class BaFTHParams:
    layers: tuple[int, ...]  # decoder layers whose output (the residual stream) is intervened on
    rank: int  # subspace rank r
    lr: float
    max_steps: int
    last_prompt_tokens: int = 3  # intervened prompt positions (all answer positions are intervened too)
    weight_decay: float = 0.0
    early_stop_loss: float = 0.01
    reset_optimizer: bool = True  # a fresh AdamW state per edit call; false keeps it across a continual stream
    alpha: float = 0.01  # irrelevant weights should be <= alpha
    beta: float = 0.05  # edit weights should be >= beta
    gamma: float = 0.02  # max edit weight should exceed max irrelevant weight by gamma
    load_balancing: bool = True
    locality_reg: bool = True  # used only when the cases carry irrelevant texts
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.rank < 2:
            raise ValueError(f"rank must be >= 2 for BaFT's load balancing, got {self.rank}")
        if self.max_steps < 0 or self.lr <= 0:
            raise ValueError("max_steps must be >= 0 and lr > 0")


@register_method("baft")
class BaFT(RepresentationEditor):
    hparams_class = BaFTHParams
    gated = True

    def __init__(self, lm, hparams: BaFTHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        rank = hparams.rank
        # Running sums for R_bal: Σ of each basis weight over past edits' selected positions, and their count.
        self.weight_sums = {layer: torch.zeros(rank, dtype=torch.float64, device=lm.device) for layer in self.layer_ids}
        self.weight_count = 0

    def irrelevant_pairs(self, cases: Sequence[EditCase]) -> list[tuple[str, str]]:
        if not self.hparams.locality_reg:
            return []
        return [(item.prompt, item.answer) for case in cases for item in case.irrelevant]

    def regularizers(self, weights: dict[int, torch.Tensor], edit_mask: torch.Tensor,
                     irrelevant_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        hp = self.hparams
        terms: dict[str, torch.Tensor] = {}
        if hp.load_balancing:
            terms["balance"] = torch.stack([self._balance(weights[layer][edit_mask], layer) for layer in self.layer_ids]).mean()
        if irrelevant_mask is not None and bool(irrelevant_mask.any()):
            terms["locality"] = torch.stack(
                [self._locality(weights[layer][edit_mask], weights[layer][irrelevant_mask]) for layer in self.layer_ids]
            ).mean()
        return terms

    def _balance(self, current: torch.Tensor, layer: int) -> torch.Tensor:
        """R_bal for one layer; ``current`` is [positions, r] of this edit (with gradient)."""
        total = current.sum(dim=0) + self.weight_sums[layer].to(current.dtype)
        mean_per_basis = total / (current.shape[0] + self.weight_count)
        overall = mean_per_basis.mean()
        rank = mean_per_basis.numel()
        return ((mean_per_basis - overall) ** 2).sum() / ((rank - 1) * overall)

    def _locality(self, edit: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        irrelevant_low = torch.relu(irrelevant - hp.alpha).mean()
        edit_high = torch.relu(hp.beta - edit).mean()
        gap = torch.relu(hp.gamma - (edit.max(dim=-1).values.mean() - irrelevant.max(dim=-1).values.mean()))
        return irrelevant_low + edit_high + gap

    def after_edit(self, weights: dict[int, torch.Tensor], edit_mask: torch.Tensor) -> None:
        for layer in self.layer_ids:
            selected = weights[layer][edit_mask]
            self.weight_sums[layer] += selected.sum(dim=0).to(torch.float64)
        self.weight_count += int(edit_mask.sum())

    def basis_weight_means(self) -> dict[int, list[float]]:
        """w̄_k over every edit so far, per layer (the paper's Fig. 2 quantity)."""
        if self.weight_count == 0:
            raise KebenchError("no edit applied yet")
        return {layer: (sums / self.weight_count).tolist() for layer, sums in self.weight_sums.items()}
