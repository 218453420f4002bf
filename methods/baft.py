"""BaFT: basis-level representation fine-tuning (Liu et al., ICLR 2025).

Φ(h) = h + Rᵀ W(h)(A h + b − R h) on the residual stream, with one logistic regression per basis for
W(h) (paper §2.3, App. C).  The training loss (§2.4, Eq. 4) is

    L = L_CE + s_bal · R_bal + s_loc · R_loc,

* L_CE: teacher-forcing cross-entropy on the target tokens (mean over tokens);
* R_bal, the incremental load balancing: with w̄_k(t) the mean weight of basis k over the selected
  positions of the current and all past edits and w̄(t) = (1/r) Σ_k w̄_k(t),
  ``balance_form: printed``: Σ_k (w̄_k(t) − w̄(t))² / ((r − 1) w̄(t)), the equation as printed in §2.4;
  ``balance_form: cv2``: Σ_k (w̄_k(t) − w̄(t))² / ((r − 1) w̄(t)²), the squared coefficient of variation
  the text names (scale-invariant: shrinking every weight does not lower it).
  w̄(t) is floored at ``MIN_MEAN_WEIGHT``.  Past edits enter as constants: only the current edit's weights
  get a gradient.  It is averaged over the intervened layers.  ``balance_single: off`` leaves R_bal out
  while the running means cover a single fact (one case in the call and no past edit: single editing, and
  the first edit of a continual stream), the paper motivating it for "editing multiple pieces of knowledge";
* R_loc, the locality margin, when the cases carry irrelevant texts:
  mean[max(0, w(h_ir) − α)] + mean[max(0, β − w(h))] + max(0, γ − (mean max_k w_k(h) − mean max_k w_k(h_ir))),
  means over the selected positions and bases, averaged over layers.

"In execution, we rescale the three terms to the same magnitude" — how is not said; ``balancing`` chooses
the scales s (``scale_floor`` floors every denominator):

* ``per_step`` (the default, chosen on SmolLM2's ZsRE dev split): s = stop_grad(CE / max(term, floor)) at
  every step.  Above the floor the regularizer's gradient is CE · ∇log(term), which grows as the term
  shrinks; the floor caps it at CE · ‖∇term‖ / floor, and below the floor it falls to 0 with ∇term
  (without a floor it is unbounded as the term → 0);
* ``fixed``: s_bal = ``lambda_bal``, s_loc = ``lambda_loc`` (Eq. 4 with constant weights).
* ``frozen_at_start``: s = CE₀ / max(term₀, floor) from the first step of each edit call, then held for the
  call: the terms start at the CE's magnitude and their gradients stay proportional to ∇term.

Early stopping (``early_stop_on``) compares ``early_stop_loss`` with the mean CE, the CE summed over target
tokens (the paper's L_1), or the whole training loss.  In continual editing the same intervention keeps
training across edits, with a fresh AdamW state per edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from benchmarks.case import EditCase
from methods._representation import EARLY_STOP_RULES, RepresentationEditor
from methods.base import register_method
from kebench.core.errors import KebenchError

BALANCINGS = ("per_step", "fixed", "frozen_at_start")
BALANCE_FORMS = ("printed", "cv2")
#: floor on w̄(t), the denominator of R_bal (all gates at 0 would otherwise divide by zero)
MIN_MEAN_WEIGHT = 1e-6


@dataclass(frozen=True)
class BaFTHParams:
    layers: tuple[int, ...]  # decoder layers whose output (the residual stream) is intervened on
    rank: int  # subspace rank r
    lr: float
    max_steps: int
    last_prompt_tokens: int = 3  # intervened prompt positions (all answer positions are intervened too)
    weight_decay: float = 0.0
    early_stop_loss: float = 0.01
    early_stop_on: str = "mean_ce"  # mean_ce | sum_ce | total (see the module docstring)
    reset_optimizer: bool = True  # a fresh AdamW state per edit call; false keeps it across a continual stream
    alpha: float = 0.01  # irrelevant weights should be <= alpha
    beta: float = 0.05  # edit weights should be >= beta
    gamma: float = 0.02  # max edit weight should exceed max irrelevant weight by gamma
    load_balancing: bool = True
    locality_reg: bool = True  # used only when the cases carry irrelevant texts
    balancing: str = "per_step"  # per_step | fixed | frozen_at_start: how Eq. 4's terms are weighted
    lambda_bal: float = 1.0  # balancing: fixed
    lambda_loc: float = 1.0  # balancing: fixed
    scale_floor: float = 1e-2  # per_step / frozen_at_start: the scale's denominator is max(term, scale_floor)
    balance_form: str = "printed"  # printed (÷ w̄, §2.4's equation) | cv2 (÷ w̄², the text's "squared CV")
    balance_single: bool = False  # R_bal while the running means cover one fact only (YAML on/off)
    lr_source: str = ""  # where ``lr`` comes from; recorded in every row's provenance
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.rank < 2:
            raise ValueError(f"rank must be >= 2 for BaFT's load balancing, got {self.rank}")
        if self.max_steps < 0 or self.lr <= 0:
            raise ValueError("max_steps must be >= 0 and lr > 0")
        for name, value, allowed in (("balancing", self.balancing, BALANCINGS),
                                     ("balance_form", self.balance_form, BALANCE_FORMS),
                                     ("early_stop_on", self.early_stop_on, EARLY_STOP_RULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.scale_floor <= 0:
            raise ValueError(f"scale_floor must be > 0, got {self.scale_floor}")
        if self.lambda_bal < 0 or self.lambda_loc < 0:
            raise ValueError("lambda_bal and lambda_loc must be >= 0")


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
        self.facts_seen = 0  # edit rows (cases) of past edit calls
        self._frozen_scales: dict[str, float] = {}

    @classmethod
    def provenance(cls, hparams: BaFTHParams) -> str:
        hp = hparams
        if hp.balancing == "fixed":
            balancing = f"fixed(lambda_bal={hp.lambda_bal:g}, lambda_loc={hp.lambda_loc:g})"
        else:
            balancing = f"{hp.balancing}(floor={hp.scale_floor:g})"
        return (f"baft: balancing={balancing}; R_bal form={hp.balance_form}; "
                f"balance_single={'on' if hp.balance_single else 'off'}; "
                f"early stop={hp.early_stop_on}<{hp.early_stop_loss:g}; lr_source={hp.lr_source or 'unstated'}")

    def gate_weights(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """[len(pairs), len(layer_ids), rank] float32 on the CPU: w_k(h) of every basis at every intervened
        layer, averaged over the intervened positions of each (prompt, answer) pair (the last
        ``last_prompt_tokens`` prompt tokens and every answer token), under the current (edited)
        intervention, computed without gradients (the paper's Fig. 2 quantity, per input)."""
        return self.mean_basis_weights(pairs)

    def paper_parameters(self) -> int:
        """Table 3 prints 606,256 for BaFT on LLaMA-2 (d = 4096, r = 12, 4 layers) = 4·(3rd + d + r), while
        §2.3's R, A, b and one logistic regression with bias per basis make r(3d + 2) per layer (what
        ``trainable_parameters`` counts); the paper contradicts itself, so both are reported."""
        d, r = self.lm.hidden_size, self.hparams.rank
        return len(self.layer_ids) * (3 * r * d + d + r)

    def artifacts(self, cases: Sequence[EditCase]) -> dict:
        """The paper's Fig. 2 data for this stream: per basis, the mean gate weight (over the stream's cases
        and the intervened layers) on the edit prompts with their targets, on the rephrased prompts with
        the targets, and on the unrelated (locality) prompts with their answers."""
        inputs = {
            "edit": [(case.prompt, case.target_new) for case in cases],
            "rephrase": [(case.rephrase[0], case.target_new) for case in cases if case.rephrase],
            "unrelated": [(items[0].prompt, items[0].answer) for case in cases for items in case.locality.values() if items],
        }
        kinds = [kind for kind, pairs in inputs.items() if pairs]
        weights = self.gate_weights([pair for kind in kinds for pair in inputs[kind]])  # one pass for the three kinds
        gates, start = {}, 0
        for kind in kinds:
            gates[kind] = weights[start:start + len(inputs[kind])].mean(dim=0).tolist()
            start += len(inputs[kind])
        return {"gate_weights": {"layers": list(self.layer_ids), **gates}}

    def irrelevant_pairs(self, cases: Sequence[EditCase]) -> list[tuple[str, str]]:
        if not self.hparams.locality_reg:
            return []
        return [(item.prompt, item.answer) for case in cases for item in case.irrelevant]

    def regularizers(self, weights: dict[int, torch.Tensor], edit_mask: torch.Tensor,
                     irrelevant_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        hp = self.hparams
        terms: dict[str, torch.Tensor] = {}
        facts = int(edit_mask.any(dim=1).sum()) + self.facts_seen
        if hp.load_balancing and (hp.balance_single or facts > 1):
            terms["balance"] = torch.stack([self._balance(weights[layer][edit_mask], layer) for layer in self.layer_ids]).mean()
        if irrelevant_mask is not None and bool(irrelevant_mask.any()):
            terms["locality"] = torch.stack(
                [self._locality(weights[layer][edit_mask], weights[layer][irrelevant_mask]) for layer in self.layer_ids]
            ).mean()
        return terms

    def combine_loss(self, ce: torch.Tensor, terms: dict[str, torch.Tensor], first_step: bool) -> torch.Tensor:
        if first_step:
            self._frozen_scales = {}
        loss = ce
        for name, term in terms.items():
            loss = loss + self._scale(name, term, ce) * term
        return loss

    def _scale(self, name: str, term: torch.Tensor, ce: torch.Tensor) -> torch.Tensor | float:
        """The weight of one regularizer in the loss (a constant: no gradient flows through it)."""
        hp = self.hparams
        if hp.balancing == "fixed":
            return hp.lambda_bal if name == "balance" else hp.lambda_loc
        if hp.balancing == "per_step":
            return ce.detach() / max(float(term.detach()), hp.scale_floor)
        if name not in self._frozen_scales:  # frozen_at_start: the first step of this edit call
            self._frozen_scales[name] = float(ce.detach()) / max(float(term.detach()), hp.scale_floor)
        return self._frozen_scales[name]

    def _balance(self, current: torch.Tensor, layer: int) -> torch.Tensor:
        """R_bal for one layer; ``current`` is [positions, r] of this edit (with gradient)."""
        total = current.sum(dim=0) + self.weight_sums[layer].to(current.dtype)
        mean_per_basis = total / max(current.shape[0] + self.weight_count, 1)
        overall = mean_per_basis.mean()
        rank = mean_per_basis.numel()
        spread = ((mean_per_basis - overall) ** 2).sum() / (rank - 1)
        denominator = overall.clamp_min(MIN_MEAN_WEIGHT)  # w̄ = 0 (every gate shut) would divide by zero
        if self.hparams.balance_form == "cv2":
            return spread / denominator**2
        return spread / denominator

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
        self.facts_seen += int(edit_mask.any(dim=1).sum())

    def basis_weight_means(self) -> dict[int, list[float]]:
        """w̄_k over every edit so far, per layer (the paper's Fig. 2 quantity)."""
        if self.weight_count == 0:
            raise KebenchError("no edit applied yet")
        return {layer: (sums / self.weight_count).tolist() for layer, sums in self.weight_sums.items()}
