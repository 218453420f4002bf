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
where they were; the others go on, and the next case takes its place at the following step
(``edit_in_parallel``), so the batch stays full until the cases run out.  One editor alone runs the very
same code on one run of rows.  With several cases the live tokens of all rows are packed into a few
sequences (``_Blocks``, attention kept within each row), so a step pays for the live tokens rather than for
rows padded to the longest, and rows that train no token leave after the highest intervened layer.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode, forward_logits, prefix_causal
from methods._forward import (SPLIT_FORWARD_MODEL_TYPES, FullForward, PrefixKV, SplitForward, Targets,
                             answer_targets, backbone, batch_rows, cache_keyword, call_layer)
from methods.base import EditedCases, Editor, EditStats, IndependentEdits, NonFiniteError, group_runs
from methods.hparams import at_depth
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

#: pairs per forward when basis weights are read out (a long stream's artifacts would otherwise be one batch)
BASIS_WEIGHT_ROWS = 32

#: what ``early_stop_loss`` is compared with (``early_stop_on``; see ``RepresentationEditor.stop_value``)
EARLY_STOP_RULES = ("mean_ce", "sum_ce", "total")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What interventions train and run in: float32 for a float32 or half-precision model (small steps are not
    rounded away), float64 for a float64 model (the equivalence tests run there, below float32's rounding)."""
    return torch.promote_types(dtype, torch.float32)


class OrthonormalRows(nn.Module):
    """Parametrize a wide r×d matrix by the orthonormal factor of its QR decomposition: R Rᵀ = I exactly.

    A smooth map (the QR sign ambiguity is fixed by a positive diagonal), and for a 12×576 matrix about
    ten times cheaper per step than torch's Householder default for non-square orthogonal maps, which
    dominated the step time of a small model.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """[..., r, d] -> the orthonormal rows of each r×d matrix (a leading dimension stacks cases)."""
        q, r = torch.linalg.qr(weight.transpose(-2, -1).to(compute_dtype(weight.dtype)))
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        return (q * signs[..., None, :]).transpose(-2, -1)

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
        """(Φ(h), w(h)) computed in the intervention's dtype (``compute_dtype``)."""
        h32 = h.to(self.source.weight.dtype)
        r = self.rotation.weight  # [r, d], orthonormal rows
        weights = self.basis_weights(h32)
        delta = weights * (self.source(h32) - h32 @ r.T)
        return h32 + delta @ r, weights

    @staticmethod
    def stacked(interventions: Sequence["BasisIntervention"], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of K interventions of one shape at once: h is [K, T, d], row k through ``interventions[k]``.

        The same arithmetic as ``forward`` (each case's R from the QR of its own raw matrix, A h + b and R h as
        separate products), batched over the case dimension, so K cases cost one set of kernels instead of K.
        """
        h32, first = h.to(interventions[0].source.weight.dtype), interventions[0]
        raw = torch.stack([iv.rotation.parametrizations.weight.original for iv in interventions])  # [K, r, d]
        rotation = first.rotation.parametrizations.weight[0](raw)  # OrthonormalRows of each case's own matrix
        source_weight = torch.stack([iv.source.weight for iv in interventions])
        source_bias = torch.stack([iv.source.bias for iv in interventions])
        source = torch.baddbmm(source_bias[:, None, :], h32, source_weight.transpose(1, 2))
        if first.gate is None:
            weights = first.basis_weights(h32)  # ReFT: W ≡ I
        else:
            gate_weight = torch.stack([iv.gate.weight for iv in interventions])  # type: ignore[union-attr]
            gate_bias = torch.stack([iv.gate.bias for iv in interventions])  # type: ignore[union-attr]
            weights = torch.sigmoid(torch.baddbmm(gate_bias[:, None, :], h32, gate_weight.transpose(1, 2)))
        delta = weights * (source - h32 @ rotation.transpose(1, 2))
        return h32 + delta @ rotation, weights


@dataclass(frozen=True)
class _LiveRow:
    """One row's frozen computation without padding, what packed layouts are assembled from: the keys and
    values of its ``split`` prefix columns at the layers that run at every step, and its live columns at the
    input of the lowest of them."""

    split: int
    keys: dict[int, torch.Tensor]  # layer -> [kv heads, split, head dim]
    values: dict[int, torch.Tensor]
    start_hidden: torch.Tensor  # [n, d]
    position_ids: torch.Tensor  # [n]
    cos: torch.Tensor  # [n, rotary dim]
    sin: torch.Tensor
    intervened: torch.Tensor  # [n] bool
    is_edit: bool
    target_columns: torch.Tensor  # the live columns that predict a target token
    labels: torch.Tensor  # those target tokens

    @property
    def length(self) -> int:
        return int(self.start_hidden.shape[0])


def _bins(lengths: Sequence[int], prefixes: Sequence[int], hidden_size: int) -> list[list[int]]:
    """Rows grouped into the sequences of a packed batch, the grouping that minimises the estimated step cost.

    One sequence holding every row pays for no padding but makes each layer's attention compare every live
    token with every key of every row (only its own row's are unmasked); one sequence per row pays the
    padding of the longest row.  For each count of sequences the rows go longest first to the shortest
    sequence; the cost of a [G, W] block with P prefix keys is G·W·(1 + (P + W)/(3d)), since a decoder layer
    spends about 21·d² FLOPs a token in its linear maps (LLaMA-shaped MLP) and 4·d a (query, key) pair in
    attention, and CPU attention kernels run slower per FLOP than matmuls.
    """
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    best: list[list[int]] = [list(range(len(lengths)))]
    best_cost = math.inf
    for count in range(1, len(lengths) + 1):
        loads = [(0, index) for index in range(count)]
        members: list[list[int]] = [[] for _ in range(count)]
        prefix = [0] * count
        for row in order:
            load, index = heapq.heappop(loads)
            members[index].append(row)
            prefix[index] += prefixes[row]
            heapq.heappush(loads, (load + lengths[row], index))
        width = max(load for load, _ in loads)
        cost = count * width * (1 + (max(prefix) + width) / (3 * hidden_size))
        if cost < best_cost:
            best, best_cost = [sorted(rows) for rows in members if rows], cost
    return best


@dataclass(frozen=True)
class _Routing:
    """Where the intervened tokens of each route (a case's rows) sit in a packed block."""

    tokens: torch.Tensor  # flat block positions, route after route
    places: list[tuple[torch.Tensor, torch.Tensor]]  # per route: (row within the route, column) in the padded layout
    counts: list[int]  # per route: how many
    stacked: torch.Tensor  # [K, T] the same positions, one row per route (short rows padded with position 0)
    real: torch.Tensor  # [K, T] the entries of ``stacked`` that are tokens; row-major they are ``tokens``


@dataclass(frozen=True)
class _Plan:
    """Rows packed into the sequences ``_bins`` chooses: a [G, W] block of their tokens, each row's ``prefix`` cached
    keys in a [G, P] block beside it, and the attention mask that keeps every query within its own row (a query sees
    its row's prefix keys and its row's tokens up to itself, exactly what it sees in a padded layout)."""

    shape: tuple[int, int]
    prefix_width: int
    order: list[int]  # the rows in the order of the token indices below
    places: dict[int, tuple[int, int]]  # row -> (sequence, first slot)
    token_row: list[int]  # per token (rows in ``order``, columns ascending): its row and column
    token_column: list[int]
    packed_index: tuple[torch.Tensor, torch.Tensor]  # per token: its (sequence, slot)
    prefix_index: tuple[torch.Tensor, torch.Tensor]  # per prefix key (same row order): its (sequence, slot)
    mask: torch.Tensor  # [G, 1, W, P + W] bool

    @classmethod
    def build(cls, lengths: Sequence[int], prefixes: Sequence[int], hidden_size: int, device: torch.device) -> "_Plan":
        bins = _bins(lengths, prefixes, hidden_size)
        width = max(sum(lengths[row] for row in members) for members in bins)
        prefix_width = max(sum(prefixes[row] for row in members) for members in bins)
        count = len(bins)
        query_row = torch.full((count, width), -1, dtype=torch.long)
        query_offset = torch.zeros(count, width, dtype=torch.long)
        prefix_row = torch.full((count, prefix_width), -1, dtype=torch.long)
        token_row, token_column, token_bin, token_slot, prefix_bin, prefix_slot = [], [], [], [], [], []
        places = {}
        for index, members in enumerate(bins):
            offset = prefix_offset = 0
            for row in members:
                length, split = lengths[row], prefixes[row]
                places[row] = (index, offset)
                query_row[index, offset:offset + length] = row
                query_offset[index, offset:offset + length] = torch.arange(length)
                prefix_row[index, prefix_offset:prefix_offset + split] = row
                token_row += [row] * length
                token_column += range(length)
                token_bin += [index] * length
                token_slot += range(offset, offset + length)
                prefix_bin += [index] * split
                prefix_slot += range(prefix_offset, prefix_offset + split)
                offset, prefix_offset = offset + length, prefix_offset + split
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        query_row, query_offset, prefix_row = query_row.to(device), query_offset.to(device), prefix_row.to(device)
        real = (query_row >= 0)[:, :, None]
        sees_prefix = (prefix_row[:, None, :] == query_row[:, :, None]) & real
        same_row = query_row[:, None, :] == query_row[:, :, None]
        sees_live = same_row & (query_offset[:, None, :] <= query_offset[:, :, None]) & real
        # a padding slot attends to itself alone, so that no softmax row is empty (its output is never read)
        sees_live |= torch.eye(width, dtype=torch.bool, device=device)[None] & ~real
        return cls((count, width), prefix_width, [row for members in bins for row in members], places, token_row,
                   token_column, (as_index(token_bin), as_index(token_slot)), (as_index(prefix_bin), as_index(prefix_slot)),
                   torch.cat([sees_prefix, sees_live], dim=2)[:, None])

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token values ([N, ...], rows in ``order``) laid out in the [G, W] block (padding zero)."""
        return tokens.new_zeros(*self.shape, *tokens.shape[1:]).index_put(self.packed_index, tokens)

    def tokens(self, block: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scatter``: [N, ...] in ``order``."""
        return block[self.packed_index]


class _Blocks:
    """Live rows packed into a few sequences, a [G, W] block with little padding (``_Plan``), with their prefix keys and
    values at the layers ``layers``.  ``pack`` and ``unpack`` convert between the block and the padded [B, W] layout
    (``row_ids`` give each row's place there; padding is zero)."""

    def __init__(self, rows: Sequence[_LiveRow], row_ids: Sequence[int], unpacked_shape: tuple[int, int],
                 hidden_size: int, layers: range) -> None:
        device = rows[0].start_hidden.device
        plan = _Plan.build([row.length for row in rows], [row.split for row in rows], hidden_size, device)
        self.plan, self.shape, self.unpacked_shape, self.mask = plan, plan.shape, unpacked_shape, plan.mask
        self.packed_index = plan.packed_index
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        self.unpacked_index = (as_index([row_ids[row] for row in plan.token_row]), as_index(plan.token_column))
        self._routing: tuple | None = None
        self.in_order = [rows[row] for row in plan.order]  # the order of the token indices above
        self.position_ids = self.scatter_rows([row.position_ids for row in self.in_order])
        self.position_embeddings = (self.scatter_rows([row.cos for row in self.in_order]),
                                    self.scatter_rows([row.sin for row in self.in_order]))
        self.kv = PrefixKV()
        self.kv.recording = False
        for layer in sorted({layer for row in rows for layer in row.keys if layer in layers}):
            for stored, per_row in ((self.kv.keys, [row.keys for row in self.in_order]),
                                    (self.kv.values, [row.values for row in self.in_order])):
                tokens = torch.cat([kv[layer].transpose(0, 1) for kv in per_row if layer in kv])  # [sum split, heads, dim]
                block = tokens.new_zeros(plan.shape[0], plan.prefix_width, *tokens.shape[1:])
                stored[layer] = block.index_put(plan.prefix_index, tokens).transpose(1, 2)  # [G, heads, P, dim]

    def routing(self, routes: Sequence[_Route], mask: torch.Tensor) -> "_Routing":
        """Where each route's intervened tokens are (``_Routing``).  Computed once per (routes, mask): a layout asks at
        every layer."""
        if self._routing is None or self._routing[0] is not routes or self._routing[1] is not mask:
            rows, columns = self.unpacked_index
            flat = self.packed_index[0] * self.shape[1] + self.packed_index[1]
            intervened = mask[rows, columns]
            tokens, places = [], []
            for route in routes:
                mine = intervened & (rows >= route.start) & (rows < route.stop)
                tokens.append(flat[mine])
                places.append((rows[mine] - route.start, columns[mine]))
            counts = [len(route_tokens) for route_tokens in tokens]
            real = torch.arange(max(max(counts), 1))[None, :] < torch.tensor(counts)[:, None]
            real = real.to(flat.device)
            concatenated = torch.cat(tokens)
            stacked = torch.zeros(real.shape, dtype=torch.long, device=flat.device)
            stacked[real] = concatenated
            self._routing = (routes, mask, _Routing(concatenated, places, counts, stacked, real))
        return self._routing[2]

    def scatter_rows(self, per_row: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-row tensors ([n_i, ...], in ``in_order``) laid out in the block."""
        return self.plan.scatter(torch.cat(list(per_row)))

    def layer(self, layer: nn.Module, hidden: torch.Tensor, cache_keyword: str) -> torch.Tensor:
        return call_layer(layer, hidden, self.mask, self.position_ids, self.position_embeddings, cache_keyword, self.kv)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.plan.scatter(hidden[self.unpacked_index])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        padded = packed.new_zeros(*self.unpacked_shape, packed.shape[-1])
        return padded.index_put(self.unpacked_index, packed[self.packed_index])


class _Packing:
    """The runner of a packed layout: live rows packed into a few sequences (``_Blocks``), so that a step pays
    for the live tokens and hardly any padding.

    Rows that train no token (BaFT's unrelated rows) matter only through their basis weights at the intervened
    layers, so they leave the block after the highest intervened layer: the layers above run the edit rows
    alone (a second block).  Calling it returns the final-norm hidden states in the padded [B, W] layout
    (unrelated rows zero); at the intervened layers the router's hooks replace each case's intervened tokens
    in the lower block (``_Blocks.routing``).
    """

    def __init__(self, lm: LoadedModel, layer_ids: Sequence[int], rows: Sequence[_LiveRow]) -> None:
        inner = lm.model.model
        self.inner, self.cache_keyword = inner, cache_keyword(inner.layers[0])
        self.start_layer, self.top_layer = layer_ids[0], layer_ids[-1]
        shape = (len(rows), max(row.length for row in rows))
        edit_rows = [index for index, row in enumerate(rows) if row.is_edit]
        above = range(self.top_layer + 1, len(inner.layers))
        split_above = len(above) > 0 and 0 < len(edit_rows) < len(rows)
        lower_layers = range(self.start_layer, self.top_layer + 1 if split_above else len(inner.layers))
        self.lower = _Blocks(rows, range(len(rows)), shape, lm.hidden_size, lower_layers)
        self.start_hidden = self.lower.scatter_rows([row.start_hidden for row in self.lower.in_order])
        self.upper: _Blocks | None = None
        if split_above:
            self.upper = _Blocks([rows[index] for index in edit_rows], edit_rows, shape, lm.hidden_size, above)

    @property
    def packing(self) -> _Blocks:
        return self.lower

    def __call__(self) -> torch.Tensor:
        blocks, hidden = self.lower, self.start_hidden
        for index in range(self.start_layer, len(self.inner.layers)):
            if index == self.top_layer + 1 and self.upper is not None:
                blocks, hidden = self.upper, self.upper.pack(self.lower.unpack(hidden))
            hidden = blocks.layer(self.inner.layers[index], hidden, self.cache_keyword)
        return blocks.unpack(self.inner.norm(hidden))


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
        self.packing: _Blocks | None = None
        self.handles = [lm.layers[layer].register_forward_hook(self._hook(layer)) for layer in self.layer_ids]

    @contextlib.contextmanager
    def active(self, routes: Sequence[_Route], mask: torch.Tensor, record: bool = False,
               packing: "_Blocks | None" = None) -> Iterator[list[dict[int, torch.Tensor]]]:
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
                hidden = self._intervene_packed(packing, layer, hidden, routes, mask)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
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
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _intervene_packed(self, packing: "_Blocks", layer: int, hidden: torch.Tensor, routes: Sequence[_Route],
                          mask: torch.Tensor) -> torch.Tensor:
        """The packed block with each route's intervened tokens replaced by its editor's Φ(h); the recorded basis
        weights are laid out per route as [rows, W, r] (zero where nothing is intervened)."""
        routing = packing.routing(routes, mask)
        flat = hidden.reshape(-1, hidden.shape[-1])
        interventions = [route.editor.interventions[str(layer)] for route in routes]
        outputs, weights = BasisIntervention.stacked(interventions, flat[routing.stacked])  # [K, T, d], [K, T, r]
        if self.recorded is not None:
            for index, route in enumerate(routes):
                shape = (route.stop - route.start, mask.shape[1], weights.shape[-1])
                taken = weights[index, :routing.counts[index]]
                self.recorded[index][layer] = weights.new_zeros(shape).index_put(routing.places[index], taken)
        return flat.index_put((routing.tokens,), outputs[routing.real].to(flat.dtype)).view_as(hidden)


class RepresentationEditor(Editor):
    """The shared machinery; subclasses choose ``gated`` and add regularizers in ``regularizers``."""

    gated: bool = False

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        # 9,18,24,28 of 32; 8,17,22,26 of 30; 8,16,21,24 of 28
        return {"layers": at_depth(num_layers, 0.28, 0.56, 0.74, 0.87)}

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
            ).to(device=lm.device, dtype=compute_dtype(lm.dtype))
        self._optimizer: torch.optim.Optimizer | None = None
        self._router: _Router | None = _Router(lm, self.layer_ids)
        self.split_forward_supported = getattr(lm.model.config, "model_type", "") in SPLIT_FORWARD_MODEL_TYPES

    @property
    def runs_split_forward(self) -> bool:
        """Training runs the frozen part once per edit (``fast_forward`` on a model the split forward supports)."""
        return bool(self.hparams.fast_forward) and self.split_forward_supported

    @classmethod
    def independent(cls, lm: LoadedModel, hparams, seed: int, copies: int) -> "CaseParallel":
        return CaseParallel([cls(lm, hparams, seed) for _ in range(copies)])

    @classmethod
    def edit_in_parallel(cls, lm: LoadedModel, hparams, seed: int, cases: Sequence[EditCase],
                         window: int) -> Iterator[EditedCases]:
        return _edit_in_windows(cls, lm, hparams, seed, list(cases), window)

    def _whole(self, rows: int) -> list[_Route]:
        return [_Route(self, 0, rows)]

    @prefix_causal
    def logits(self, batch: TFBatch) -> torch.Tensor:
        # Prefix-causal: each intervened position is chosen by its column alone (last prompt tokens, answer
        # or generated tokens) and Φ reads only that position's own hidden state, so a KV cache holds.
        if self._router is None:
            raise RuntimeError("editor was restored; build a new one")
        mask = batch.live(batch.intervention_mask(self.hparams.last_prompt_tokens))
        with self._router.active(self._whole(batch.size), mask):
            return forward_logits(self.lm.model, batch)

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

        Runs the model under ``torch.no_grad()``, ``BASIS_WEIGHT_ROWS`` pairs at a time; an editor that was
        restored hooks itself on for the call and off again, so the model is left as it was.
        """
        if not pairs:
            return torch.zeros(0, len(self.layer_ids), self.hparams.rank, dtype=torch.float32)
        return torch.cat([self._mean_basis_weights(pairs[start:start + BASIS_WEIGHT_ROWS])
                          for start in range(0, len(pairs), BASIS_WEIGHT_ROWS)])

    def _mean_basis_weights(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        lm = self.lm
        batch = encode(lm.tokenizer, list(pairs), lm.pad_token_id).to(lm.device)
        mask = batch.intervention_mask(self.hparams.last_prompt_tokens)
        router = self._router if self._router is not None else _Router(lm, self.layer_ids)
        try:
            with torch.no_grad(), router.active(self._whole(batch.size), mask, record=True) as recorded:
                backbone(lm)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
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


@dataclass(eq=False)
class _Job:
    """One editor's edit call inside a training batch: its cases, its rows (edit rows, then unrelated), and
    its own step count (jobs join and leave a batch at different steps)."""

    editor: RepresentationEditor
    cases: Sequence[EditCase]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    n_edit: int = 0
    has_irrelevant: bool = False
    stats: EditStats | None = None
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    rows: list[_LiveRow] = field(default_factory=list)  # packed layouts: the frozen computation of its rows

    def __post_init__(self) -> None:
        edit_pairs = [(case.prompt, case.target_new) for case in self.cases]
        extra_pairs = self.editor.irrelevant_pairs(self.cases)
        self.pairs, self.n_edit, self.has_irrelevant = edit_pairs + extra_pairs, len(edit_pairs), bool(extra_pairs)

    @property
    def is_edit(self) -> torch.Tensor:
        return torch.arange(len(self.pairs)) < self.n_edit


@dataclass(frozen=True)
class _Part:
    """Where one job sits in a layout: its rows and its slice of the target tokens."""

    rows: slice
    targets: slice


def _encode_jobs(lm: LoadedModel, jobs: Sequence[_Job]) -> tuple[TFBatch, torch.Tensor]:
    """The rows of ``jobs``, one after another, and which of them are edit rows."""
    batch = encode(lm.tokenizer, [pair for job in jobs for pair in job.pairs], lm.pad_token_id).to(lm.device)
    return batch, torch.cat([job.is_edit for job in jobs]).to(batch.input_ids.device)


def _split_columns(batch: TFBatch, is_edit: torch.Tensor, intervened: torch.Tensor) -> torch.Tensor:
    """[B] each row's first live column: its first intervened or target-predicting column (nothing before it changes
    during an edit)."""
    first_intervened = intervened.float().argmax(dim=1)
    first_predicting = (batch.prompt_lengths - 1).clamp_min(0)
    first_predicting = torch.where(is_edit, first_predicting, batch.lengths)  # unrelated rows train no tokens
    return torch.minimum(first_intervened, first_predicting)


def _split_forward(lm: LoadedModel, jobs: Sequence[_Job], batch: TFBatch, is_edit: torch.Tensor) -> SplitForward:
    """The frozen computation of ``batch``, each row split at its first live column (``_split_columns``)."""
    editor = jobs[0].editor
    intervened = batch.intervention_mask(editor.hparams.last_prompt_tokens)
    return SplitForward(lm, batch, editor.layer_ids[0], _split_columns(batch, is_edit, intervened))


class _Layout:
    """The batch of the jobs still training: the forward runner, masks in its live layout, the targets.

    Padded (one job, or the naive full forward): a [B, W] block built from the jobs' tokens.  Packed (several
    jobs on the split forward): assembled from each job's ``_LiveRow``s, so that jobs leave and join the
    batch without running any frozen layer again for the jobs that stay.
    """

    @classmethod
    def build(cls, lm: LoadedModel, jobs: Sequence[_Job], packed: bool = False) -> "_Layout":
        splits = jobs[0].editor.runs_split_forward
        if packed and splits:
            _compute_live_rows(lm, jobs)
            return cls._packed(lm, jobs)
        batch, is_edit = _encode_jobs(lm, jobs)
        runner = _split_forward(lm, jobs, batch, is_edit) if splits else FullForward(lm, batch)
        return cls._padded(lm, jobs, batch, is_edit, runner)

    @classmethod
    def _padded(cls, lm: LoadedModel, jobs: Sequence[_Job], batch: TFBatch, is_edit: torch.Tensor,
                runner: "FullForward | SplitForward") -> "_Layout":
        mask = batch.intervention_mask(jobs[0].editor.hparams.last_prompt_tokens)
        edit_rows = is_edit.nonzero(as_tuple=True)[0].tolist()
        targets = answer_targets(batch, edit_rows)
        live_targets = Targets(targets.rows, runner.column(targets.rows, targets.columns), targets.labels)
        target_lengths = (batch.lengths - batch.prompt_lengths) * is_edit
        target_counts, row = [], 0
        for job in jobs:
            target_counts.append(int(target_lengths[row:row + len(job.pairs)].sum()))
            row += len(job.pairs)
        layout = cls(lm, jobs, runner, runner.gather(mask), is_edit, live_targets, target_counts)
        layout.batch = batch
        return layout

    @classmethod
    def _packed(cls, lm: LoadedModel, jobs: Sequence[_Job]) -> "_Layout":
        rows = [row for job in jobs for row in job.rows]
        runner = _Packing(lm, jobs[0].editor.layer_ids, rows)
        device = rows[0].start_hidden.device
        live_mask = torch.zeros(runner.lower.unpacked_shape, dtype=torch.bool, device=device)
        for index, row in enumerate(rows):
            live_mask[index, :row.length] = row.intervened
        is_edit = torch.tensor([row.is_edit for row in rows], dtype=torch.bool, device=device)
        targets = Targets(torch.cat([torch.full_like(row.labels, index) for index, row in enumerate(rows)]),
                           torch.cat([row.target_columns for row in rows]), torch.cat([row.labels for row in rows]))
        target_counts = [sum(row.labels.numel() for row in job.rows) for job in jobs]
        return cls(lm, jobs, runner, live_mask, is_edit, targets, target_counts)

    def __init__(self, lm: LoadedModel, jobs: Sequence[_Job], runner: "FullForward | SplitForward | _Packing",
                 live_mask: torch.Tensor, is_edit: torch.Tensor, targets: Targets, target_counts: Sequence[int]) -> None:
        self.lm, self.jobs, self.runner, self.targets = lm, list(jobs), runner, targets
        self.batch: TFBatch | None = None  # the padded layout's tokens
        self.live_mask = live_mask
        self.live_edit_mask = live_mask & is_edit[:, None]
        self.live_irrelevant_mask = live_mask & ~is_edit[:, None]
        self.parts, row, target = [], 0, 0
        for job, count in zip(jobs, target_counts):
            self.parts.append(_Part(slice(row, row + len(job.pairs)), slice(target, target + count)))
            row, target = row + len(job.pairs), target + count
        self.routes = [_Route(job.editor, part.rows.start, part.rows.stop) for job, part in zip(jobs, self.parts)]

    def keep(self, positions: Sequence[int]) -> "_Layout":
        """The layout of the jobs at ``positions`` only (no frozen layer is run again)."""
        jobs = [self.jobs[i] for i in positions]
        if self.batch is None:
            return _Layout._packed(self.lm, jobs)
        rows = torch.cat([torch.arange(self.parts[i].rows.start, self.parts[i].rows.stop) for i in positions])
        rows = rows.to(self.batch.input_ids.device)
        is_edit = torch.cat([job.is_edit for job in jobs]).to(rows.device)
        return _Layout._padded(self.lm, jobs, batch_rows(self.batch, rows), is_edit, self.runner.select(rows))

    def extend(self, jobs: Sequence[_Job]) -> "_Layout":
        """This layout with ``jobs`` added; packed, only their frozen computation is run."""
        if self.batch is None:
            _compute_live_rows(self.lm, jobs)
            return _Layout._packed(self.lm, self.jobs + list(jobs))
        return _Layout.build(self.lm, self.jobs + list(jobs))


def _compute_live_rows(lm: LoadedModel, jobs: Sequence[_Job]) -> None:
    """Run the frozen computation of the jobs that lack it, in one packed batch, and give each job its rows."""
    jobs = [job for job in jobs if not job.rows]
    if not jobs:
        return
    batch, is_edit = _encode_jobs(lm, jobs)
    editor = jobs[0].editor
    intervened = batch.intervention_mask(editor.hparams.last_prompt_tokens)
    rows = _packed_live_rows(lm, batch, _split_columns(batch, is_edit, intervened), intervened, is_edit,
                             editor.layer_ids[0])
    for job in jobs:
        job.rows, rows = rows[:len(job.pairs)], rows[len(job.pairs):]


def _run_packed(inner: nn.Module, layers: Sequence[nn.Module], plan: _Plan, hidden: torch.Tensor,
                positions: torch.Tensor, kv: PrefixKV | None,
                embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``layers`` on a packed [G, W, d] block whose tokens sit at ``positions`` [G, W] of their rows."""
    embeddings = embeddings or inner.rotary_emb(hidden, positions)
    keyword = cache_keyword(inner.layers[0])
    for layer in layers:
        hidden = call_layer(layer, hidden, plan.mask, positions, embeddings, keyword, kv)
    return hidden


def _packed_live_rows(lm: LoadedModel, batch: TFBatch, split: torch.Tensor, intervened: torch.Tensor,
                      is_edit: torch.Tensor, start_layer: int) -> list[_LiveRow]:
    """Every row's frozen computation, its tokens packed into a few sequences (``_Plan``) instead of padded to the
    longest row: the layers below ``start_layer`` on all of a row's tokens, then the layers from ``start_layer`` up on
    its ``split`` prefix columns alone, recording their keys and values.  A padded batch of one-token-different rows
    spends about half its frozen pass on padding; the result is the padded split forward's, up to float rounding."""
    inner = lm.model.model
    device = batch.input_ids.device
    lengths, splits = batch.lengths.tolist(), split.tolist()
    with torch.no_grad():
        whole = _Plan.build(lengths, [0] * batch.size, lm.hidden_size, device)
        ids = whole.scatter(torch.cat([batch.input_ids[row, :lengths[row]] for row in whole.order]))
        positions = whole.scatter(torch.cat([torch.arange(lengths[row], device=device) for row in whole.order]))
        hidden = inner.embed_tokens(ids)
        embeddings = inner.rotary_emb(hidden, positions)
        hidden = _run_packed(inner, inner.layers[:start_layer], whole, hidden, positions, None, embeddings)
        cos, sin = (whole.tokens(t) for t in embeddings)
        per_row, offset = {}, 0
        for row, token_hidden in zip(whole.order, whole.tokens(hidden).split([lengths[r] for r in whole.order])):
            per_row[row] = (token_hidden, cos[offset:offset + lengths[row]], sin[offset:offset + lengths[row]])
            offset += lengths[row]
        with_prefix = [row for row in range(batch.size) if splits[row] > 0]
        prefix_place = {row: index for index, row in enumerate(with_prefix)}
        kv = PrefixKV()
        prefix_plan = None
        if with_prefix:
            prefix_plan = _Plan.build([splits[row] for row in with_prefix], [0] * len(with_prefix), lm.hidden_size, device)
            order = [with_prefix[index] for index in prefix_plan.order]
            prefix = prefix_plan.scatter(torch.cat([per_row[row][0][:splits[row]] for row in order]))
            prefix_positions = prefix_plan.scatter(torch.cat([torch.arange(splits[row], device=device) for row in order]))
            _run_packed(inner, inner.layers[start_layer:], prefix_plan, prefix, prefix_positions, kv)
    rows = []
    for row in range(batch.size):
        s, n = splits[row], lengths[row]
        if prefix_plan is not None and s > 0:
            sequence, slot = prefix_plan.places[prefix_place[row]]
            keys = {layer: key[sequence, :, slot:slot + s] for layer, key in kv.keys.items()}
            values = {layer: value[sequence, :, slot:slot + s] for layer, value in kv.values.items()}
        else:
            keys = {layer: key[0, :, :0] for layer, key in kv.keys.items()}
            values = {layer: value[0, :, :0] for layer, value in kv.values.items()}
        token_hidden, row_cos, row_sin = per_row[row]
        prompt = int(batch.prompt_lengths[row])
        edit = bool(is_edit[row])
        none = torch.zeros(0, dtype=torch.long, device=device)
        rows.append(_LiveRow(
            s, keys, values, token_hidden[s:], torch.arange(s, n, device=device), row_cos[s:], row_sin[s:],
            intervened[row, s:n], edit, torch.arange(prompt - 1, n - 1, device=device) - s if edit else none,
            batch.input_ids[row, prompt:n] if edit else none))
    return rows


def _train(router: _Router, jobs: Sequence[_Job], packed: bool = False) -> list[EditStats]:
    """Train every job's editor on its own cases, all jobs in one batch, each until its own stopping rule."""
    for _ in _train_stream(router, iter(jobs), len(jobs), packed):
        pass
    return [job.stats for job in jobs]  # type: ignore[misc]


def _train_stream(router: _Router, pending: Iterator[_Job], window: int, packed: bool) -> Iterator[list[_Job]]:
    """Train up to ``window`` jobs at once, each until its own stopping rule, taking the next pending job as soon
    as one stops; yields the jobs that stopped at each step (their ``stats`` set).

    Each job's loss is exactly what it would be alone (its CE over its target tokens, its regularizers on its
    rows, its scales, its own step count); their sum gives each job's parameters their own gradient, and each
    job's AdamW steps only while the job trains.  A job that stops leaves the batch: its rows are dropped from
    the batch and from the frozen computation, which is not run again for the jobs that stay.
    """
    arrivals = _Arrivals(pending, window, packed)
    active = arrivals.take(window)
    if not active:
        return
    hp, lm = active[0].editor.hparams, active[0].editor.lm
    layout = _Layout.build(lm, active, packed)
    head = lm.model.get_output_embeddings()
    while active:
        stepping: list[tuple[int, torch.Tensor]] = []
        stopped: list[_Job] = []
        with torch.set_grad_enabled(any(job.step < hp.max_steps for job in active)):
            with router.active(layout.routes, layout.live_mask, record=True, packing=layout.runner.packing) as recorded:
                hidden = layout.runner()
            if hp.fast_forward:
                logits = head(hidden[layout.targets.rows, layout.targets.columns])
            else:  # the naive variant: full-vocabulary logits at every position
                logits = head(hidden)[layout.targets.rows, layout.targets.columns]
            # several jobs: one cross-entropy over every target token, then each job's mean over its own (a job's
            # slice of the [targets, vocab] logits would cost a vocab-wide zero gradient per job in the backward)
            logits = logits.to(compute_dtype(logits.dtype))
            token_ce = F.cross_entropy(logits, layout.targets.labels, reduction="none") if len(active) > 1 else None
            for position, job in enumerate(active):
                part = layout.parts[position]
                if token_ce is None:
                    ce = F.cross_entropy(logits[part.targets], layout.targets.labels[part.targets])
                else:
                    ce = token_ce[part.targets].mean()
                edit_mask = layout.live_edit_mask[part.rows]
                irrelevant_mask = layout.live_irrelevant_mask[part.rows] if job.has_irrelevant else None
                terms = job.editor.regularizers(recorded[position], edit_mask, irrelevant_mask)
                loss = job.editor.combine_loss(ce, terms, first_step=job.step == 0)
                if not math.isfinite(float(loss.detach())):
                    where = f" (case {job.cases[0].case_id})" if window > 1 else ""
                    raise NonFiniteError(f"{job.editor.name}: non-finite training loss at step {job.step}{where}")
                target_tokens = part.targets.stop - part.targets.start
                if job.step >= hp.max_steps or job.editor.stop_value(ce, loss, target_tokens) < hp.early_stop_loss:
                    job.editor.after_edit({k: v.detach() for k, v in recorded[position].items()}, edit_mask)
                    job.stats = EditStats(steps=job.step, loss=float(ce.detach()))
                    stopped.append(job)
                else:
                    stepping.append((position, loss))
        if stepping:
            for position, _ in stepping:
                active[position].optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            total = stepping[0][1] if len(stepping) == 1 else torch.stack([loss for _, loss in stepping]).sum()
            total.backward()
            for position, _ in stepping:
                active[position].optimizer.step()  # type: ignore[union-attr]
                active[position].step += 1
        if stopped:
            yield stopped
        still = [active[position] for position, _ in stepping]
        joining = arrivals.take(window - len(still))
        active = still + joining
        if not still:
            if joining:
                layout = _Layout.build(lm, joining, packed)
            continue
        if stopped:
            layout = layout.keep([position for position, _ in stepping])
        if joining:
            layout = layout.extend(joining)


class _Arrivals:
    """The jobs waiting to join a training batch.  Packed, their frozen computation runs ``block`` jobs at a
    time: one packed pass reads the frozen layers' weights once for all of them (20 BaFT cases on SmolLM2: 0.78 s,
    where one at a time takes 2.5 s), so jobs that join one or two at a time would otherwise pay it again and again."""

    def __init__(self, pending: Iterator[_Job], block: int, packed: bool) -> None:
        self.pending, self.block, self.packed = pending, block, packed
        self.ready: list[_Job] = []

    def take(self, count: int) -> list[_Job]:
        """Up to ``count`` jobs, each with its optimizer for this edit call."""
        while self.packed and len(self.ready) < count:
            arrived = list(itertools.islice(self.pending, self.block))
            if not arrived:
                break
            if arrived[0].editor.runs_split_forward:
                _compute_live_rows(arrived[0].editor.lm, arrived)
            self.ready.extend(arrived)
        if not self.packed:
            self.ready.extend(itertools.islice(self.pending, count))
        taken, self.ready = self.ready[:count], self.ready[count:]
        for job in taken:
            job.optimizer = job.editor.optimizer()
        return taken


def _edit_in_windows(cls: type["RepresentationEditor"], lm: LoadedModel, hparams, seed: int,
                     cases: Sequence[EditCase], window: int) -> Iterator[EditedCases]:
    """``RepresentationEditor.edit_in_parallel``: ``window`` cases train at once and a stopped case's place is
    taken by the next case at the following step, so the batch stays full until the cases run out."""
    made: list[RepresentationEditor] = []
    handed_out: set[int] = set()

    def jobs() -> Iterator[_Job]:
        for case in cases:
            torch.manual_seed(seed)  # as before each one-by-one edit
            made.append(cls(lm, hparams, seed))
            yield _Job(made[-1], [case])

    router: _Router | None = None
    finished: list[_Job] = []
    try:
        pending = jobs()
        first = next(pending, None)
        if first is None:
            return
        router = _Router(lm, first.editor.layer_ids)
        started = time.perf_counter()
        for stopped in _train_stream(router, itertools.chain([first], pending), window, packed=window > 1):
            finished.extend(stopped)
            if len(finished) >= window or len(handed_out) + len(finished) == len(cases):
                seconds = time.perf_counter() - started
                group = CaseParallel([job.editor for job in finished])
                handed_out.update(id(job.editor) for job in finished)
                stats = [job.stats for job in finished]
                yield EditedCases(group, [job.cases[0] for job in finished], stats, seconds)  # type: ignore[arg-type]
                finished = []
                started = time.perf_counter()
    finally:
        if router is not None:
            router.remove()
        for editor in made:
            if id(editor) not in handed_out:
                editor.restore()


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

    @prefix_causal
    def logits(self, batch: TFBatch) -> torch.Tensor:
        if self._router is None:
            raise RuntimeError("editors were restored; build new ones")
        routes = [_Route(self.editors[case], start, stop) for case, start, stop in group_runs(batch)]
        with self._router.active(routes, batch.live(batch.intervention_mask(self.hparams.last_prompt_tokens))):
            return forward_logits(self.lm.model, batch)

    def restore(self) -> None:
        if self._router is not None:
            self._router.remove()
        self._router = None
        for editor in self.editors:
            editor.restore()
