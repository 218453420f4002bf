"""GRACE: a discrete key-value codebook adapter on one layer (Hartvigsen et al., NeurIPS 2023).

Follows EasyEdit's ``models/grace/GRACE.py`` (and the official ``Thartvigsen/GRACE``), editing-anchors §3.5:

* The adapter wraps one linear module (LLaMA: ``model.layers[l].mlp.down_proj``).  Its **key** is the
  module's *input* at the last prompt token; its **value** replaces the module's *output* there
  (``replace_last``; ``replace_prompt`` replaces the prompt positions before it, ``replace_all`` the row).
* The codebook holds keys, values, radii ε and labels (the target tokens).  At an edit, with d the
  distance from the query to its nearest key k:
  - no key yet, or d > ε_init + ε_k: **add** a key with radius ε_init;
  - d within that and a **different** label: add a key and **split**: ε_k = d/2 − 1e-5, ε_new = d/2;
  - the **same** label: **expand** ε_k to d when d > ε_k (``coverage``), or also move k half-way to the
    query (``moving_average``).
  The value of the key nearest to the query (a new key's own value, or the expanded one) is then trained
  for ``n_iter`` Adam steps at ``edit_lr`` on the teacher-forced cross-entropy of the target.  New values
  start uniform in [0, 1) (``cold``) or at the module's original output (``warm``).
* **Inference**: per input row, if the nearest key lies within its ε the value replaces the output;
  otherwise the row takes the original path untouched.

Choices, each documented: the key position is each row's own last prompt token in every batch (EasyEdit
fixes ``key_id`` at the first evaluated input's length, a known hazard); labels match when the target
token sequences are equal (EasyEdit compares the mean label id); values and keys are kept in float32;
a call with B cases applies them as B consecutive edits (EasyEdit's GRACE is not batchable).

GRACE is scored under two protocols, each row tagged: EasyEdit's own vanilla generation
(``benchmarks.generation``) and the common teacher-forced one.  ``restore`` swaps the original module back.

The helpers ``EditForward``, ``swap_module`` and ``target_module`` are shared with MELO and WISE.  Module
paths are LLaMA-style names translated for the model's architecture (GPT-2: ``mlp.down_proj`` is the
``Conv1D`` ``mlp.c_proj``, seen through ``LinearView`` so the adapters get nn.Linear's weight layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, encode
from methods._forward import SPLIT_FORWARD_MODEL_TYPES, SplitForward, answer_targets
from methods.base import Editor, EditStats, NonFiniteError, register_method
from methods.hparams import at_depth
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel, as_linear, is_projection, unwrap

GRACE_VALUE_INITS = ("cold", "warm")
GRACE_REPLACEMENTS = ("replace_last", "replace_prompt", "replace_all")
GRACE_EXPANSIONS = ("coverage", "moving_average")


# --------------------------------------------------------------------------- shared helpers

def target_module(lm: LoadedModel, layer: int, path: str, method: str) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute name, module) of ``lm.layers[layer].<path>``; a linear layer (or a GPT-2 ``Conv1D``,
    returned as a ``LinearView``) is required.  ``path`` may use LLaMA-style names (``mlp.down_proj``)."""
    if not 0 <= layer < lm.num_layers:
        raise KebenchError(f"{method}: layer {layer} out of range for {lm.name} ({lm.num_layers} layers)")
    decoder = lm.layers[layer]
    path = lm.module_path(path)
    parent_path, _, name = path.rpartition(".")
    try:
        parent = decoder.get_submodule(parent_path) if parent_path else decoder
        module = getattr(parent, name)
    except AttributeError:
        raise KebenchError(f"{method}: module '{path}' not found in decoder layer {layer} of {lm.name}") from None
    if not is_projection(module):
        raise KebenchError(f"{method}: module '{path}' of layer {layer} is a {type(module).__name__}, not a linear layer "
                           "(an adapter of this method already installed and not restored?)")
    return parent, name, as_linear(module)


def swap_module(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``parent.<name>`` (a ``LinearView`` goes back as the Conv1D it shows)."""
    setattr(parent, name, unwrap(new))


class _WholeForward:
    """The naive variant: the whole backbone on the whole batch at every step (any architecture)."""

    def __init__(self, lm: LoadedModel, batch: TFBatch) -> None:
        self.lm, self.batch = lm, batch

    def __call__(self) -> torch.Tensor:
        return self.lm.backbone(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).last_hidden_state

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        return per_column

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns


class EditForward:
    """One edit's forward passes: what the trained module cannot change runs once, the rest every step.

    On LLaMA-type models the part below ``start_layer`` and the columns before each row's ``split`` never
    change during an edit (``methods._forward.SplitForward``); other models run the whole model
    every step.  The LM head runs only where a target token of the first ``n_trained`` rows is predicted.
    """

    def __init__(self, lm: LoadedModel, batch: TFBatch, n_trained: int, start_layer: int, split: torch.Tensor,
                 fast: bool) -> None:
        self.lm = lm
        self.batch = batch
        split_ok = getattr(lm.model.config, "model_type", "") in SPLIT_FORWARD_MODEL_TYPES
        self.runner = SplitForward(lm, batch, start_layer, split) if fast and split_ok else _WholeForward(lm, batch)
        self.targets = answer_targets(batch, n_trained)
        self.target_columns = self.runner.column(self.targets.rows, self.targets.columns)

    def columns(self, full_columns: torch.Tensor) -> torch.Tensor:
        """Per-row column indices of the full batch, in the layout the trained module sees."""
        rows = torch.arange(full_columns.shape[0], device=full_columns.device)
        return self.runner.column(rows, full_columns)

    def real_tokens(self) -> torch.Tensor:
        """[B, W] bool: real (non-padding) tokens in the layout the trained module sees."""
        return self.runner.gather(self.batch.attention_mask.bool())

    def token_losses(self) -> torch.Tensor:
        """Cross-entropy of every target token (float32, one entry per ``targets.rows`` entry)."""
        hidden = self.runner()
        logits = self.lm.lm_head(hidden[self.targets.rows, self.target_columns])
        return F.cross_entropy(logits.float(), self.targets.labels, reduction="none")


def check_finite(value: torch.Tensor, method: str, step: int) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        raise NonFiniteError(f"{method}: non-finite training loss at step {step}")
    return number


def capture(lm: LoadedModel, batch: TFBatch) -> None:
    """One plain no-grad forward (adapters in capture mode record their queries)."""
    with torch.no_grad():
        lm.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


# --------------------------------------------------------------------------- GRACE

@dataclass(frozen=True)
class GraceHParams:
    layer: int  # decoder layer holding the adapted module
    eps: float  # initial radius ε_init of a new key
    edit_lr: float  # Adam learning rate of the value
    n_iter: int  # training steps per edit (no early stop, as EasyEdit)
    module: str = "mlp.down_proj"  # the adapted linear module, relative to the decoder layer
    val_init: str = "cold"  # cold: uniform [0, 1); warm: the module's original output at the key
    replacement: str = "replace_last"
    eps_expand: str = "coverage"
    fast_forward: bool = True  # run only the layers from ``layer`` up on the live columns at each step

    def __post_init__(self) -> None:
        for name, value, allowed in (("val_init", self.val_init, GRACE_VALUE_INITS),
                                     ("replacement", self.replacement, GRACE_REPLACEMENTS),
                                     ("eps_expand", self.eps_expand, GRACE_EXPANSIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.eps <= 0 or self.edit_lr <= 0 or self.n_iter < 0:
            raise ValueError("eps and edit_lr must be > 0 and n_iter >= 0")


class Codebook:
    """GRACE's keys, values, radii and labels, with its add / expand / split rule."""

    def __init__(self, init_eps: float, expand: str) -> None:
        self.init_eps = init_eps
        self.expand = expand
        self.keys: torch.Tensor | None = None  # [N, d_in] float32
        self.values: list[nn.Parameter] = []  # N × [d_out] float32
        self.epsilons: list[float] = []
        self.labels: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.values)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each query row."""
        dists = torch.cdist(queries.float(), self.keys)  # [B, N]
        return dists.min(dim=1)

    def _add(self, query: torch.Tensor, value: torch.Tensor, label: tuple[int, ...]) -> None:
        key = query.detach().float()[None]
        self.keys = key if self.keys is None else torch.cat([self.keys, key])
        self.values.append(nn.Parameter(value.detach().float().clone()))
        self.epsilons.append(self.init_eps)
        self.labels.append(label)

    def update(self, query: torch.Tensor, label: tuple[int, ...], new_value: torch.Tensor) -> int:
        """Apply the add / expand / split rule for one edit's query; returns the index whose value trains."""
        if not len(self):
            self._add(query, new_value, label)
            return 0
        distance, index = (t.item() for t in self.nearest(query[None]))
        if distance > self.init_eps + self.epsilons[index]:
            self._add(query, new_value, label)
        elif label != self.labels[index]:
            self._add(query, new_value, label)
            self.epsilons[index] = distance / 2 - 1e-5
            self.epsilons[-1] = distance / 2
        elif distance > self.epsilons[index]:
            if self.expand == "moving_average":
                self.keys[index] = 0.5 * self.keys[index] + 0.5 * query.detach().float()
            self.epsilons[index] = distance
        return int(self.nearest(query[None])[1].item())

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit [B] bool, value [B, d_out]) for each query row; a miss keeps the original output."""
        distance, index = self.nearest(queries)
        eps = torch.tensor(self.epsilons, device=queries.device)[index]
        values = torch.stack([self.values[i] for i in index.tolist()])
        return distance <= eps, values


class GraceAdapter(nn.Module):
    """Wraps the original linear module; replaces its output at the key column of rows whose key hits."""

    def __init__(self, base: nn.Linear, codebook: Codebook, replacement: str) -> None:
        super().__init__()
        self.base = base
        self.codebook = codebook
        self.replacement = replacement
        self.positions: torch.Tensor | None = None  # [B] key column per row in this forward; None: pass through
        self.capturing = False
        self.captured: torch.Tensor | None = None
        self.train_value: nn.Parameter | None = None  # during an edit: the value being trained, for every row
        self.last_hits: torch.Tensor | None = None  # [B] bool of the last routed forward (for inspection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.positions is None:
            return out
        rows = torch.arange(x.shape[0], device=x.device)
        query = x[rows, self.positions]
        if self.capturing:
            self.captured = query.detach()
            return out
        if self.train_value is not None:
            hits = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            values = self.train_value[None].expand(x.shape[0], -1)
        elif len(self.codebook):
            hits, values = self.codebook.lookup(query)
        else:
            hits, values = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), None
        self.last_hits = hits.detach()
        if values is None or not bool(hits.any()):
            return out
        columns = torch.arange(x.shape[1], device=x.device)[None, :]
        if self.replacement == "replace_last":
            where = columns == self.positions[:, None]
        elif self.replacement == "replace_prompt":
            where = columns < self.positions[:, None]
        else:
            where = torch.ones_like(columns, dtype=torch.bool).expand(x.shape[0], -1)
        where = where & hits[:, None]
        return torch.where(where[..., None], values[:, None, :].to(out.dtype), out)


@register_method("grace")
class GRACE(Editor):
    hparams_class = GraceHParams
    batch_edits = False  # a call of several cases edits them one after another
    required_protocols = ("generation",)

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        return {"layer": at_depth(num_layers, 0.84)[0]}  # 27 of 32, 25 of 30, 24 of 28

    def __init__(self, lm: LoadedModel, hparams: GraceHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self._parent, self._name, self._original = target_module(lm, hparams.layer, hparams.module, "grace")
        self.codebook = Codebook(hparams.eps, hparams.eps_expand)
        self.adapter = GraceAdapter(self._original, self.codebook, hparams.replacement)
        self.generator = torch.Generator().manual_seed(seed)
        swap_module(self._parent, self._name, self.adapter)
        self._installed = True

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        if not self._installed:
            raise RuntimeError("editor was restored; build a new one")
        steps, loss = 0, 0.0
        for case in cases:
            steps_one, loss = self._edit(case)
            steps += steps_one
        return EditStats(steps=steps, loss=loss)

    def _edit(self, case: EditCase) -> tuple[int, float]:
        hp, lm, adapter = self.hparams, self.lm, self.adapter
        batch = encode(lm.tokenizer, [(case.prompt, case.target_new)], lm.pad_token_id).to(lm.device)
        key_column = batch.prompt_lengths - 1
        p, n = int(batch.prompt_lengths[0]), int(batch.lengths[0])
        label = tuple(batch.input_ids[0, p:n].tolist())
        try:
            adapter.positions, adapter.capturing = key_column, True
            capture(lm, batch)
            query = adapter.captured[0]
            adapter.capturing = False
            if hp.val_init == "cold":
                new_value = torch.rand(self._original.out_features, generator=self.generator).to(lm.device)
            else:
                with torch.no_grad():
                    new_value = self._original(query[None].to(self._original.weight.dtype))[0]
            value = self.codebook.values[self.codebook.update(query, label, new_value)]
            value.requires_grad_(True)
            split = key_column if hp.replacement == "replace_last" else torch.zeros_like(key_column)
            adapter.positions = None  # the frozen part runs without the adapter
            forward = EditForward(lm, batch, 1, hp.layer, split, hp.fast_forward)
            adapter.positions, adapter.train_value = forward.columns(key_column), value
            optimizer = torch.optim.Adam([value], lr=hp.edit_lr)
            loss_value = float("nan")
            for step in range(hp.n_iter):
                loss = forward.token_losses().mean()
                loss_value = check_finite(loss, "grace", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            adapter.positions, adapter.capturing, adapter.train_value = None, False, None
        for stored in self.codebook.values:
            stored.requires_grad_(False)
        return hp.n_iter, loss_value

    def logits(self, batch: TFBatch) -> torch.Tensor:
        self.adapter.positions = batch.prompt_lengths - 1
        try:
            return self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        finally:
            self.adapter.positions = None

    def restore(self) -> None:
        if self._installed:
            swap_module(self._parent, self._name, self._original)
            self._installed = False

    def trainable_parameters(self) -> int:
        """The codebook's learned values (N keys × d_out); the paper's Table 3 prints "/" for GRACE."""
        return sum(value.numel() for value in self.codebook.values)
