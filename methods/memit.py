"""MEMIT: mass-editing memory in a transformer (Meng et al., ICLR 2023).

Implemented from the definition in ``kmeng01/memit`` (``memit_main.py::execute_memit``, ``compute_z.py``,
``compute_ks.py``) and EasyEdit's port (anchors §3.2):

1. For every case of the edit call, the target hidden state z* at the **last** edited layer L (the
   decoder layer's output, i.e. the residual stream, at the subject's last token) is found by the same
   δ optimisation as ROME's value (``methods.rome.optimize_value`` with site "block").
2. For each edited layer l in increasing order, on the model as updated so far:
   K = the down_proj inputs at the subject's last token, averaged within each context-template group
   and then over groups (``compute_ks``); R = (z* − z_L(current)) / (number of layers left), with
   z_L(current) read on the plain prompt; and

       ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹,   solved in float64 with ``torch.linalg.solve``,

   where C_l = E[k kᵀ] is the layer's second moment (``methods.stats``) and λ = ``mom2_update_weight``.
   ΔW_l is added to ``down_proj.weight`` before the next layer's keys are read.

A batch (B cases in one call) is solved jointly, as MEMIT is meant to be used.  The statistics are
required (there is no switch to run without them, as in the original).  A non-finite z*, key or update
raises ``NonFiniteError`` (the cell is recorded failed, "non-finite"); the paper reports MEMIT failing
numerically on Gemma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from benchmarks.case import EditCase
from methods.stats import StatsNeed, provenance_note, second_moment
from methods.base import EditStats, NonFiniteError, register_method
from methods.hparams import at_depth
from methods.rome import (ValueSettings, WeightEditor, capture, check_locate_then_edit, context_templates,
                          encode_rows, optimize_value, subject_of)
from kebench.core.models import LoadedModel


@dataclass(frozen=True)
class MEMITHParams:
    layers: tuple[int, ...]  # edited down_proj layers, in increasing order; z* lives at the last one
    mom2_update_weight: float = 15000.0  # λ
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1  # -1: the last layer
    v_weight_decay: float = 1.0e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    fact_token: str = "subject_last"
    n_short_templates: int = 0
    n_long_templates: int = 5
    mom2_corpus: str = "shared-offline"
    mom2_n_samples: int = 1000
    mom2_dtype: str = "float32"
    fast_forward: bool = True  # run only the live columns above the z layer (same numbers up to rounding)

    def __post_init__(self) -> None:
        check_locate_then_edit(self)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if self.mom2_update_weight <= 0:  # λ = 0 leaves λC + KKᵀ singular for fewer keys than dimensions
            raise ValueError(f"mom2_update_weight must be > 0, got {self.mom2_update_weight}")

    def value_settings(self) -> ValueSettings:
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_loss_layer, self.v_weight_decay,
                             self.clamp_norm_factor, self.kl_factor, self.early_stop_loss)


@register_method("memit")
class MEMIT(WeightEditor):
    hparams_class = MEMITHParams

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        # about n/6 consecutive layers (at most 5), from just below ROME's layer: 4..8 of 32 and 30, 3..7 of 28
        count = min(5, max(1, math.floor(num_layers / 6 + 0.5)))
        start = max(0, at_depth(num_layers, 0.16)[0] - 1)
        return {"layers": list(range(start, min(num_layers, start + count)))}

    def __init__(self, lm: LoadedModel, hparams: MEMITHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self.groups = context_templates(hparams.n_short_templates, hparams.n_long_templates)
        self.templates = [t for group in self.groups for t in group]
        self.moments = {layer: second_moment(lm, layer, hparams.mom2_corpus, hparams.mom2_n_samples, hparams.mom2_dtype)
                        for layer in hparams.layers}

    @classmethod
    def requirements(cls, hparams: MEMITHParams) -> tuple[StatsNeed, ...]:
        return (StatsNeed(tuple(hparams.layers), hparams.mom2_corpus, hparams.mom2_n_samples, hparams.mom2_dtype),)

    @classmethod
    def provenance(cls, hparams: MEMITHParams) -> str:
        return provenance_note(cls.requirements(hparams)[0])

    def _keys(self, cases: Sequence[EditCase], layer: int) -> torch.Tensor:
        """[n, d_mlp]: per case, the mean over template groups of the mean key within each group."""
        fact = self.hparams.fact_token
        specs = [(t.format(case.prompt), None, subject_of(case), fact) for case in cases for t in self.templates]
        keys, _, _ = capture(self.lm, encode_rows(self.lm, specs), key_layers=[layer])
        per_case = keys[layer].float().reshape(len(cases), len(self.templates), -1)
        sizes = [len(group) for group in self.groups]
        group_means = [chunk.mean(dim=1) for chunk in torch.split(per_case, sizes, dim=1)]
        return torch.stack(group_means, dim=1).mean(dim=1)

    def _current_z(self, cases: Sequence[EditCase], z_layer: int) -> torch.Tensor:
        """[n, d]: the z layer's output at the fact token of each plain prompt, on the current model."""
        specs = [(case.prompt, None, subject_of(case), self.hparams.fact_token) for case in cases]
        _, blocks, _ = capture(self.lm, encode_rows(self.lm, specs), block_layers=[z_layer])
        return blocks[z_layer].float()

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        hp = self.hparams
        layers = list(hp.layers)
        z_layer = layers[-1]
        values = [optimize_value(self.lm, case, self.templates, z_layer, "block", hp.value_settings(), hp.fact_token,
                                 hp.fast_forward) for case in cases]
        targets_z = torch.stack([v.target for v in values])  # [n, d]
        for index, layer in enumerate(layers):
            keys = self._keys(cases, layer).to(torch.float64).T  # [d_mlp, n]
            residual = (targets_z - self._current_z(cases, z_layer)).to(torch.float64).T  # [d, n]
            if not (torch.isfinite(keys).all() and torch.isfinite(residual).all()):
                raise NonFiniteError(f"{self.name}: non-finite keys or residuals at layer {layer}")
            share = residual / (len(layers) - index)  # spread what is left over the remaining layers
            self._add(layer, self._layer_update(layer, keys, share))
        steps = sum(v.steps for v in values)
        loss = sum(v.loss for v in values) / len(values) if values else math.nan
        return EditStats(steps=steps, loss=loss)

    def _layer_update(self, layer: int, keys: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """ΔW_l [d, d_mlp] from the keys K [d_mlp, n] and this layer's share of the residual R [d, n], float64.

        MEMIT: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ (AlphaEdit overrides this with its projected solve).
        """
        moment = self.moments[layer].to(device=keys.device, dtype=torch.float64)
        try:
            adjusted = torch.linalg.solve(self.hparams.mom2_update_weight * moment + keys @ keys.T, keys)  # [d_mlp, n]
        except torch.linalg.LinAlgError as exc:  # a singular system is a numeric failure of the cell
            raise NonFiniteError(f"memit: singular λC + KKᵀ at layer {layer}: {exc}") from None
        return share @ adjusted.T
