"""rank-one-ft: edit a fact by training a rank-one update u vᵀ of one MLP output projection.

The update is added through a forward hook on ``layers[layer].mlp.down_proj``, so the model's weights
are never written: ``restore`` removes the hook and the model is bit for bit what it was.  u starts
at zero (no change before training) and v small and seeded, as LoRA initialises its two factors;
both are trained with Adam on the teacher-forced cross-entropy of the target tokens until it falls
below ``early_stop_loss``.  A continual stream keeps training the same u, v (one rank for all the
stream's facts), which is where it is expected to forget.

This file imports one name, ``kebench``; its YAMLs live in ``hparams/rank-one-ft/<model>.yaml`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kebench import EditCase, Editor, EditStats, KebenchError, encode, register_method


@dataclass(frozen=True)
class RankOneHParams:
    layer: int  # decoder layer whose MLP down-projection output is updated
    lr: float = 0.05
    max_steps: int = 30
    init_scale: float = 0.01  # standard deviation of v's seeded initialisation
    early_stop_loss: float = 0.01


@register_method("rank-one-ft")
class RankOneFT(Editor):
    hparams_class = RankOneHParams

    def __init__(self, lm, hparams: RankOneHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        if not 0 <= hparams.layer < lm.num_layers:
            raise KebenchError(f"rank-one-ft: layer {hparams.layer} is outside the model's 0..{lm.num_layers - 1}")
        projection = lm.layers[hparams.layer].mlp.down_proj
        generator = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter((torch.randn(projection.in_features, generator=generator) * hparams.init_scale)
                              .to(lm.device, lm.dtype))
        self.u = nn.Parameter(torch.zeros(projection.out_features, device=lm.device, dtype=lm.dtype))
        self.handle = projection.register_forward_hook(self._add_update)

    def _add_update(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output + (args[0] @ self.v)[..., None] * self.u

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        batch = encode(self.lm.tokenizer, [(case.prompt, case.target_new) for case in cases],
                       self.lm.pad_token_id).to(self.lm.device)
        predicted_at = batch.answer_mask()[:, 1:]  # position t predicts token t + 1
        targets = batch.input_ids[:, 1:][predicted_at]
        optimizer = torch.optim.Adam([self.u, self.v], lr=self.hparams.lr)
        loss_value, steps = float("inf"), 0
        for steps in range(1, self.hparams.max_steps + 1):
            logits = self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = F.cross_entropy(logits[:, :-1][predicted_at].float(), targets)
            loss_value = float(loss)
            if loss_value < self.hparams.early_stop_loss:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return EditStats(steps=steps, loss=loss_value)

    def restore(self) -> None:
        self.handle.remove()

    def trainable_parameters(self) -> int:
        return self.u.numel() + self.v.numel()
