"""MELO: neuron-indexed dynamic LoRA routed by a vector database (Yu et al., AAAI 2024).

Our own implementation of what EasyEdit's ``models/melo`` does with its vendored peft fork
(``peft_egg/src/peft/tuners/melo.py``), editing-anchors §3.6:

* **Block-wise LoRA.**  Each target linear module W gets A ∈ ℝ^{d_in×r}, B ∈ ℝ^{r×d_out} with
  r = ``num_block`` × ``rank_per_block``, cut into ``num_block`` blocks of ``rank_per_block`` columns/rows.
  Block b adds x (s·A_b)(s·B_b) to the module's output at every position of a routed row, with
  s = √(r / rank_per_block) = √num_block on each factor (the fork's ``dynamic`` module; its LoRA scaling
  α/r is 1 since α = r).  A starts as kaiming-uniform(a=√5) over the whole [d_in, r] matrix, i.e.
  U(−1/√r, 1/√r); B starts at zero, so an untrained block changes nothing.
* **Vector-database router** on the *output* of one linear module (GPT-2-XL config: ``h.35.mlp.c_fc``),
  below the LoRA modules.  Its query is that output at the key position.  The database holds clusters
  (centre, radius, label, points); each point maps a key to a LoRA block.  At an edit, with d the distance
  from the query to the nearest centre c:
  - empty database, or d > radius_c + ``init_radius``: **add** a cluster (radius ``init_radius``);
  - same label (target tokens): **expand** c: add the point, move the centre to the mean of its points,
    radius = max(farthest point, ``init_radius``);
  - different label: add a cluster and **split**: radius_c = d/2 − 1e-5, radius_new = d/2 + 1e-5, and
    c forgets its points outside the new radius (an emptied cluster keeps its centre mapped to no block).
  Every edit takes the next unused block, and only that block trains: Adam at ``edit_lr`` for
  ``num_iter`` steps with StepLR(``lr_step``, ``lr_gamma``), on the teacher-forced target cross-entropy.
* **Inference**: a row whose query lies within the nearest cluster's radius uses the block of the
  cluster's nearest point; any other row takes the original path (no LoRA at all).

Choices: the key position is a setting, ``key_position``: ``last_prompt`` (default: the last prompt token,
as GRACE's key; it does not depend on the answer text, so teacher forcing and generation route alike) or
``last`` (the fork's ``key_id: -1``, the last token of whatever is fed, meant for its hallucination task);
labels match when the target token sequences are equal (the fork compares label sums); LoRA factors are
float32.  EasyEdit never rolls MELO back (``KEEP_EDITED_MODEL_ALGS``); here ``restore`` swaps every
original module back.  Running out of blocks is an error (the fork would silently index past the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode
from methods.base import Editor, EditStats, register_method
from methods.hparams import at_depth
from methods.grace import EditForward, capture, check_finite, swap_module, target_module
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

NO_BLOCK = -1
# the exact Euclidean path (as the MELO fork forces): cdist's matrix-multiply path rounds near cluster borders
_EXACT = "donot_use_mm_for_euclid_dist"
KEY_POSITIONS = ("last_prompt", "last")


@dataclass(frozen=True)
class MeloHParams:
    router_layer: int  # decoder layer whose ``router_module`` output is the routing query
    lora_layers: tuple[int, ...]  # decoder layers whose ``lora_modules`` get block-wise LoRA (above the router)
    num_block: int
    rank_per_block: int
    init_radius: float
    edit_lr: float
    num_iter: int
    router_module: str = "mlp.up_proj"
    lora_modules: tuple[str, ...] = ("mlp.up_proj",)
    lr_step: int = 20  # StepLR step size (the fork's hard-coded 20)
    lr_gamma: float = 0.5  # StepLR decay (the fork's hard-coded 0.5)
    key_position: str = "last_prompt"
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.key_position not in KEY_POSITIONS:
            raise ValueError(f"key_position must be one of {', '.join(KEY_POSITIONS)}, got {self.key_position!r}")
        if self.num_block < 1 or self.rank_per_block < 1 or self.num_iter < 0:
            raise ValueError("num_block and rank_per_block must be >= 1 and num_iter >= 0")
        if self.init_radius <= 0 or self.edit_lr <= 0 or self.lr_step < 1:
            raise ValueError("init_radius and edit_lr must be > 0 and lr_step >= 1")
        if not self.lora_layers or not self.lora_modules:
            raise ValueError("lora_layers and lora_modules must name at least one module")
        if self.router_layer >= min(self.lora_layers):
            raise ValueError(f"router_layer ({self.router_layer}) must lie below every LoRA layer {list(self.lora_layers)}: "
                             "the route is decided before any block applies")


@dataclass
class _Cluster:
    centre: torch.Tensor  # [d] float32
    radius: float
    label: tuple[int, ...]
    keys: list[torch.Tensor]
    blocks: list[int]


class VectorDatabase:
    """MELO's clusters of keys, each key mapped to a LoRA block."""

    def __init__(self, init_radius: float) -> None:
        self.init_radius = init_radius
        self.clusters: list[_Cluster] = []
        self.forgotten = 0  # keys dropped by splits (the fork's ``forget_num``)

    def __len__(self) -> int:
        return len(self.clusters)

    def nearest(self, query: torch.Tensor) -> tuple[float, int]:
        centres = torch.stack([c.centre for c in self.clusters])
        distances = torch.cdist(query.float()[None], centres, compute_mode=_EXACT)[0]
        distance, index = distances.min(dim=0)
        return float(distance), int(index)

    def _add(self, query: torch.Tensor, label: tuple[int, ...], block: int) -> None:
        key = query.detach().float()
        self.clusters.append(_Cluster(key, self.init_radius, label, [key], [block]))

    def insert(self, query: torch.Tensor, label: tuple[int, ...], block: int) -> str:
        """Apply the add / expand / split rule for one edit; returns which rule fired."""
        if not self.clusters:
            self._add(query, label, block)
            return "add"
        distance, index = self.nearest(query)
        cluster = self.clusters[index]
        if distance > cluster.radius + self.init_radius:
            self._add(query, label, block)
            return "add"
        if label == cluster.label:
            cluster.keys.append(query.detach().float())
            cluster.blocks.append(block)
            cluster.centre = torch.stack(cluster.keys).mean(dim=0)
            farthest = float(torch.cdist(torch.stack(cluster.keys), cluster.centre[None], compute_mode=_EXACT).max())
            cluster.radius = max(farthest, self.init_radius)
            return "expand"
        self._add(query, label, block)
        cluster.radius = distance / 2 - 1e-5
        self.clusters[-1].radius = distance / 2 + 1e-5
        keep = [i for i, key in enumerate(cluster.keys) if float(torch.dist(key, cluster.centre)) <= cluster.radius]
        self.forgotten += len(cluster.keys) - len(keep)
        cluster.keys = [cluster.keys[i] for i in keep] or [cluster.centre]
        cluster.blocks = [cluster.blocks[i] for i in keep] or [NO_BLOCK]
        return "split"

    def route(self, queries: torch.Tensor) -> torch.Tensor:
        """[B] block per query row (``NO_BLOCK`` outside every cluster)."""
        blocks = []
        for query in queries:
            if not self.clusters:
                blocks.append(NO_BLOCK)
                continue
            distance, index = self.nearest(query)
            cluster = self.clusters[index]
            if distance > cluster.radius:
                blocks.append(NO_BLOCK)
                continue
            nearest_key = int(torch.cdist(query.float()[None], torch.stack(cluster.keys), compute_mode=_EXACT)[0].argmin())
            blocks.append(cluster.blocks[nearest_key])
        return torch.tensor(blocks, dtype=torch.long, device=queries.device)


class _Routing:
    """State shared by the router and the LoRA modules during one forward."""

    def __init__(self) -> None:
        self.blocks: torch.Tensor | None = None  # [B] block per row; None: no LoRA anywhere
        self.trained: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # id(adapter) -> (block, A_b, B_b) in training


class RouterAdapter(nn.Module):
    """The router module: its output at the key position is the query (the output itself is unchanged)."""

    def __init__(self, base: nn.Linear, database: VectorDatabase, routing: _Routing) -> None:
        super().__init__()
        self.base = base
        self.database = database
        self.routing = routing
        self.positions: torch.Tensor | None = None  # [B] key column per row; None: pass through
        self.capturing = False
        self.captured: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.positions is None:
            return out
        query = out[torch.arange(out.shape[0], device=out.device), self.positions].detach()
        if self.capturing:
            self.captured = query
        else:
            self.routing.blocks = self.database.route(query)
        return out


class BlockLoRA(nn.Module):
    """A linear module plus ``num_block`` LoRA blocks; each row uses at most the one block it is routed to."""

    def __init__(self, base: nn.Linear, num_block: int, rank_per_block: int, routing: _Routing,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.num_block, self.rank_per_block = num_block, rank_per_block
        rank = num_block * rank_per_block
        bound = 1.0 / math.sqrt(rank)  # kaiming_uniform_(a=√5) on a [d_in, r] tensor: fan_in = r
        device = base.weight.device
        a = (torch.rand(base.in_features, rank, generator=generator) * 2 - 1) * bound
        self.register_buffer("lora_a", a.reshape(base.in_features, num_block, rank_per_block).permute(1, 0, 2)
                             .contiguous().to(device))  # [num_block, d_in, k]
        self.register_buffer("lora_b", torch.zeros(num_block, rank_per_block, base.out_features, device=device))
        self.scale = math.sqrt(num_block)  # √(r / k) on each factor

    def parameter_count(self) -> int:
        return self.lora_a.numel() + self.lora_b.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        blocks = self.routing.blocks
        if blocks is None:
            return out
        delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        trained = self.routing.trained.get(id(self))  # (block, A_b, B_b) with gradients during an edit
        for block in blocks.unique().tolist():
            if block == NO_BLOCK:
                continue
            rows = (blocks == block).nonzero()[:, 0]
            a, b = (trained[1], trained[2]) if trained is not None and trained[0] == block else \
                (self.lora_a[block], self.lora_b[block])
            delta = delta.index_put((rows,), (x[rows].float() @ (self.scale * a)) @ (self.scale * b))
        return out + delta.to(out.dtype)


@register_method("melo")
class MELO(Editor):
    hparams_class = MeloHParams
    batch_edits = False  # a call of several cases edits them one after another

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        router = max(0, min(at_depth(num_layers, 0.73)[0], num_layers - 2))  # 23 of 32, 22 of 30, 20 of 28
        return {"router_layer": router, "lora_layers": list(range(router + 1, min(num_layers, router + 3)))}

    def __init__(self, lm: LoadedModel, hparams: MeloHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self.routing = _Routing()
        self.database = VectorDatabase(hparams.init_radius)
        self.generator = torch.Generator().manual_seed(seed)
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self.lora: list[BlockLoRA] = []
        targets = [target_module(lm, hparams.router_layer, hparams.router_module, "melo")]
        targets += [target_module(lm, layer, path, "melo") for layer in sorted(set(hparams.lora_layers))
                    for path in hparams.lora_modules]
        router_parent, router_name, router_base = targets[0]
        self.router = RouterAdapter(router_base, self.database, self.routing)
        for parent, name, base in targets[1:]:
            self.lora.append(BlockLoRA(base, hparams.num_block, hparams.rank_per_block, self.routing, self.generator))
        for (parent, name, base), adapter in zip(targets, [self.router, *self.lora]):
            swap_module(parent, name, adapter)
            self._swaps.append((parent, name, base))
        self.blocks_used = 0

    def _key_columns(self, batch: TFBatch) -> torch.Tensor:
        return batch.prompt_lengths - 1 if self.hparams.key_position == "last_prompt" else batch.lengths - 1

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        if not self._swaps:
            raise RuntimeError("editor was restored; build a new one")
        steps, loss = 0, 0.0
        for case in cases:
            steps_one, loss = self._edit(case)
            steps += steps_one
        return EditStats(steps=steps, loss=loss)

    def _edit(self, case: EditCase) -> tuple[int, float]:
        hp, lm = self.hparams, self.lm
        if self.blocks_used >= hp.num_block:
            raise KebenchError(f"melo: all {hp.num_block} LoRA blocks are used; raise num_block for longer streams")
        block = self.blocks_used
        self.blocks_used += 1
        batch = encode(lm.tokenizer, [(case.prompt, case.target_new)], lm.pad_token_id).to(lm.device)
        p, n = int(batch.prompt_lengths[0]), int(batch.lengths[0])
        label = tuple(batch.input_ids[0, p:n].tolist())
        try:
            self.router.positions, self.router.capturing = self._key_columns(batch), True
            capture(lm, batch)
            self.database.insert(self.router.captured[0], label, block)
        finally:
            self.router.positions, self.router.capturing = None, False
        live = {id(adapter): (block, adapter.lora_a[block].clone().requires_grad_(True),
                              adapter.lora_b[block].clone().requires_grad_(True)) for adapter in self.lora}
        optimizer = torch.optim.Adam([t for _, a, b in live.values() for t in (a, b)], lr=hp.edit_lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step, gamma=hp.lr_gamma)
        loss_value = float("nan")
        try:
            forward = EditForward(lm, batch, 1, min(hp.lora_layers), torch.zeros_like(batch.lengths), hp.fast_forward)
            # Only the new block trains, on every position of the edit row (the fork's lora_block_mapping).
            self.routing.blocks = torch.full((batch.size,), block, dtype=torch.long, device=lm.device)
            self.routing.trained = live
            for step in range(hp.num_iter):
                loss = forward.token_losses().mean()
                loss_value = check_finite(loss, "melo", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        finally:
            self.routing.blocks, self.routing.trained = None, {}
            with torch.no_grad():
                for adapter in self.lora:
                    _, a, b = live[id(adapter)]
                    adapter.lora_a[block].copy_(a)
                    adapter.lora_b[block].copy_(b)
        return hp.num_iter, loss_value

    def logits(self, batch: TFBatch) -> torch.Tensor:
        self.router.positions = self._key_columns(batch)
        try:
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            self.router.positions = None
            self.routing.blocks = None

    def restore(self) -> None:
        for parent, name, base in reversed(self._swaps):
            swap_module(parent, name, base)
        self._swaps = []
        self.routing.blocks = None

    def trainable_parameters(self) -> int:
        """The whole block bank, num_block × rank_per_block × (d_in + d_out) per LoRA module.

        Each edit trains one block of it; the bank is what the method allocates up front.
        """
        return sum(adapter.parameter_count() for adapter in self.lora)
