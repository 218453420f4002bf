"""Basis-level representation interventions on the residual stream: the engine behind BaFT and ReFT.

At each chosen decoder layer l the layer's output h (the residual stream) is replaced, at selected
token positions, by

    Φ(h) = h + Rᵀ W(h) (A h + b − R h)                                   (BaFT paper, Eq. 3)

with R ∈ ℝ^{r×d} holding orthonormal rows (an orthogonal parametrization in float32: the Q factor of a QR
decomposition), (A, b) a
linear map to ℝ^r, and W(h) = diag(w_1(h), …, w_r(h)) where w_k(h) = σ(g_kᵀ h + c_k) is one logistic
regression per basis.  ReFT is the special case W ≡ I.  The positions are the last few prompt tokens and
every answer token, in training and in evaluation alike.

Training runs in two parts for speed.  Nothing below the lowest intervened layer depends on the
learned parameters, and no token before the first intervened position does either (attention is
causal), so each edit computes once: the key/value states of the untouched prefix columns at every
layer, and the hidden states of the remaining columns at the input of the lowest intervened layer.
Each optimisation step then runs only the upper layers on the remaining columns, and the LM head only
where a target token is predicted.  ``fast_forward: false`` runs the naive full forward every step
instead (same numbers up to float rounding; ``bench/edit_speed.py`` compares the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode
from methods.base import Editor, EditStats, NonFiniteError
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

#: model types whose decoder layers take (hidden, attention_mask, position_ids, past_key_values,
#: position_embeddings) and whose attention only calls ``past_key_values.update``: the split forward is
#: exact for them.  Other architectures use the full forward.
SPLIT_FORWARD_MODEL_TYPES = frozenset({"llama"})

#: what ``early_stop_loss`` is compared with (``early_stop_on``; see ``RepresentationEditor.stop_value``)
EARLY_STOP_RULES = ("mean_ce", "sum_ce", "total")


class OrthonormalRows(nn.Module):
    """Parametrize a wide r×d matrix by the orthonormal factor of its QR decomposition: R Rᵀ = I exactly.

    A smooth map (the QR sign ambiguity is fixed by a positive diagonal), and for a 12×576 matrix about
    ten times cheaper per step than torch's Householder default for non-square orthogonal maps, which
    dominated the step time of a small model.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(weight.T.float())
        signs = torch.sign(torch.diagonal(r))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        return (q * signs).T

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # an orthonormal-row matrix is its own preimage


class BasisIntervention(nn.Module):
    """Φ(h) = h + Rᵀ W(h)(A h + b − R h) for one layer; ``gated=False`` gives ReFT (W ≡ I)."""

    def __init__(self, hidden_size: int, rank: int, gated: bool) -> None:
        super().__init__()
        if not 0 < rank <= hidden_size:
            raise KebenchError(f"rank must be in 1..{hidden_size}, got {rank}")
        rotation = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(rotation.weight)
        parametrize.register_parametrization(rotation, "weight", OrthonormalRows())
        self.rotation = rotation
        self.source = nn.Linear(hidden_size, rank)  # A h + b, initialised as in pyreft's LoReFT
        self.gate: nn.Linear | None = None
        if gated:
            # Zero init: every basis starts at weight 1/2, so no basis is favoured before training.  Built
            # with ``skip_init`` so that it draws nothing from the random generator: R, A, b of every layer
            # are then the same for BaFT and ReFT under one seed (the comparison is about the gates alone).
            self.gate = torch.nn.utils.skip_init(nn.Linear, hidden_size, rank)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def basis_weights(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return torch.ones(*h.shape[:-1], self.source.out_features, dtype=h.dtype, device=h.device)
        return torch.sigmoid(self.gate(h))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Φ(h), w(h)) computed in float32."""
        h32 = h.float()
        r = self.rotation.weight  # [r, d], orthonormal rows
        weights = self.basis_weights(h32)
        delta = weights * (self.source(h32) - h32 @ r.T)
        return h32 + delta @ r, weights


class _PrefixKV:
    """A stand-in for a transformers ``Cache``: records the prefix keys/values once, then prepends them."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        if layer_idx not in self.keys:
            return key, value
        return torch.cat([self.keys[layer_idx], key], dim=2), torch.cat([self.values[layer_idx], value], dim=2)


class _FullForward:
    """The naive variant: the whole model on the whole batch at every step."""

    def __init__(self, lm: LoadedModel, batch: TFBatch) -> None:
        self.lm, self.batch = lm, batch

    def __call__(self) -> torch.Tensor:
        return self.lm.model.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).last_hidden_state

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        return per_column

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns


class _SplitForward:
    """Runs the frozen part of a batch once; each call runs layers ``start..`` on the live columns only.

    Row i is split at its own column s_i (its first intervened or first target-predicting column):
    columns before s_i never change during an edit, so their keys/values are computed once per layer.
    The live columns of every row are packed to the left of a [B, W] block with their true positions,
    so each step costs (live tokens) × (upper layers) instead of (all tokens) × (all layers).
    """

    def __init__(self, lm: LoadedModel, batch: TFBatch, start_layer: int, split: torch.Tensor) -> None:
        inner = lm.model.model
        self.inner = inner
        self.start_layer = start_layer
        device = batch.input_ids.device
        rows = batch.size
        self.split = split  # [B] first live column of each row
        live_lengths = batch.lengths - split
        width = int(live_lengths.max())
        prefix_width = int(split.max())
        offsets = torch.arange(width, device=device)
        self.live_columns = (split[:, None] + offsets[None, :]).clamp_max(batch.input_ids.shape[1] - 1)  # [B, W]
        live_real = offsets[None, :] < live_lengths[:, None]
        with torch.no_grad():
            self.kv = _PrefixKV()
            if prefix_width > 0:
                prefix_ids = batch.input_ids[:, :prefix_width]
                prefix = inner.embed_tokens(prefix_ids)
                positions = torch.arange(prefix_width, device=device)[None, :]
                cos, sin = inner.rotary_emb(prefix, positions)
                for layer in inner.layers:
                    prefix = layer(prefix, attention_mask=None, position_ids=positions, past_key_values=self.kv,
                                   use_cache=False, position_embeddings=(cos, sin))
                    prefix = prefix[0] if isinstance(prefix, tuple) else prefix
            self.kv.recording = False
            # Live query j of row i sees that row's prefix keys k < s_i and the live keys up to itself.
            prefix_visible = torch.arange(prefix_width, device=device)[None, :] < split[:, None]  # [B, S]
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            self.mask = torch.cat(
                [prefix_visible[:, None, :].expand(rows, width, prefix_width), causal[None].expand(rows, width, width)],
                dim=2,
            )[:, None]  # [B, 1, W, S + W]
            live_ids = torch.where(live_real, batch.input_ids.gather(1, self.live_columns), batch.input_ids[0, -1])
            hidden = inner.embed_tokens(live_ids)
            self.position_ids = split[:, None] + offsets[None, :]
            self.position_embeddings = inner.rotary_emb(hidden, self.position_ids)
            for layer in inner.layers[:start_layer]:
                hidden = self._layer(layer, hidden)
            self.start_hidden = hidden
        self.live_real = live_real

    def _layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=self.mask, position_ids=self.position_ids, past_key_values=self.kv,
                    use_cache=False, position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def __call__(self) -> torch.Tensor:
        """Final-norm hidden states of the live block (row i, column j is column s_i + j of the batch)."""
        hidden = self.start_hidden
        for layer in self.inner.layers[self.start_layer:]:
            hidden = self._layer(layer, hidden)
        return self.inner.norm(hidden)

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        """A [B, L] per-column tensor (a mask) in the live block's layout; padding is False."""
        return per_column.gather(1, self.live_columns) & self.live_real

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns - self.split[rows]


@dataclass(frozen=True)
class _Targets:
    rows: torch.Tensor  # rows of the batch whose next-token predictions are trained
    columns: torch.Tensor  # the column that predicts each target token
    labels: torch.Tensor  # the target token ids


def _targets(batch: TFBatch, n_rows: int) -> _Targets:
    rows, columns, labels = [], [], []
    for i in range(n_rows):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        rows.extend([i] * (n - p))
        columns.extend(range(p - 1, n - 1))
        labels.extend(batch.input_ids[i, p:n].tolist())
    device = batch.input_ids.device
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _Targets(as_long(rows), as_long(columns), as_long(labels))


class RepresentationEditor(Editor):
    """The shared machinery; subclasses choose ``gated`` and add regularizers in ``regularizers``."""

    gated: bool = False

    def __init__(self, lm: LoadedModel, hparams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        layers = tuple(hparams.layers)
        if not layers:
            raise KebenchError(f"{self.name}: 'layers' must name at least one decoder layer")
        bad = [layer for layer in layers if not 0 <= layer < lm.num_layers]
        if bad:
            raise KebenchError(f"{self.name}: layer {bad[0]} out of range for {lm.name} ({lm.num_layers} layers)")
        if hparams.last_prompt_tokens < 0:
            raise KebenchError(f"{self.name}: last_prompt_tokens must be >= 0, got {hparams.last_prompt_tokens}")
        self.layer_ids = tuple(sorted(set(layers)))
        # R, A, b come from a generator seeded with ``seed`` alone (the global generator is left as it was),
        # and the gates draw nothing, so BaFT and ReFT built with one seed start from identical subspaces.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.interventions = nn.ModuleDict(
                {str(layer): BasisIntervention(lm.hidden_size, hparams.rank, self.gated) for layer in self.layer_ids}
            ).to(lm.device)
        self._optimizer: torch.optim.Optimizer | None = None
        self._mask: torch.Tensor | None = None
        self._recorded: dict[int, torch.Tensor] | None = None
        self._handles = [lm.layers[layer].register_forward_hook(self._hook(layer)) for layer in self.layer_ids]
        self.split_forward_supported = getattr(lm.model.config, "model_type", "") in SPLIT_FORWARD_MODEL_TYPES

    # ------------------------------------------------------------------ hooks

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            if self._mask is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[:2] != self._mask.shape:
                raise RuntimeError(f"intervention mask {tuple(self._mask.shape)} does not fit hidden {tuple(hidden.shape)}")
            edited, weights = self.interventions[str(layer)](hidden)
            if self._recorded is not None:
                self._recorded[layer] = weights
            hidden = torch.where(self._mask[..., None], edited.to(hidden.dtype), hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def logits(self, batch: TFBatch) -> torch.Tensor:
        self._mask = batch.intervention_mask(self.hparams.last_prompt_tokens)
        try:
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            self._mask = None

    def restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.interventions.parameters() if p.requires_grad)

    def mean_basis_weights(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """[len(pairs), layers, r] float32 on the CPU: each basis's weight w_k(h) at each intervened layer,
        averaged over the intervened positions of ``prompt + " " + answer`` (the last ``last_prompt_tokens``
        prompt tokens and every answer token), under the current intervention (W ≡ 1 for ReFT).

        Runs the model under ``torch.no_grad()``; an editor that was restored hooks itself on for the call and
        off again, so the model is left as it was.
        """
        rank = self.hparams.rank
        if not pairs:
            return torch.zeros(0, len(self.layer_ids), rank, dtype=torch.float32)
        lm = self.lm
        batch = encode(lm.tokenizer, list(pairs), lm.pad_token_id).to(lm.device)
        mask = batch.intervention_mask(self.hparams.last_prompt_tokens)
        temporary = [] if self._handles else [lm.layers[layer].register_forward_hook(self._hook(layer))
                                              for layer in self.layer_ids]
        try:
            with torch.no_grad():
                self._mask, self._recorded = mask, {}
                lm.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                recorded = self._recorded
        finally:
            self._mask, self._recorded = None, None
            for handle in temporary:
                handle.remove()
        weight = mask[..., None].float()
        counts = weight.sum(dim=1).clamp_min(1.0)  # [B, 1]
        means = [(recorded[layer].float() * weight).sum(dim=1) / counts for layer in self.layer_ids]
        return torch.stack(means, dim=1).to(device="cpu", dtype=torch.float32)

    # ------------------------------------------------------------------ training

    def irrelevant_pairs(self, cases: Sequence[EditCase]) -> list[tuple[str, str]]:
        """Unrelated texts to run beside the edit (BaFT's locality margin); ReFT uses none."""
        return []

    def regularizers(self, weights: dict[int, torch.Tensor], edit_mask: torch.Tensor,
                     irrelevant_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Extra loss terms from the recorded basis weights; ReFT has none."""
        return {}

    def after_edit(self, weights: dict[int, torch.Tensor], edit_mask: torch.Tensor) -> None:
        """Called with the final basis weights of an edit (BaFT updates its running means)."""

    def combine_loss(self, ce: torch.Tensor, terms: dict[str, torch.Tensor], first_step: bool) -> torch.Tensor:
        """The training loss from the teacher-forcing CE and the regularizers (BaFT balances them; ReFT has none)."""
        return ce + sum(terms.values(), torch.zeros((), device=ce.device))

    def stop_value(self, ce: torch.Tensor, loss: torch.Tensor, target_tokens: int) -> float:
        """The number compared with ``early_stop_loss`` (``early_stop_on``).

        ``mean_ce``: the CE averaged over target tokens (what the loss trains); ``sum_ce``: summed over the
        target tokens, as the paper's L_1 is written; ``total``: the whole training loss, regularizers included
        (for ReFT, which has none, the same as ``mean_ce``).
        """
        rule = getattr(self.hparams, "early_stop_on", "mean_ce")
        if rule == "mean_ce":
            return float(ce.detach())
        if rule == "sum_ce":
            return float(ce.detach()) * target_tokens
        if rule == "total":
            return float(loss.detach())
        raise KebenchError(f"{self.name}: early_stop_on must be mean_ce, sum_ce or total, got {rule!r}")

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        hp = self.hparams
        lm = self.lm
        if not self._handles:
            raise RuntimeError("editor was restored; build a new one")
        edit_pairs = [(case.prompt, case.target_new) for case in cases]
        extra_pairs = self.irrelevant_pairs(cases)
        batch = encode(lm.tokenizer, edit_pairs + extra_pairs, lm.pad_token_id).to(lm.device)
        n_edit = len(edit_pairs)
        mask = batch.intervention_mask(hp.last_prompt_tokens)
        targets = _targets(batch, n_edit)
        target_tokens = int(targets.labels.numel())
        edit_mask = mask.clone()
        edit_mask[n_edit:] = False
        irrelevant_mask = None
        if extra_pairs:
            irrelevant_mask = mask.clone()
            irrelevant_mask[:n_edit] = False

        if hp.fast_forward and self.split_forward_supported:
            first_intervened = mask.float().argmax(dim=1)
            first_predicting = (batch.prompt_lengths - 1).clamp_min(0)
            first_predicting[n_edit:] = batch.lengths[n_edit:]  # irrelevant rows train no tokens
            runner: _FullForward | _SplitForward = _SplitForward(
                lm, batch, self.layer_ids[0], torch.minimum(first_intervened, first_predicting))
        else:
            runner = _FullForward(lm, batch)
        live_mask = runner.gather(mask)
        live_edit_mask = runner.gather(edit_mask)
        live_irrelevant_mask = runner.gather(irrelevant_mask) if irrelevant_mask is not None else None
        target_columns = runner.column(targets.rows, targets.columns)

        if self._optimizer is None or hp.reset_optimizer:
            parameters = [p for p in self.interventions.parameters() if p.requires_grad]
            self._optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        optimizer = self._optimizer
        step = 0
        while True:
            training = step < hp.max_steps
            with torch.set_grad_enabled(training):
                self._mask, self._recorded = live_mask, {}
                try:
                    hidden = runner()
                finally:
                    self._mask = None
                weights, self._recorded = self._recorded, None
                if hp.fast_forward:
                    logits = lm.model.lm_head(hidden[targets.rows, target_columns])
                else:  # the naive variant: full-vocabulary logits at every position
                    logits = lm.model.lm_head(hidden)[targets.rows, target_columns]
                ce = F.cross_entropy(logits.float(), targets.labels)
                terms = self.regularizers(weights, live_edit_mask, live_irrelevant_mask)
                loss = self.combine_loss(ce, terms, first_step=step == 0)
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteError(f"{self.name}: non-finite training loss at step {step}")
            if not training or self.stop_value(ce, loss, target_tokens) < hp.early_stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        self.after_edit({k: v.detach() for k, v in weights.items()}, live_edit_mask)
        return EditStats(steps=step, loss=float(ce.detach()))

