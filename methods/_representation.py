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

Case-parallel single editing (``Editor.independent``, the single scenario's ``parallel_cases``) trains K
independent edits in one batch: each case keeps its own editor (its own R, A, b, gates, AdamW state and
BaFT running means), the rows of case k pass through editor k's intervention only, and the loss summed
over the cases gives each case's parameters exactly its own gradient (they share no parameter, and
attention never crosses rows).  Each case stops on its own rule and leaves the batch with its parameters
where they were; the others go on.  One editor alone runs the very same code on one run of rows.  With
several cases the live tokens of all rows are packed into one sequence (``_Packing``, attention kept within
each row), so a step pays for the live tokens rather than for rows padded to the longest.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode
from methods.base import Editor, EditStats, IndependentEdits, NonFiniteError, group_runs
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


def _backbone(lm: LoadedModel) -> nn.Module:
    """The decoder stack that maps input ids to final-normed hidden states (``model.model`` for LLaMA)."""
    backbone = getattr(lm, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else lm.model.model


def _cache_keyword(layer: nn.Module) -> str:
    """The decoder layer's name for its key/value cache argument: ``cache`` from transformers 5.x (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


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

    packing: "_Packing | None" = None

    def __init__(self, lm: LoadedModel, batch: TFBatch) -> None:
        self.lm, self.batch = lm, batch

    def __call__(self) -> torch.Tensor:
        return _backbone(self.lm)(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).last_hidden_state

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        return per_column

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns

    def select(self, rows: torch.Tensor) -> "_FullForward":
        return _FullForward(self.lm, _batch_rows(self.batch, rows))


class _SplitForward:
    """Runs the frozen part of a batch once; each call runs layers ``start..`` on the live columns only.

    Row i is split at its own column s_i (its first intervened or first target-predicting column):
    columns before s_i never change during an edit, so their keys/values are computed once per layer.
    The live columns of every row are packed to the left of a [B, W] block with their true positions,
    so each step costs (live tokens) × (upper layers) instead of (all tokens) × (all layers).
    """

    def __init__(self, lm: LoadedModel, batch: TFBatch, start_layer: int, split: torch.Tensor,
                 packed: bool = False) -> None:
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
            self.cache_keyword = _cache_keyword(inner.layers[0])
            if prefix_width > 0:
                prefix_ids = batch.input_ids[:, :prefix_width]
                prefix = inner.embed_tokens(prefix_ids)
                positions = torch.arange(prefix_width, device=device)[None, :]
                cos, sin = inner.rotary_emb(prefix, positions)
                for layer in inner.layers:
                    prefix = layer(prefix, attention_mask=None, position_ids=positions, use_cache=False,
                                   position_embeddings=(cos, sin), **{self.cache_keyword: self.kv})
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
        self.packing = _Packing(self) if packed else None

    def _layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=self.mask, position_ids=self.position_ids, use_cache=False,
                    position_embeddings=self.position_embeddings, **{self.cache_keyword: self.kv})
        return out[0] if isinstance(out, tuple) else out

    def __call__(self) -> torch.Tensor:
        """Final-norm hidden states of the live block (row i, column j is column s_i + j of the batch)."""
        if self.packing is not None:
            return self.packing.unpack(self.packing())
        hidden = self.start_hidden
        for layer in self.inner.layers[self.start_layer:]:
            hidden = self._layer(layer, hidden)
        return self.inner.norm(hidden)

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        """A [B, L] per-column tensor (a mask) in the live block's layout; padding is False."""
        return per_column.gather(1, self.live_columns) & self.live_real

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns - self.split[rows]

    def select(self, rows: torch.Tensor) -> "_SplitForward":
        """The same frozen computation for a subset of the rows (no layer is run again)."""
        kept = object.__new__(_SplitForward)
        kept.inner, kept.start_layer, kept.cache_keyword = self.inner, self.start_layer, self.cache_keyword
        kept.split, kept.live_columns, kept.live_real = self.split[rows], self.live_columns[rows], self.live_real[rows]
        kept.kv = _PrefixKV()
        kept.kv.recording = False
        kept.kv.keys = {layer: key[rows] for layer, key in self.kv.keys.items()}
        kept.kv.values = {layer: value[rows] for layer, value in self.kv.values.items()}
        kept.mask, kept.position_ids, kept.start_hidden = self.mask[rows], self.position_ids[rows], self.start_hidden[rows]
        kept.position_embeddings = tuple(t[rows] for t in self.position_embeddings)
        kept.packing = _Packing(kept) if self.packing is not None else None
        return kept


class _Packing:
    """The live tokens of a ``_SplitForward`` packed into one sequence [1, T] (T = the live tokens, no padding).

    Rows of different live lengths padded to the longest make every linear layer pay for the padding; packed,
    a step costs the live tokens alone.  Attention stays within a row: a packed query sees its own row's
    prefix keys (k < s_i) and its row's live keys up to itself, as in the padded block.  ``unpack`` gives the
    padded [B, W] layout back (padding zero) for everything that indexes rows and columns; the router's hooks
    unpack, intervene and pack again at the intervened layers.
    """

    def __init__(self, forward: "_SplitForward") -> None:
        self.forward = forward
        live_real = forward.live_real
        self.index = live_real.nonzero(as_tuple=True)  # (rows, columns) of each packed token, row-major
        token_rows = self.index[0]
        stored = next(iter(forward.kv.keys.values()), None)
        prefix_width = 0 if stored is None else stored.shape[2]  # kept rows keep the original prefix width
        prefix_real = torch.arange(prefix_width, device=live_real.device)[None, :] < forward.split[:, None]  # [B, S]
        prefix_rows = prefix_real.nonzero(as_tuple=True)[0]
        same_row_prefix = token_rows[:, None] == prefix_rows[None, :]  # [T, P]
        live_key_offset = self.index[1]
        causal = (token_rows[:, None] == token_rows[None, :]) & (live_key_offset[None, :] <= live_key_offset[:, None])
        self.mask = torch.cat([same_row_prefix, causal], dim=1)[None, None]  # [1, 1, T, P + T]
        self.position_ids = forward.position_ids[self.index][None]
        self.position_embeddings = tuple(t[self.index][None] for t in forward.position_embeddings)
        self.kv = _PrefixKV()
        self.kv.recording = False
        # the cache holds [B, heads, S, head_dim]; packed: each row's real prefix keys, one after another
        self.kv.keys = {layer: key.transpose(1, 2)[prefix_real].transpose(0, 1)[None]
                        for layer, key in forward.kv.keys.items()}
        self.kv.values = {layer: value.transpose(1, 2)[prefix_real].transpose(0, 1)[None]
                          for layer, value in forward.kv.values.items()}
        self.start_hidden = forward.start_hidden[self.index][None]

    def __call__(self) -> torch.Tensor:
        """Final-norm hidden states of the packed live tokens, [1, T, d]."""
        forward, hidden = self.forward, self.start_hidden
        for layer in forward.inner.layers[forward.start_layer:]:
            out = layer(hidden, attention_mask=self.mask, position_ids=self.position_ids, use_cache=False,
                        position_embeddings=self.position_embeddings, **{forward.cache_keyword: self.kv})
            hidden = out[0] if isinstance(out, tuple) else out
        return forward.inner.norm(hidden)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[self.index][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        rows, width = self.forward.live_real.shape
        padded = packed.new_zeros(rows, width, packed.shape[-1])
        return padded.index_put(self.index, packed[0])


def _batch_rows(batch: TFBatch, rows: torch.Tensor) -> TFBatch:
    """Rows ``rows`` of ``batch`` (the padded width is kept)."""
    return TFBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_lengths[rows], batch.lengths[rows],
                   None if batch.groups is None else batch.groups[rows])


@dataclass(frozen=True)
class _Targets:
    rows: torch.Tensor  # rows of the batch whose next-token predictions are trained
    columns: torch.Tensor  # the column that predicts each target token
    labels: torch.Tensor  # the target token ids


def _targets(batch: TFBatch, edit_rows: int | Sequence[int]) -> _Targets:
    """The trained target tokens of ``edit_rows`` (a count: the first rows of the batch)."""
    rows, columns, labels = [], [], []
    for i in (range(edit_rows) if isinstance(edit_rows, int) else edit_rows):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        rows.extend([i] * (n - p))
        columns.extend(range(p - 1, n - 1))
        labels.extend(batch.input_ids[i, p:n].tolist())
    device = batch.input_ids.device
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _Targets(as_long(rows), as_long(columns), as_long(labels))


@dataclass(frozen=True)
class _Route:
    """Rows ``start:stop`` of a batch go through ``editor``'s interventions."""

    editor: "RepresentationEditor"
    start: int
    stop: int


class _Router:
    """Forward hooks on the intervened layers that apply each run of batch rows its own editor's intervention.

    Inactive (the hooks return the layer's output untouched) unless a forward runs inside ``active``.
    """

    def __init__(self, lm: LoadedModel, layer_ids: Sequence[int]) -> None:
        self.layer_ids = tuple(layer_ids)
        self.routes: Sequence[_Route] | None = None
        self.mask: torch.Tensor | None = None
        self.recorded: list[dict[int, torch.Tensor]] | None = None
        self.packing: _Packing | None = None
        self.handles = [lm.layers[layer].register_forward_hook(self._hook(layer)) for layer in self.layer_ids]

    @contextlib.contextmanager
    def active(self, routes: Sequence[_Route], mask: torch.Tensor, record: bool = False,
               packing: "_Packing | None" = None) -> Iterator[list[dict[int, torch.Tensor]]]:
        """Route the forwards run inside; with ``record`` the yielded list receives, per route, each layer's
        basis weights [rows, positions, r].  With ``packing`` the layers see packed tokens, and ``mask`` is in
        the padded layout ``packing.unpack`` returns."""
        recorded: list[dict[int, torch.Tensor]] = [{} for _ in routes]
        self.routes, self.mask, self.recorded = routes, mask, recorded if record else None
        self.packing = packing
        try:
            yield recorded
        finally:
            self.routes, self.mask, self.recorded, self.packing = None, None, None, None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            routes, mask = self.routes, self.mask
            if routes is None or mask is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            packing = self.packing
            if packing is not None:
                hidden = packing.unpack(hidden)
            if hidden.shape[:2] != mask.shape:
                raise RuntimeError(f"intervention mask {tuple(mask.shape)} does not fit hidden {tuple(hidden.shape)}")
            whole = len(routes) == 1
            pieces = []
            for index, route in enumerate(routes):
                part = hidden if whole else hidden[route.start:route.stop]
                part_mask = mask if whole else mask[route.start:route.stop]
                edited, weights = route.editor.interventions[str(layer)](part)
                if self.recorded is not None:
                    self.recorded[index][layer] = weights
                pieces.append(torch.where(part_mask[..., None], edited.to(part.dtype), part))
            hidden = pieces[0] if whole else torch.cat(pieces)
            if packing is not None:
                hidden = packing.pack(hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


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
        self._router: _Router | None = _Router(lm, self.layer_ids)
        self.split_forward_supported = getattr(lm.model.config, "model_type", "") in SPLIT_FORWARD_MODEL_TYPES

    @classmethod
    def independent(cls, lm: LoadedModel, hparams, seed: int, copies: int) -> "CaseParallel":
        return CaseParallel([cls(lm, hparams, seed) for _ in range(copies)])

    def _whole(self, rows: int) -> list[_Route]:
        return [_Route(self, 0, rows)]

    def logits(self, batch: TFBatch) -> torch.Tensor:
        if self._router is None:
            raise RuntimeError("editor was restored; build a new one")
        with self._router.active(self._whole(batch.size), batch.intervention_mask(self.hparams.last_prompt_tokens)):
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def restore(self) -> None:
        if self._router is not None:
            self._router.remove()
        self._router = None

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
        router = self._router if self._router is not None else _Router(lm, self.layer_ids)
        try:
            with torch.no_grad(), router.active(self._whole(batch.size), mask, record=True) as recorded:
                _backbone(lm)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        finally:
            if router is not self._router:
                router.remove()
        weight = mask[..., None].float()
        counts = weight.sum(dim=1).clamp_min(1.0)  # [B, 1]
        means = [(recorded[0][layer].float() * weight).sum(dim=1) / counts for layer in self.layer_ids]
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

    def optimizer(self) -> torch.optim.Optimizer:
        """The AdamW of this edit call: a fresh one per call unless ``reset_optimizer`` is off."""
        hp = self.hparams
        if self._optimizer is None or hp.reset_optimizer:
            parameters = [p for p in self.interventions.parameters() if p.requires_grad]
            self._optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        return self._optimizer

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        if self._router is None:
            raise RuntimeError("editor was restored; build a new one")
        return _train(self._router, [_Job(self, cases)])[0]


@dataclass
class _Job:
    """One editor's edit call inside a training batch: its cases, and its rows (edit rows, then unrelated)."""

    editor: RepresentationEditor
    cases: Sequence[EditCase]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    n_edit: int = 0
    has_irrelevant: bool = False
    stats: EditStats | None = None

    def __post_init__(self) -> None:
        edit_pairs = [(case.prompt, case.target_new) for case in self.cases]
        extra_pairs = self.editor.irrelevant_pairs(self.cases)
        self.pairs, self.n_edit, self.has_irrelevant = edit_pairs + extra_pairs, len(edit_pairs), bool(extra_pairs)


@dataclass(frozen=True)
class _Part:
    """Where one job sits in a layout: its rows and its slice of the target tokens."""

    rows: slice
    targets: slice


class _Layout:
    """The batch of the jobs still training: tokens, the forward runner, masks in the live layout, targets."""

    @classmethod
    def build(cls, lm: LoadedModel, jobs: Sequence[_Job], packed: bool = False) -> "_Layout":
        editor = jobs[0].editor
        hp = editor.hparams
        batch = encode(lm.tokenizer, [pair for job in jobs for pair in job.pairs], lm.pad_token_id).to(lm.device)
        if hp.fast_forward and editor.split_forward_supported:
            is_edit = torch.cat([torch.arange(len(job.pairs)) < job.n_edit for job in jobs]).to(batch.input_ids.device)
            first_intervened = batch.intervention_mask(hp.last_prompt_tokens).float().argmax(dim=1)
            first_predicting = (batch.prompt_lengths - 1).clamp_min(0)
            first_predicting = torch.where(is_edit, first_predicting, batch.lengths)  # unrelated rows train no tokens
            runner: _FullForward | _SplitForward = _SplitForward(
                lm, batch, editor.layer_ids[0], torch.minimum(first_intervened, first_predicting), packed=packed)
        else:
            runner = _FullForward(lm, batch)
        return cls(jobs, batch, runner)

    def keep(self, positions: Sequence[int]) -> "_Layout":
        """The layout of the jobs at ``positions`` only: their rows of the batch and of the frozen computation."""
        rows = torch.cat([torch.arange(self.parts[i].rows.start, self.parts[i].rows.stop) for i in positions])
        rows = rows.to(self.batch.input_ids.device)
        return _Layout([self.jobs[i] for i in positions], _batch_rows(self.batch, rows), self.runner.select(rows))

    def __init__(self, jobs: Sequence[_Job], batch: TFBatch, runner: "_FullForward | _SplitForward") -> None:
        hp = jobs[0].editor.hparams
        self.jobs, self.batch, self.runner = list(jobs), batch, runner
        mask = batch.intervention_mask(hp.last_prompt_tokens)
        edit_rows, parts, row, target = [], [], 0, 0
        is_edit = torch.zeros(batch.size, dtype=torch.bool, device=batch.input_ids.device)
        for job in jobs:
            edit_rows.extend(range(row, row + job.n_edit))
            is_edit[row:row + job.n_edit] = True
            job_targets = int((batch.lengths[row:row + job.n_edit] - batch.prompt_lengths[row:row + job.n_edit]).sum())
            parts.append(_Part(slice(row, row + len(job.pairs)), slice(target, target + job_targets)))
            row, target = row + len(job.pairs), target + job_targets
        self.parts = parts
        self.routes = [_Route(job.editor, part.rows.start, part.rows.stop) for job, part in zip(jobs, parts)]
        self.targets = _targets(batch, edit_rows)
        edit_mask = mask & is_edit[:, None]
        irrelevant_mask = mask & ~is_edit[:, None]
        self.live_mask = self.runner.gather(mask)
        self.live_edit_mask = self.runner.gather(edit_mask)
        self.live_irrelevant_mask = self.runner.gather(irrelevant_mask)
        self.target_columns = self.runner.column(self.targets.rows, self.targets.columns)


def _train(router: _Router, jobs: Sequence[_Job], packed: bool = False) -> list[EditStats]:
    """Train every job's editor on its own cases, all jobs in one batch, each until its own stopping rule.

    Each job's loss is exactly what it would be alone (its CE over its target tokens, its regularizers on its
    rows, its scales); their sum gives each job's parameters their own gradient, and each job's AdamW steps
    only while the job trains.  A job that stops leaves the batch: its rows are dropped from the batch and
    from the frozen computation, which is not run again.
    """
    editor = jobs[0].editor
    hp, lm = editor.hparams, editor.lm
    optimizers = [job.editor.optimizer() for job in jobs]
    active = list(range(len(jobs)))
    layout = _Layout.build(lm, jobs, packed)
    head = lm.model.get_output_embeddings()
    step = 0
    while active:
        training = step < hp.max_steps
        losses: list[tuple[int, torch.Tensor]] = []
        with torch.set_grad_enabled(training):
            with router.active(layout.routes, layout.live_mask, record=True, packing=layout.runner.packing) as recorded:
                hidden = layout.runner()
            if hp.fast_forward:
                logits = head(hidden[layout.targets.rows, layout.target_columns])
            else:  # the naive variant: full-vocabulary logits at every position
                logits = head(hidden)[layout.targets.rows, layout.target_columns]
            for position, job_index in enumerate(active):
                job, part = jobs[job_index], layout.parts[position]
                ce = F.cross_entropy(logits[part.targets].float(), layout.targets.labels[part.targets])
                edit_mask = layout.live_edit_mask[part.rows]
                irrelevant_mask = layout.live_irrelevant_mask[part.rows] if job.has_irrelevant else None
                terms = job.editor.regularizers(recorded[position], edit_mask, irrelevant_mask)
                loss = job.editor.combine_loss(ce, terms, first_step=step == 0)
                if not math.isfinite(float(loss.detach())):
                    where = f" (case {job.cases[0].case_id})" if len(jobs) > 1 else ""
                    raise NonFiniteError(f"{job.editor.name}: non-finite training loss at step {step}{where}")
                target_tokens = part.targets.stop - part.targets.start
                if not training or job.editor.stop_value(ce, loss, target_tokens) < hp.early_stop_loss:
                    job.editor.after_edit({k: v.detach() for k, v in recorded[position].items()}, edit_mask)
                    job.stats = EditStats(steps=step, loss=float(ce.detach()))
                else:
                    losses.append((job_index, loss))
        if not losses:
            break
        for job_index, _ in losses:
            optimizers[job_index].zero_grad(set_to_none=True)
        total = losses[0][1] if len(losses) == 1 else torch.stack([loss for _, loss in losses]).sum()
        total.backward()
        for job_index, _ in losses:
            optimizers[job_index].step()
        step += 1
        still = [job_index for job_index, _ in losses]
        if still != active:
            layout = layout.keep([active.index(job_index) for job_index in still])
            active = still
    return [job.stats for job in jobs]  # type: ignore[misc]


class CaseParallel(IndependentEdits):
    """K single edits of one representation method at once: case i is edited by ``editors[i]`` alone."""

    def __init__(self, editors: Sequence[RepresentationEditor]) -> None:
        if not editors:
            raise KebenchError("case-parallel editing needs at least one editor")
        self.editors = list(editors)
        self.lm = editors[0].lm
        self.hparams = editors[0].hparams
        self._router: _Router | None = _Router(self.lm, editors[0].layer_ids)

    def apply(self, cases: Sequence[EditCase]) -> list[EditStats]:
        if self._router is None:
            raise RuntimeError("editors were restored; build new ones")
        if len(cases) != len(self.editors):
            raise KebenchError(f"{len(cases)} cases for {len(self.editors)} case-parallel editors")
        jobs = [_Job(editor, [case]) for editor, case in zip(self.editors, cases)]
        return _train(self._router, jobs, packed=len(jobs) > 1)

    def logits(self, batch: TFBatch) -> torch.Tensor:
        if self._router is None:
            raise RuntimeError("editors were restored; build new ones")
        routes = [_Route(self.editors[case], start, stop) for case, start, stop in group_runs(batch)]
        with self._router.active(routes, batch.intervention_mask(self.hparams.last_prompt_tokens)):
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def restore(self) -> None:
        if self._router is not None:
            self._router.remove()
        self._router = None
        for editor in self.editors:
            editor.restore()
