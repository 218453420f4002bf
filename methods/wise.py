"""WISE: a side memory for one MLP down-projection, routed by activation (Wang et al., NeurIPS 2024).

Follows EasyEdit's ``models/wise/WISE.py`` and ``wise_main.py`` (editing-anchors §3.7):

* **Side memory.**  The adapter keeps the original down-projection W and a trainable side copy W′
  (float32).  While editing, every token goes through W′.
* **Training batch** per edit: the edit text (prompt + " " + target) under each context template (``"{}"``
  plus greedy continuations of the seed words "I", "You", "Because", "Yes", "Q: " for each length in
  ``context_lengths``; EasyEdit's ``[[5,5],[10,5]]`` gives 10 + 1), plus one unrelated training text
  (``loc_prompt``; here ``EditCase.irrelevant``) per edit.
* **Loss** = teacher-forced cross-entropy on the target tokens of the edit rows + the activation margin.
  With Δ(x) the mean over a row's tokens of ‖act(x W′ᵀ) − act(x Wᵀ)‖ (act = the model's ``hidden_act``),
  in = edit rows, out = unrelated rows:
  mean⁺[Δ_out − Δ_in + γ] + mean⁺[Δ_out − α] + mean⁺[β − Δ_in], mean⁺ = mean of the positive entries.
* **Optimiser**: SGD at ``edit_lr`` (weight decay ``weight_decay``) for up to ``n_iter`` steps; gradients
  are multiplied by the current knowledge shard's random mask (keep-probability ``mask_ratio``, redrawn
  every ``save_freq`` edits); after each step W′ is clamped to W ± ``norm_constraint`` elementwise; stop
  when the loss changed by ≤ ``early_stop_delta`` and is ≤ ``early_stop_loss``.  The in-scope Δ of the last
  iteration updates the running minimum Δ_min of the current shard.
* **Routing** per input row: Δ over its tokens (the largest token Δ when the row is longer than 100
  tokens).  Below ``act_ratio`` × Δ_min the row takes the original W (output bit-for-bit unedited).
* **Save and merge** every ``save_freq`` / ``merge_freq`` edits.  WISE-Merge (``retrieve: false``): shards
  are TIES-merged (magnitude top-``densities``, sign consensus by sum, weights ``merge_weights``/n) into
  a merged main weight, and the route picks between original, merged and W′ (EasyEdit's rule; leftover
  edits are merged before evaluation once ``save_freq`` edits were made).  WISE-Retrieve
  (``retrieve: true``): saved shards stay side by side with their own Δ_min; every ``merge_freq`` the
  last ``merge_freq/save_freq`` shards are TIES-merged into one; the route picks the memory whose Δ is
  largest and above its own threshold.
* **WISE-light** (BaFT paper, footnote 4 and Table 5: "restrict the original WISE logic to a randomly
  selected 1/8 area"): ``pool_fraction: 0.125`` draws, once per editor, a random set of exactly that
  fraction of W's entries; every shard mask lies inside it, so only the pool can ever change.  The
  trainable parameter count is the pool (WISE: the whole layer; the paper's Table 3 WISE-light counts
  are exactly 1/8 of each model's down-projection).

Choices, each documented: Δ means and the cross-entropy exclude padding (EasyEdit's left-padded batches
average over pad tokens too); the cross-entropy is the mean over target tokens per row, then over rows;
weight decay acts only inside the shard mask, so entries outside it stay exactly W; several cases in one
call train together with every unrelated row out of scope (EasyEdit treats only the last row as out of
scope); the context templates are computed once per model from the unedited model (EasyEdit keeps a
process-wide cache); the replay option (paper App. B.3) is not implemented.  A module with a bias (GPT-2's
``mlp.c_proj``) keeps it in the side memory and in every saved or merged shard (only weights are edited).  A case without an unrelated
training text is an error: the margin needs one.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from benchmarks.case import EditCase
from benchmarks.generation import greedy_continuations
from benchmarks.metrics import TFBatch, encode
from methods.base import Editor, EditStats, register_method
from methods.hparams import at_depth
from methods.grace import EditForward, check_finite, swap_module, target_module
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")  # EasyEdit's get_context_templates
LONG_ROW_TOKENS = 100  # rows longer than this route on their largest token Δ (EasyEdit's euc(infer=True))
ORIGINAL, SIDE = -1, 0  # route codes; memory shard i (or the merged weight) is i + 1


@dataclass(frozen=True)
class WiseHParams:
    layer: int  # decoder layer whose ``module`` gets the side memory
    edit_lr: float
    n_iter: int
    mask_ratio: float  # keep-probability of a shard's gradient mask
    alpha: float  # out-of-scope Δ should stay below α
    beta: float  # in-scope Δ should exceed β
    gamma: float  # in-scope Δ should exceed out-of-scope Δ by γ
    act_ratio: float  # routing threshold = act_ratio × the minimum in-scope Δ seen while editing
    save_freq: int
    merge_freq: int
    module: str = "mlp.down_proj"
    norm_constraint: float | None = 1.0  # elementwise clamp of W′ around W after every step; null: none
    weight_decay: float = 1e-5
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4
    densities: float = 0.53  # TIES: fraction of each task vector kept by magnitude
    merge_weights: float = 1.0  # TIES: total weight, split evenly over the merged shards
    retrieve: bool = True  # WISE-Retrieve (EasyEdit's LLaMA default); false: WISE-Merge
    pool_fraction: float = 1.0  # the fraction of W that may ever change: 1 for WISE, 1/8 for WISE-light
    context_lengths: tuple[int, ...] = (5, 10)  # one template per seed word and length; () = only "{}"
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio <= 1 or not 0 < self.pool_fraction <= 1 or not 0 < self.densities <= 1:
            raise ValueError("mask_ratio, pool_fraction and densities must lie in (0, 1]")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"save_freq and merge_freq must be >= 1 with merge_freq a multiple of save_freq, "
                             f"got {self.save_freq} and {self.merge_freq}")
        if self.edit_lr <= 0 or self.n_iter < 0 or self.act_ratio <= 0:
            raise ValueError("edit_lr and act_ratio must be > 0 and n_iter >= 0")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be > 0 or null, got {self.norm_constraint}")
        if any(length < 1 for length in self.context_lengths):
            raise ValueError("context_lengths must be positive token counts")


# --------------------------------------------------------------------------- pieces

def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES merging as EasyEdit's ``GTA('magnitude', 'sum', normalize=True)``.

    Task vectors τ_i = t_i − base keep their top ``density`` fraction by magnitude; with weights w_i the
    elected sign is sign(Σ w_i τ_i) (ties count as +); entries agreeing with it are averaged with their
    weights: base + Σ w_i τ_i m_i / Σ w_i m_i (a zero divisor counts as 1).
    """
    deltas = []
    for tensor in tensors:
        delta = (tensor - base).float()
        k = int(density * delta.numel())
        if density < 1:
            if k < 1:
                raise ValueError(f"density {density} keeps no entry of a {delta.numel()}-entry tensor")
            keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
            keep[delta.abs().reshape(-1).topk(k).indices] = True
            delta = delta * keep.reshape(delta.shape)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).reshape(-1, *[1] * base.dim())
    weighted = stacked * w
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == majority).to(stacked.dtype)
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base.float() + mixed / divisor).to(base.dtype)


class _MinAct:
    """The running minimum of in-scope Δ over a shard's edits (EasyEdit's ``EditingMeanAct``)."""

    def __init__(self, minimum: float = float("inf")) -> None:
        self.minimum = minimum

    def update(self, value: float) -> None:
        self.minimum = min(self.minimum, value)


_TEMPLATES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], tuple[str, ...]]]" = weakref.WeakKeyDictionary()


def context_templates(lm: LoadedModel, lengths: Sequence[int]) -> tuple[str, ...]:
    """``"{}"`` plus, per length, a greedy continuation of each seed word followed by ``" {}"``.

    Computed from the model as it is when first asked (editors ask before any edit), once per model.
    """
    cache = _TEMPLATES.setdefault(lm.model, {})
    key = tuple(lengths)
    if key not in cache:
        templates = ["{}"]
        seeds = [lm.tokenizer(word, add_special_tokens=True)["input_ids"] for word in SEED_WORDS]
        plain = lambda batch: lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # noqa: E731
        for length in lengths:
            continuations = greedy_continuations(plain, seeds, [length] * len(seeds), lm.pad_token_id, lm.device)
            for seed, tokens in zip(seeds, continuations):
                text = lm.tokenizer.decode(seed + tokens.tolist(), skip_special_tokens=True)
                templates.append(text.replace("{", "{{").replace("}", "}}") + " {}")
        cache[key] = tuple(templates)
    return cache[key]


class WiseAdapter(nn.Module):
    """The original down-projection W plus the side memory; routes each row to one of them."""

    def __init__(self, base: nn.Linear, act: str) -> None:
        super().__init__()
        self.base = base
        self.act = ACT2FN[act]
        self.side = base.weight.detach().float().clone()  # W′
        self.bias = base.bias.detach().float().clone() if getattr(base, "bias", None) is not None else None
        self.memory: list[torch.Tensor] = []  # saved shards (retrieve: side by side; merge: awaiting a merge)
        self.memory_min: list[_MinAct] = []  # retrieve: each shard's Δ_min
        self.merged: torch.Tensor | None = None  # WISE-Merge: the merged main weight, None while it equals W
        self.min_act = _MinAct()
        self.retrieve = True
        self.act_ratio = 1.0
        self.mode: str | None = None  # None: W; "edit": W′ for every token; "route": choose per row
        self.side_param: nn.Parameter | None = None  # W′ as a trainable leaf during an edit
        self.real: torch.Tensor | None = None  # [B, L] real tokens of the current forward
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None  # (W x, W′ x) of the last edit step
        self.last_route: torch.Tensor | None = None  # [B] route codes of the last routed forward

    def delta(self, original: torch.Tensor, other: torch.Tensor, route: bool) -> torch.Tensor:
        """Δ per row: token-mean (route: max beyond 100 tokens) of ‖act(other) − act(original)‖ over real tokens."""
        norms = torch.linalg.vector_norm(self.act(other.float()) - self.act(original.float()), dim=-1)  # [B, L]
        real = self.real if self.real is not None else torch.ones_like(norms, dtype=torch.bool)
        counts = real.sum(dim=1)
        mean = (norms * real).sum(dim=1) / counts.clamp_min(1)
        if not route:
            return mean
        largest = norms.masked_fill(~real, float("-inf")).max(dim=1).values
        return torch.where(counts > LONG_ROW_TOKENS, largest, mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.base(x)
        original = self.base(x)
        if self.mode == "edit":
            side = F.linear(x.float(), self.side_param, self.bias)
            self.recorded = (original.detach(), side)
            return side.to(original.dtype)
        side = F.linear(x.float(), self.side, self.bias)
        threshold = self.min_act.minimum * self.act_ratio
        side_delta = self.delta(original, side, route=True)
        choice = torch.full_like(side_delta, ORIGINAL, dtype=torch.long)
        outputs = [side]
        if self.retrieve:
            choice = torch.where(side_delta >= threshold, SIDE, ORIGINAL)
            best = side_delta
            for index, (weight, minimum) in enumerate(zip(self.memory, self.memory_min)):
                memory_out = F.linear(x.float(), weight, self.bias)
                memory_delta = self.delta(original, memory_out, route=True)
                wins = (memory_delta > best) & (memory_delta > minimum.minimum * self.act_ratio)
                choice = torch.where(wins, index + 1, choice)
                best = torch.where(wins, memory_delta, best)
                outputs.append(memory_out)
        else:
            merged = original.float() if self.merged is None else F.linear(x.float(), self.merged, self.bias)
            merged_delta = self.delta(original, merged, route=True)
            quiet = (merged_delta < threshold) & (side_delta < threshold)
            choice = torch.where(quiet, ORIGINAL, torch.where(merged_delta > side_delta, 1, SIDE))
            outputs.append(merged)
        self.last_route = choice.detach()
        out = original
        for code, candidate in enumerate(outputs):
            out = torch.where((choice == code)[:, None, None], candidate.to(original.dtype), out)
        return out


# --------------------------------------------------------------------------- the editor

def _no_irrelevant_message(method: str, case_id: str) -> str:
    return (f"{method}: case {case_id} has no unrelated training text (EditCase.irrelevant, WISE's loc_prompts); "
            "zsre has them in every split (dev, test, all), the KnowEdit sets and CounterFact carry none")


@register_method("wise")
class WISE(Editor):
    hparams_class = WiseHParams

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        return {"layer": at_depth(num_layers, 0.84)[0]}  # as GRACE: 27 of 32, 25 of 30, 24 of 28

    @classmethod
    def check_hparams(cls, hparams, num_layers, hidden_size, benchmark=None) -> None:
        super().check_hparams(hparams, num_layers, hidden_size, benchmark)
        cases = getattr(benchmark, "cases", None) or ()
        missing = [case.case_id for case in cases if not case.irrelevant]
        if missing:
            raise KebenchError(_no_irrelevant_message(cls.name, missing[0]))

    def __init__(self, lm: LoadedModel, hparams: WiseHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self._parent, self._name, self._original = target_module(lm, hparams.layer, hparams.module, self.name)
        act = lm.activation
        self.templates = context_templates(lm, hparams.context_lengths)
        self.adapter = WiseAdapter(self._original, act)
        self.adapter.retrieve, self.adapter.act_ratio = hparams.retrieve, hparams.act_ratio
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = self._draw_pool()
        self.shard_mask: torch.Tensor | None = None
        self.edits = 0  # EasyEdit's editing_total_cnt
        self.merges = 0
        self._pending_final_merge = False
        swap_module(self._parent, self._name, self.adapter)
        self._installed = True

    # ------------------------------------------------------------------ masks

    def _draw_pool(self) -> torch.Tensor:
        """Exactly round(pool_fraction × |W|) entries, uniformly at random (all of W for WISE)."""
        numel = self._original.weight.numel()
        size = round(self.hparams.pool_fraction * numel)
        pool = torch.zeros(numel, dtype=torch.bool)
        if size >= numel:
            pool[:] = True
        else:
            pool[torch.randperm(numel, generator=self.generator)[:size]] = True
        return pool.reshape(self._original.weight.shape).to(self.lm.device)

    def _draw_shard_mask(self) -> torch.Tensor:
        keep = torch.rand(self._original.weight.shape, generator=self.generator) < self.hparams.mask_ratio
        return keep.to(self.lm.device) & self.pool

    # ------------------------------------------------------------------ editing

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        if not self._installed:
            raise RuntimeError("editor was restored; build a new one")
        hp, lm, adapter = self.hparams, self.lm, self.adapter
        missing = [case.case_id for case in cases if not case.irrelevant]
        if missing:
            raise KebenchError(_no_irrelevant_message(self.name, missing[0]))
        edit_pairs = [(template.format(case.prompt), case.target_new) for case in cases for template in self.templates]
        loc_pairs = [(case.irrelevant[0].prompt, case.irrelevant[0].answer) for case in cases]
        batch = encode(lm.tokenizer, edit_pairs + loc_pairs, lm.pad_token_id).to(lm.device)
        n_in = len(edit_pairs)
        if self.edits % hp.save_freq == 0 or self.shard_mask is None:
            self.shard_mask = self._draw_shard_mask()
        mask = self.shard_mask.float()
        forward = EditForward(lm, batch, n_in, hp.layer, torch.zeros_like(batch.lengths), hp.fast_forward)
        side = nn.Parameter(adapter.side.clone())
        optimizer = torch.optim.SGD([side], lr=hp.edit_lr)
        weight = self._original.weight.detach().float()
        rows = forward.targets.rows
        adapter.mode, adapter.side_param, adapter.real = "edit", side, forward.real_tokens()
        history: list[float] = []
        loss_value, steps, in_scope = float("nan"), 0, None
        try:
            for step in range(hp.n_iter):
                token_losses = forward.token_losses()
                per_row = torch.zeros(n_in, device=token_losses.device).index_add(0, rows, token_losses)
                per_row = per_row / torch.bincount(rows, minlength=n_in).clamp_min(1)
                original, side_out = adapter.recorded
                deltas = adapter.delta(original, side_out, route=False)
                loss = per_row.mean() + self._margin(deltas[:n_in], deltas[n_in:])
                loss_value = check_finite(loss, self.name, step)
                # EasyEdit's EarlyStopMeter looks at the two previous steps' losses.
                stop = len(history) >= 2 and abs(history[-1] - history[-2]) <= hp.early_stop_delta \
                    and history[-1] <= hp.early_stop_loss
                if stop or step == hp.n_iter - 1:  # Δ_in of this forward, before any further step
                    in_scope = float(deltas[:n_in].detach().mean())
                if stop:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    side.grad = (side.grad + hp.weight_decay * side) * mask
                optimizer.step()
                steps += 1
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        side.copy_(torch.clamp(side, weight - hp.norm_constraint, weight + hp.norm_constraint))
                history.append(loss_value)
        finally:
            adapter.mode, adapter.side_param, adapter.real, adapter.recorded = None, None, None, None
        if in_scope is not None:
            adapter.min_act.update(in_scope)
        adapter.side = side.detach()
        self.edits += 1
        if self.edits % hp.save_freq == 0:
            self._save()
        if self.edits % hp.merge_freq == 0:
            self._merge()
        self._pending_final_merge = not hp.retrieve
        return EditStats(steps=steps, loss=loss_value)

    def _margin(self, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        gap = outside[:, None] - inside[None, :] + hp.gamma
        return _positive_mean(gap) + _positive_mean(outside - hp.alpha) + _positive_mean(hp.beta - inside)

    def _save(self) -> None:
        """Push W′ to memory and restart it from W (a new knowledge shard)."""
        adapter = self.adapter
        adapter.memory.append(adapter.side.clone())
        adapter.side = self._original.weight.detach().float().clone()
        if self.hparams.retrieve:
            adapter.memory_min.append(adapter.min_act)
            adapter.min_act = _MinAct()

    def _merge(self) -> None:
        hp, adapter = self.hparams, self.adapter
        base = self._original.weight.detach().float()
        if hp.retrieve:
            count = hp.merge_freq // hp.save_freq
            shards, minima = adapter.memory[-count:], adapter.memory_min[-count:]
            merged = ties_merge(base, shards, [hp.merge_weights / count] * count, hp.densities)
            del adapter.memory[-count:], adapter.memory_min[-count:]
            adapter.memory.append(merged)
            adapter.memory_min.append(_MinAct(min(m.minimum for m in minima)))
        else:
            shards = adapter.memory
            if adapter.merged is None:
                weights = [hp.merge_weights / len(shards)] * len(shards)
                merged = ties_merge(base, shards, weights, hp.densities)
            else:  # EasyEdit: the earlier merge keeps weight 0.6, the new shards share 0.4
                weights = [0.4 / len(shards)] * len(shards) + [0.6]
                merged = ties_merge(base, [*shards, adapter.merged], weights, hp.densities)
            adapter.merged = merged
            adapter.memory = []
            adapter.side = base.clone()
        self.merges += 1

    def _final_merge(self) -> None:
        """WISE-Merge before evaluation: leftover edits join the merged weight (EasyEdit's ``WISE.__call__``)."""
        self._pending_final_merge = False
        adapter = self.adapter
        if self.hparams.retrieve or self.edits < self.hparams.save_freq:
            return
        if not torch.equal(adapter.side, self._original.weight.detach().float()):
            adapter.memory.append(adapter.side.clone())
        if adapter.memory:
            self._merge()

    # ------------------------------------------------------------------ inference and bookkeeping

    def logits(self, batch: TFBatch) -> torch.Tensor:
        if self._pending_final_merge:
            self._final_merge()
        self.adapter.mode, self.adapter.real = "route", batch.attention_mask.bool()
        try:
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            self.adapter.mode, self.adapter.real = None, None

    def restore(self) -> None:
        if self._installed:
            swap_module(self._parent, self._name, self._original)
            self._installed = False

    def trainable_parameters(self) -> int:
        """Entries of W that WISE may train: the whole layer, or WISE-light's pool."""
        return int(self.pool.sum())


@register_method("wise-light")
class WISELight(WISE):
    """WISE with its update restricted to a random 1/8 of the layer (``pool_fraction`` in its YAMLs)."""


def _positive_mean(values: torch.Tensor) -> torch.Tensor:
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())
