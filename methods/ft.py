"""FT-L and FT-M: fine-tune one layer's MLP down-projection (Zhu et al. 2020; ROME paper's FT baseline).

Implemented from EasyEdit's ``easyeditor/models/ft/ft_main.py`` (anchors §3.3):

* the trainable weights are ``layers[l].mlp.down_proj.weight`` for each l in ``layers``; Adam with
  ``lr`` and ``weight_decay``; each step walks the edit call's cases in chunks of ``batch_size`` (0: the
  whole call), one optimizer step per chunk whose loss is still >= ``early_stop_loss`` (0.01; a chunk
  below it takes no step, as in EasyEdit); training stops once the mean loss of a step is below it, and
  runs at most ``max_steps`` steps;
* ``objective: prompt_last`` (FT-L, EasyEdit's default and the ROME paper's FT): the log-probabilities
  of *all* target tokens are read from the single next-token distribution at the last prompt token
  (not autoregressive; EasyEdit issue #173), mean over the target tokens;
* ``objective: target_new`` (FT-M): the standard teacher-forced cross-entropy over the target tokens
  of ``prompt + " " + target`` (mean over a case's target tokens, then over the chunk's cases);
* ``norm_constraint`` (optional): after every step each weight is clamped elementwise to within ±ε of
  its value before the edit call (``constraint_anchor: edit``, as EasyEdit's per-call weight copy) or
  of the unedited weights (``constraint_anchor: original``: the whole continual stream stays in the box).

A fresh Adam state per edit call, as EasyEdit's per-edit apply function.  Restore copies the original
weights back.  The down-projection is found by the model's architecture (GPT-2: the ``Conv1D``
``mlp.c_proj``; its weight is trained as stored).  Under ``dtype: auto`` on a half-precision model the
trained projections run and train in float32 (``PrecisionIsland``), so small steps are not rounded away.  ``ft-l`` and ``ft-m`` are the same editor with a different default objective.

Case-parallel single editing (the single scenario's ``parallel_cases``, ``CaseParallelFT``): K cases train
K copies of the projections in one batch, row k computed with copy k by a forward hook, each copy with its
own Adam state and stopping rule; the model's own weights never change.  Each case's loss is its own mean
over its target tokens, exactly the one-by-one loss, so steps and results match the one-by-one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode, forward_logits, prefix_causal
from methods.stats import down_proj
from methods.base import Editor, EditStats, IndependentEdits, NonFiniteError, group_runs, register_method
from methods.hparams import at_depth
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel, PrecisionIsland

OBJECTIVES = ("prompt_last", "target_new")
ANCHORS = ("edit", "original")


@dataclass(frozen=True)
class FTHParams:
    layers: tuple[int, ...]  # decoder layers whose mlp.down_proj is fine-tuned (EasyEdit L2: [21])
    lr: float = 5.0e-4
    max_steps: int = 25
    objective: str = "prompt_last"
    batch_size: int = 1  # cases per optimizer step; 0: the whole edit call (EasyEdit's batched editing)
    weight_decay: float = 0.0
    norm_constraint: float | None = None  # ε of the elementwise L∞ box; None: unconstrained
    constraint_anchor: str = "edit"
    early_stop_loss: float = 0.01

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one decoder layer")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.constraint_anchor not in ANCHORS:
            raise ValueError(f"constraint_anchor must be one of {', '.join(ANCHORS)}, got {self.constraint_anchor!r}")
        if self.lr <= 0 or self.max_steps < 0 or self.batch_size < 0:
            raise ValueError("lr must be > 0, max_steps >= 0 and batch_size >= 0 (0: the whole edit call)")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be > 0 or null, got {self.norm_constraint}")


@dataclass(frozen=True)
class FTMHParams(FTHParams):
    objective: str = "target_new"


def answer_positions(batch: TFBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column that predicts the token, token id) for every answer token of every row."""
    rows, columns, labels = [], [], []
    for i in range(batch.size):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        rows += [i] * (n - p)
        columns += list(range(p - 1, n - 1))
        labels += batch.input_ids[i, p:n].tolist()
    device = batch.input_ids.device
    return (torch.tensor(rows, device=device), torch.tensor(columns, device=device),
            torch.tensor(labels, device=device))


def edit_loss(lm: LoadedModel, batch: TFBatch, objective: str) -> torch.Tensor:
    """The FT-L (``prompt_last``) or FT-M (``target_new``) loss of one chunk."""
    return case_losses(lm, batch, objective).mean()


def case_losses(lm: LoadedModel, batch: TFBatch, objective: str) -> torch.Tensor:
    """[B]: each case's own loss (the mean over its target tokens); ``edit_loss`` is their mean."""
    rows, columns, labels = answer_positions(batch)
    hidden = lm.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    if objective == "prompt_last":
        last = batch.prompt_lengths - 1
        last_logits = lm.lm_head(hidden[torch.arange(batch.size), last])
        log_probs = torch.log_softmax(last_logits.to(torch.promote_types(last_logits.dtype, torch.float32)), dim=-1)
        token_nll = -log_probs[rows, labels]
    else:
        logits = lm.lm_head(hidden[rows, columns])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
        token_nll = F.cross_entropy(logits, labels, reduction="none")
    sums = torch.zeros(batch.size, dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll)
    return sums / torch.bincount(rows, minlength=batch.size).to(token_nll.dtype)


class FineTuneEditor(Editor):
    edits_weights = True

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        return {"layers": at_depth(num_layers, 0.66)}  # 21 of 32, 20 of 30, 18 of 28

    def __init__(self, lm: LoadedModel, hparams: FTHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self.edit_layers = tuple(sorted(set(hparams.layers)))
        self.island = PrecisionIsland(lm, [down_proj(lm, layer) for layer in self.edit_layers], self.name)
        self.weights = [down_proj(lm, layer).weight for layer in self.edit_layers]
        self.originals = [w.detach().clone() for w in self.weights]

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        hp, lm = self.hparams, self.lm
        if not cases:
            raise KebenchError(f"{self.name}: apply() needs at least one case")
        anchors = self.originals if hp.constraint_anchor == "original" else [w.detach().clone() for w in self.weights]
        size = hp.batch_size or len(cases)
        chunks = [encode(lm.tokenizer, [(c.prompt, c.target_new) for c in cases[i : i + size]],
                         lm.pad_token_id).to(lm.device) for i in range(0, len(cases), size)]
        for weight in self.weights:
            weight.requires_grad_(True)
        optimizer = torch.optim.Adam(self.weights, lr=hp.lr, weight_decay=hp.weight_decay)
        steps, mean_loss = 0, math.nan
        try:
            for step in range(hp.max_steps):
                losses = []
                for batch in chunks:
                    optimizer.zero_grad(set_to_none=True)
                    loss = edit_loss(lm, batch, hp.objective)
                    if not math.isfinite(float(loss.detach())):
                        raise NonFiniteError(f"{self.name}: non-finite loss at step {step}")
                    if float(loss.detach()) >= hp.early_stop_loss:  # as EasyEdit: no update once a chunk is learnt
                        loss.backward()
                        optimizer.step()
                    if hp.norm_constraint is not None:
                        with torch.no_grad():
                            for weight, anchor in zip(self.weights, anchors):
                                weight.copy_(torch.clamp(weight, anchor - hp.norm_constraint, anchor + hp.norm_constraint))
                    losses.append(float(loss.detach()))
                steps = step + 1
                mean_loss = sum(losses) / len(losses)
                if mean_loss < hp.early_stop_loss:
                    break
        finally:
            for weight in self.weights:
                weight.requires_grad_(False)
                weight.grad = None
        if not all(torch.isfinite(w).all() for w in self.weights):
            raise NonFiniteError(f"{self.name}: non-finite weights after the edit")
        return EditStats(steps=steps, loss=mean_loss)

    def restore(self) -> None:
        with torch.no_grad():
            for weight, original in zip(self.weights, self.originals):
                weight.copy_(original)
        self.island.close()

    def trainable_parameters(self) -> int:
        return sum(w.numel() for w in self.weights)

    @classmethod
    def independent(cls, lm: LoadedModel, hparams: FTHParams, seed: int, copies: int) -> "CaseParallelFT | None":
        """K single edits at once, each case training its own copy of the projections.  None (edit one by
        one) where a copy cannot stand in for the module: GPT-2's ``Conv1D`` or projections kept in another
        dtype (``dtype: auto`` on a half-precision model)."""
        modules = [down_proj(lm, layer) for layer in sorted(set(hparams.layers))]
        if lm.edit_dtype is not None or not all(type(m) is torch.nn.Linear for m in modules):
            return None
        return CaseParallelFT(cls, lm, hparams, seed, modules, copies)


class _RowWeights:
    """Forward hooks on the fine-tuned projections: each run of batch rows is computed with its own case's
    weight copies (the module's own weights are never changed, so restore is removing the hooks)."""

    def __init__(self, modules: Sequence[torch.nn.Linear]) -> None:
        self.routes: list[tuple[Sequence[torch.Tensor], int, int]] | None = None  # (weights, first row, end row)
        self.handles = [module.register_forward_hook(self._hook(index)) for index, module in enumerate(modules)]

    def _hook(self, index: int):
        def hook(module: torch.nn.Linear, args, output):
            if self.routes is None:
                return output
            inputs = args[0]
            return torch.cat([F.linear(inputs[start:stop], weights[index], module.bias)
                              for weights, start, stop in self.routes])
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _CaseCopy(Editor):
    """One case's copies of the projections in a case-parallel run (trained by ``CaseParallelFT.apply``)."""

    def __init__(self, parent: type[FineTuneEditor], lm: LoadedModel, hparams: FTHParams, seed: int,
                 modules: Sequence[torch.nn.Linear], rows: _RowWeights) -> None:
        super().__init__(lm, hparams, seed)
        self.name = parent.name  # type: ignore[misc]
        self.weights = [module.weight.detach().clone() for module in modules]
        self.rows = rows

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        raise KebenchError(f"{self.name}: a case copy is trained by its case-parallel group")

    @prefix_causal
    def logits(self, batch: TFBatch) -> torch.Tensor:
        self.rows.routes = [(self.weights, 0, batch.size)]
        try:
            return forward_logits(self.lm.model, batch)
        finally:
            self.rows.routes = None

    def restore(self) -> None:
        self.weights = []

    def trainable_parameters(self) -> int:
        return sum(w.numel() for w in self.weights)


class CaseParallelFT(IndependentEdits):
    """K single FT-L/FT-M edits in one batch: row k runs through case k's copies of the projections, each case
    has its own Adam state, steps only while its loss is >= ``early_stop_loss`` and leaves the batch when it
    stops, as the one-by-one run would (same loss per case, same steps)."""

    def __init__(self, parent: type[FineTuneEditor], lm: LoadedModel, hparams: FTHParams, seed: int,
                 modules: Sequence[torch.nn.Linear], copies: int) -> None:
        self.lm, self.hparams = lm, hparams
        self.rows = _RowWeights(modules)
        self.editors = [_CaseCopy(parent, lm, hparams, seed, modules, self.rows) for _ in range(copies)]

    def apply(self, cases: Sequence[EditCase]) -> list[EditStats]:
        hp, lm = self.hparams, self.lm
        if len(cases) != len(self.editors):
            raise KebenchError(f"{len(cases)} cases for {len(self.editors)} case-parallel editors")
        copies = [editor.weights for editor in self.editors]
        anchors = [[w.clone() for w in weights] for weights in copies]  # single editing: both anchors are the originals
        optimizers = [torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.weight_decay) for weights in copies]
        stats: list[EditStats | None] = [None] * len(cases)
        active = list(range(len(cases)))
        batch = None
        for weights in copies:
            for weight in weights:
                weight.requires_grad_(True)
        try:
            for step in range(hp.max_steps):
                if batch is None:
                    batch = encode(lm.tokenizer, [(cases[k].prompt, cases[k].target_new) for k in active],
                                   lm.pad_token_id).to(lm.device)
                self.rows.routes = [(copies[k], row, row + 1) for row, k in enumerate(active)]
                losses = case_losses(lm, batch, hp.objective)
                values = losses.detach().tolist()
                stepping = []
                for row, k in enumerate(active):
                    if not math.isfinite(values[row]):
                        raise NonFiniteError(f"{self.editors[k].name}: non-finite loss at step {step} "
                                             f"(case {cases[k].case_id})")
                    if values[row] >= hp.early_stop_loss:
                        stepping.append(row)
                if stepping:
                    for row in stepping:
                        optimizers[active[row]].zero_grad(set_to_none=True)
                    losses[stepping].sum().backward()
                    for row in stepping:
                        optimizers[active[row]].step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for k in active:
                            for weight, anchor in zip(copies[k], anchors[k]):
                                weight.copy_(torch.clamp(weight, anchor - hp.norm_constraint, anchor + hp.norm_constraint))
                still = []
                for row, k in enumerate(active):
                    if values[row] < hp.early_stop_loss or step + 1 == hp.max_steps:
                        stats[k] = EditStats(steps=step + 1, loss=values[row])
                    else:
                        still.append(k)
                if still != active:
                    active, batch = still, None
                if not active:
                    break
        finally:
            self.rows.routes = None
            for weights in copies:
                for weight in weights:
                    weight.requires_grad_(False)
                    weight.grad = None
        for k, weights in enumerate(copies):
            if stats[k] is None:  # max_steps == 0
                stats[k] = EditStats(steps=0, loss=math.nan)
            if not all(torch.isfinite(w).all() for w in weights):
                raise NonFiniteError(f"{self.editors[k].name}: non-finite weights after the edit (case {cases[k].case_id})")
        return stats  # type: ignore[return-value]

    @prefix_causal
    def logits(self, batch: TFBatch) -> torch.Tensor:
        self.rows.routes = [(self.editors[case].weights, start, stop) for case, start, stop in group_runs(batch)]
        try:
            return forward_logits(self.lm.model, batch)
        finally:
            self.rows.routes = None

    def restore(self) -> None:
        self.rows.remove()
        for editor in self.editors:
            editor.restore()


@register_method("ft-l")
class FTL(FineTuneEditor):
    hparams_class = FTHParams


@register_method("ft-m")
class FTM(FineTuneEditor):
    hparams_class = FTMHParams
