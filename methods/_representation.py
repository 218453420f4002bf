"""Basis-level representation interventions on the residual stream: the engine behind BaFT and ReFT.

At each chosen decoder layer l the layer's output h (the residual stream) is replaced, at selected
token positions, by

    Φ(h) = h + Rᵀ W(h) (A h + b − R h)                                   (BaFT paper, Eq. 3)

with R ∈ ℝ^{r×d} holding orthonormal rows (torch's orthogonal parametrization, float32), (A, b) a
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
from torch.nn.utils import parametrizations

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode
from methods.base import Editor, EditStats, NonFiniteError
from orchestrator.errors import KebenchError
from orchestrator.models import LoadedModel

#: model types whose decoder layers take (hidden, attention_mask, position_ids, past_key_values,
#: position_embeddings) and whose attention only calls ``past_key_values.update``: the split forward is
#: exact for them.  Other architectures use the full forward.
SPLIT_FORWARD_MODEL_TYPES = frozenset({"llama"})


class BasisIntervention(nn.Module):
    """Φ(h) = h + Rᵀ W(h)(A h + b − R h) for one layer; ``gated=False`` gives ReFT (W ≡ I)."""

    def __init__(self, hidden_size: int, rank: int, gated: bool) -> None:
        super().__init__()
        if not 0 < rank <= hidden_size:
            raise KebenchError(f"rank must be in 1..{hidden_size}, got {rank}")
        rotation = nn.Linear(hidden_size, rank, bias=False)
        nn.init.orthogonal_(rotation.weight)
        # A wide (r×d) weight under the orthogonal parametrization keeps orthonormal rows: R Rᵀ = I.
        self.rotation = parametrizations.orthogonal(rotation)
        self.source = nn.Linear(hidden_size, rank)  # A h + b, initialised as in pyreft's LoReFT
        self.gate: nn.Linear | None = None
        if gated:
            # Zero init: every basis starts at weight 1/2, so no basis is favoured before training.
            self.gate = nn.Linear(hidden_size, rank)
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


class _SplitForward:
    """Runs the frozen part of a batch once; each ``__call__`` runs layers ``start..`` on the live columns."""

    def __init__(self, lm: LoadedModel, batch: TFBatch, start_layer: int, split_column: int) -> None:
        inner = lm.model.model
        self.inner = inner
        self.start_layer = start_layer
        self.split_column = split_column
        ids = batch.input_ids
        width = ids.shape[1]
        positions = torch.arange(width, device=ids.device)[None, :]
        with torch.no_grad():
            embeds = inner.embed_tokens(ids)
            cos, sin = inner.rotary_emb(embeds, positions)
            self.kv = _PrefixKV()
            s = split_column
            if s > 0:
                prefix = embeds[:, :s]
                for layer in inner.layers:
                    prefix = layer(prefix, attention_mask=None, position_ids=positions[:, :s], past_key_values=self.kv,
                                   use_cache=False, position_embeddings=(cos[:, :s], sin[:, :s]))
            self.kv.recording = False
            live = width - s
            # Live queries see every prefix key and the live keys up to themselves.
            self.mask = torch.ones(live, s + live, dtype=torch.bool, device=ids.device).tril(diagonal=s)[None, None]
            self.position_ids = positions[:, s:]
            self.position_embeddings = (cos[:, s:], sin[:, s:])
            hidden = embeds[:, s:]
            for layer in inner.layers[:start_layer]:
                hidden = self._layer(layer, hidden)
            self.start_hidden = hidden

    def _layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=self.mask, position_ids=self.position_ids, past_key_values=self.kv,
                    use_cache=False, position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def __call__(self) -> torch.Tensor:
        """Final-norm hidden states of the live columns (column j here is column ``split_column + j``)."""
        hidden = self.start_hidden
        for layer in self.inner.layers[self.start_layer:]:
            hidden = self._layer(layer, hidden)
        return self.inner.norm(hidden)


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.interventions = nn.ModuleDict(
                {str(layer): BasisIntervention(lm.hidden_size, hparams.rank, self.gated) for layer in self.layer_ids}
            ).to(lm.device)
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
        edit_mask = mask.clone()
        edit_mask[n_edit:] = False
        irrelevant_mask = None
        if extra_pairs:
            irrelevant_mask = mask.clone()
            irrelevant_mask[:n_edit] = False

        if hp.fast_forward and self.split_forward_supported:
            split_column = int(mask.float().argmax(dim=1).min())  # first intervened column in any row
            runner = _SplitForward(lm, batch, self.layer_ids[0], split_column)
            live_mask = mask[:, split_column:]
            forward = lambda: runner()  # noqa: E731
            column_offset = split_column
        else:
            live_mask = mask
            forward = lambda: lm.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # noqa: E731
            column_offset = 0

        parameters = [p for p in self.interventions.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        step = 0
        while True:
            training = step < hp.max_steps
            with torch.set_grad_enabled(training):
                self._mask, self._recorded = live_mask, {}
                try:
                    hidden = forward()
                finally:
                    self._mask = None
                weights, self._recorded = self._recorded, None
                if hp.fast_forward:
                    states = hidden[targets.rows, targets.columns - column_offset]
                    logits = lm.model.lm_head(states)
                else:  # the naive variant: full-vocabulary logits at every position
                    logits = lm.model.lm_head(hidden)[targets.rows, targets.columns]
                ce = F.cross_entropy(logits.float(), targets.labels)
                edit_weights_mask = edit_mask[:, column_offset:]
                irrelevant_weights_mask = irrelevant_mask[:, column_offset:] if irrelevant_mask is not None else None
                terms = self.regularizers(weights, edit_weights_mask, irrelevant_weights_mask)
                loss = ce + sum((_same_magnitude(term, ce) for term in terms.values()), torch.zeros((), device=ce.device))
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteError(f"{self.name}: non-finite training loss at step {step}")
            if not training or float(ce.detach()) < hp.early_stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        self.after_edit({k: v.detach() for k, v in weights.items()}, edit_weights_mask)
        return EditStats(steps=step, loss=float(ce.detach()))


def _same_magnitude(term: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale a regularizer to the teacher-forcing loss's current value (its gradient direction is kept).

    The paper "rescale[s] the three terms to the same magnitude" (Eq. 4) without saying how; we multiply
    each term by stop_gradient(CE / term), so each contributes as much loss as the CE does at that step.
    A term that is (numerically) zero is already satisfied and is left as it is.
    """
    value = float(term.detach())
    if value <= 1e-8:
        return term
    return term * (reference.detach() / value)
