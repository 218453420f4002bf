"""The shared forward engine of the editors that train through a frozen model (BaFT/ReFT, GRACE, ROME).

``FullForward`` runs the whole model on a batch at every step.  ``SplitForward`` runs the frozen part
once: no token before a row's first live column depends on the learned parameters (attention is causal),
so the keys/values of those prefix columns are recorded once per layer (``PrefixKV``), and each step runs
only the layers from ``start_layer`` up on the live columns.  ``answer_targets`` names the tokens a
teacher-forced edit trains.  Both runners expose ``gather``/``column``/``select`` so a trainer can map
per-column masks and target positions into the layout it runs on.

These were private names of ``methods/_representation.py``; GRACE and ROME imported them from there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from benchmarks.metrics import TFBatch
from kebench.core.models import LoadedModel

#: model types whose decoder layers take (hidden, attention_mask, position_ids, past_key_values,
#: position_embeddings) and whose attention only calls ``past_key_values.update``: the split forward is
#: exact for them.  Other architectures use the full forward.
SPLIT_FORWARD_MODEL_TYPES = frozenset({"llama"})


def backbone(lm: LoadedModel) -> nn.Module:
    """The decoder stack that maps input ids to final-normed hidden states (``model.model`` for LLaMA)."""
    backbone = getattr(lm, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else lm.model.model


def cache_keyword(layer: nn.Module) -> str:
    """The decoder layer's name for its key/value cache argument: ``cache`` from transformers 5.x (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class PrefixKV:
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


def call_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               embeddings: tuple[torch.Tensor, torch.Tensor], cache_keyword: str, kv: "PrefixKV | None") -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=False, position_embeddings=embeddings,
                **{cache_keyword: kv})
    return out[0] if isinstance(out, tuple) else out


class FullForward:
    """The naive variant: the whole model on the whole batch at every step."""

    packing: Any = None  # the packed layout a trainer routes through (``_representation._Blocks``); none here

    def __init__(self, lm: LoadedModel, batch: TFBatch) -> None:
        self.lm, self.batch = lm, batch

    def __call__(self) -> torch.Tensor:
        return backbone(self.lm)(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).last_hidden_state

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        return per_column

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns

    def select(self, rows: torch.Tensor) -> "FullForward":
        return FullForward(self.lm, batch_rows(self.batch, rows))


class SplitForward:
    """Runs the frozen part of a batch once; each call runs layers ``start..`` on the live columns only.

    Row i is split at its own column s_i (its first intervened or first target-predicting column):
    columns before s_i never change during an edit, so their keys/values are computed once per layer.
    The live columns of every row are packed to the left of a [B, W] block with their true positions,
    so each step costs (live tokens) × (upper layers) instead of (all tokens) × (all layers).
    """

    packing: Any = None  # the router sees the padded [B, W] block itself

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
            self.kv = PrefixKV()
            self.cache_keyword = cache_keyword(inner.layers[0])
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

    def _layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return call_layer(layer, hidden, self.mask, self.position_ids, self.position_embeddings, self.cache_keyword,
                           self.kv)

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

    def select(self, rows: torch.Tensor) -> "SplitForward":
        """The same frozen computation for a subset of the rows (no layer is run again)."""
        kept = object.__new__(SplitForward)
        kept.inner, kept.start_layer, kept.cache_keyword = self.inner, self.start_layer, self.cache_keyword
        kept.split, kept.live_columns, kept.live_real = self.split[rows], self.live_columns[rows], self.live_real[rows]
        kept.kv = PrefixKV()
        kept.kv.recording = False
        kept.kv.keys = {layer: key[rows] for layer, key in self.kv.keys.items()}
        kept.kv.values = {layer: value[rows] for layer, value in self.kv.values.items()}
        kept.mask, kept.position_ids, kept.start_hidden = self.mask[rows], self.position_ids[rows], self.start_hidden[rows]
        kept.position_embeddings = tuple(t[rows] for t in self.position_embeddings)
        return kept


def batch_rows(batch: TFBatch, rows: torch.Tensor) -> TFBatch:
    """Rows ``rows`` of ``batch`` (the padded width is kept)."""
    return TFBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_lengths[rows], batch.lengths[rows],
                   None if batch.groups is None else batch.groups[rows])


@dataclass(frozen=True)
class Targets:
    rows: torch.Tensor  # rows of the batch whose next-token predictions are trained
    columns: torch.Tensor  # the column that predicts each target token
    labels: torch.Tensor  # the target token ids


def answer_targets(batch: TFBatch, edit_rows: int | Sequence[int]) -> Targets:
    """The trained target tokens of ``edit_rows`` (a count: the first rows of the batch)."""
    rows, columns, labels = [], [], []
    for i in (range(edit_rows) if isinstance(edit_rows, int) else edit_rows):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        rows.extend([i] * (n - p))
        columns.extend(range(p - 1, n - 1))
        labels.extend(batch.input_ids[i, p:n].tolist())
    device = batch.input_ids.device
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Targets(as_long(rows), as_long(columns), as_long(labels))
