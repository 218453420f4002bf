"""ROME: rank-one model editing (Meng et al., NeurIPS 2022), plus the locate-then-edit machinery MEMIT shares.

Implemented from the definition in ``kmeng01/rome`` (``rome_main.py``, ``compute_u.py``, ``compute_v.py``)
and EasyEdit's port (``easyeditor/models/rome``; see ``../shared/reference/editing-anchors.md`` §3.1):

* **Key u** (``compute_u``): the input k of ``layers[l].mlp.down_proj`` at the subject's last token,
  averaged over the prompt prefixed by each context template.  With ``mom2_adjustment`` u ← C⁻¹ u,
  where C = E[k kᵀ] comes from ``methods.stats`` (cached on disk).  u is normalised.
* **Value v** (``compute_v``): an additive δ on the MLP output at the subject's last token of every
  templated prompt, optimised with Adam (``v_lr``) for ``v_num_grad_steps`` on
  the target's NLL (per-token mean per prompt, averaged over prompts) + ``kl_factor`` · KL(current ‖
  initial) of the next-token distribution read at the fact token of "{subject} is a" (as compute_v)
  + ``v_weight_decay`` · ‖δ‖ / ‖v₀‖²,
  projected after each step into the ball ‖δ‖ ≤ ``clamp_norm_factor`` · ‖v₀‖; it stops when the loss is
  below ``early_stop_loss`` (0.05 in the original).  v* = v₀ + δ.
* **Update**: with k* the key and W k* the MLP output on the plain prompt, ΔW = (v* − W k*) uᵀ / (k*·u):
  a rank-one change of ``down_proj.weight`` that maps k* to v*.

Choices (each a hyperparameter or documented here):

* Context templates are **fixed sentences** (``SHORT_PREFIXES``/``LONG_PREFIXES``), not sampled from the
  model as the originals and EasyEdit do (a reproducibility hazard, anchors §1.6).  The original
  ROME/MEMIT use "{}" plus 5 generated prefixes of 10 tokens, one per seed word The/Therefore/Because/
  I/You; EasyEdit uses 10 of 5 and 10 of 10 tokens.  ``n_short_templates``/``n_long_templates`` pick
  how many of our ~5-word and ~10-word sentences (which start with the same seed words, in that order)
  are used; "{}" (the plain prompt) is always the first template.
* ``fact_token``: ``subject_last`` (the last token of the first occurrence of the subject in the prompt,
  found from the tokenizer's character offsets) or ``last`` (the last prompt token).  A case whose
  subject is missing or does not occur in its prompt falls back to ``last`` (EasyEdit asserts instead).
* The loss is read at ``v_loss_layer`` (-1: the last layer, i.e. the model's own logits; a lower layer
  applies the final norm and LM head to that layer's output, as the original does).
* Speed, not numbers (``fast_forward``): δ enters at the edited layer's output, so everything at and
  below that layer is run once per edit; on LLaMA-type models the columns before each row's fact token
  are run once too (their keys/values cannot depend on δ), so a step runs only the layers above the
  edited one on the columns from the fact token on; the LM head runs only where the loss reads.
  ``fast_forward: false`` steps the full width (same numbers up to float rounding; tested).
* An edit call with several cases (batched scenario) applies them one after another; EasyEdit
  refuses batches for ROME.
* Any architecture ``kebench.core.models.Architecture`` knows: the down-projection is found by it (GPT-2:
  the ``Conv1D`` ``mlp.c_proj``, whose weight is stored transposed; updates are written through
  ``projection_weight``, in nn.Linear's [out, in] layout).  Under ``dtype: auto`` on a half-precision
  model the edited projections are kept in float32 (``PrecisionIsland``), as the papers ran ROME/MEMIT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.case import EditCase
from benchmarks.metrics import TFBatch, right_pad
from methods._forward import SPLIT_FORWARD_MODEL_TYPES, SplitForward
from methods.stats import STATS_DTYPES, StatsNeed, canonical_corpus, down_proj, provenance_note, second_moment
from methods.base import Editor, EditStats, NonFiniteError, register_method
from methods.hparams import at_depth
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel, PrecisionIsland, projection_weight

# Fixed context prefixes.  Each becomes the template "<prefix> {}"; seed words as in the originals.
SHORT_PREFIXES = (
    "The first time I saw it.",
    "Therefore, it is worth noting.",
    "Because of this, many agree.",
    "I have been thinking about this.",
    "You can find more here.",
    "The new year has begun.",
    "Therefore, we have to ask.",
    "Because it was late, we left.",
    "I am not sure why.",
    "You may have heard this.",
)
LONG_PREFIXES = (
    "The following article was written by a member of the museum staff.",
    "Therefore, the committee decided to postpone the final vote until next month.",
    "Because the weather was so bad, the game was moved indoors this year.",
    "I remember reading about this in an old encyclopedia at the school library.",
    "You will find the complete list of sources at the end of this page.",
    "The city council met on Tuesday to discuss the proposal for a new budget.",
    "Therefore, it is not surprising that the results were mixed for most of them.",
    "Because of the heavy traffic, the bus arrived almost an hour later than planned.",
    "I would like to thank everyone who helped to make this project possible.",
    "You might be surprised to learn how old this particular tradition really is.",
)
FACT_TOKENS = ("subject_last", "last")
KL_PROMPT = "{} is a"


def context_templates(n_short: int, n_long: int) -> list[list[str]]:
    """Template groups: the plain prompt, then the chosen short and long prefixes (empty groups dropped)."""
    if not 0 <= n_short <= len(SHORT_PREFIXES) or not 0 <= n_long <= len(LONG_PREFIXES):
        raise KebenchError(f"n_short_templates must be in 0..{len(SHORT_PREFIXES)} and n_long_templates in "
                           f"0..{len(LONG_PREFIXES)}, got {n_short} and {n_long}")
    groups = [["{}"], [p + " {}" for p in SHORT_PREFIXES[:n_short]], [p + " {}" for p in LONG_PREFIXES[:n_long]]]
    return [group for group in groups if group]


# --------------------------------------------------------------------------- tokenized rows

@dataclass(frozen=True)
class Rows:
    """Right-padded rows, each with its fact-token position and (for rows with an answer) its boundary."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    prompt_lengths: torch.Tensor  # [B] tokens before the answer (the whole row when it has none)
    lengths: torch.Tensor  # [B]
    lookup: torch.Tensor  # [B] the fact token's position

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def encode_rows(lm: LoadedModel, texts: Sequence[tuple[str, str | None, str | None, str]]) -> Rows:
    """Rows from (prompt text, answer or None, subject or None, fact_token).

    The answer is joined as ``prompt + " " + answer`` and its tokens are those starting at or after the
    join, exactly as ``benchmarks.metrics.encode`` scores them.
    """
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    rows, prompt_lengths, lookups = [], [], []
    for prompt, answer, subject, fact_token in texts:
        text = prompt if answer is None else f"{prompt} {answer}"
        encoded = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        boundary = len(prompt)
        n_prompt = sum(1 for t, (s, e) in zip(ids, offsets) if s < boundary or (t in special and s == e == 0))
        if n_prompt == 0 or (answer is not None and n_prompt >= len(ids)):
            raise KebenchError(f"cannot split {text!r} into prompt and answer tokens")
        lookup = n_prompt - 1
        if fact_token == "subject_last" and subject:
            start = prompt.find(subject)
            if start >= 0:
                end = start + len(subject)
                inside = [i for i, (t, (s, e)) in enumerate(zip(ids, offsets)) if e > s and s < end and e > start]
                if inside:
                    lookup = inside[-1]
        rows.append(ids)
        prompt_lengths.append(n_prompt if answer is not None else len(ids))
        lookups.append(lookup)
    input_ids, attention = right_pad(rows, lm.pad_token_id)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=lm.device)  # noqa: E731
    return Rows(input_ids.to(lm.device), attention.to(lm.device), as_long(prompt_lengths),
                as_long([len(r) for r in rows]), as_long(lookups))


def subject_of(case: EditCase) -> str | None:
    return case.subject if case.subject and case.subject in case.prompt else None


# --------------------------------------------------------------------------- forward helpers

class _Stop(Exception):
    pass


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def final_norm(lm: LoadedModel) -> nn.Module:
    return lm.final_norm


def lm_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final-norm hidden states (with the final soft-capping of models that have it)."""
    logits = lm.lm_head(hidden)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def resolve_loss_layer(lm: LoadedModel, v_loss_layer: int, layer: int) -> int:
    last = lm.num_layers - 1
    chosen = last if v_loss_layer < 0 else v_loss_layer
    if chosen > last:
        raise KebenchError(f"v_loss_layer {v_loss_layer} is out of range for {lm.name} ({lm.num_layers} layers)")
    return max(chosen, layer)


def _hooked_pass(lm: LoadedModel, rows: Rows, handles: list, top: int) -> None:
    """One no-grad pass with ``handles`` registered, cut after layer ``top``; the hooks are removed after."""
    if top + 1 < lm.num_layers:
        handles.append(lm.layers[top + 1].register_forward_pre_hook(UpperForward._stopper))
    try:
        with torch.no_grad():
            lm.backbone(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


class UpperForward:
    """Records one pass at and below ``layer``; then runs only layers ``layer+1 .. stop`` from a given input.

    The recording pass keeps the output of decoder layer ``layer``, the output of its MLP, and the
    arguments every higher layer is called with (attention mask, rotary embeddings, positions), so a
    step replays exactly the calls the model itself makes.
    """

    def __init__(self, lm: LoadedModel, rows: Rows, layer: int, stop: int) -> None:
        self.lm, self.layer, self.stop = lm, layer, stop
        self.calls: dict[int, tuple[tuple, dict]] = {}
        recorded: dict[str, torch.Tensor] = {}
        handles = [
            lm.layers[layer].register_forward_hook(lambda m, a, o: recorded.__setitem__("block", _hidden(o).detach())),
            lm.mlp(layer).register_forward_hook(lambda m, a, o: recorded.__setitem__("mlp", _hidden(o).detach())),
        ]
        for j in range(layer + 1, stop + 1):
            handles.append(lm.layers[j].register_forward_pre_hook(self._recorder(j), with_kwargs=True))
        _hooked_pass(lm, rows, handles, stop)
        self.block_output = recorded["block"]
        self.mlp_output = recorded["mlp"]

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            self.calls[index] = (tuple(args[1:]), dict(kwargs))
        return hook

    @staticmethod
    def _stopper(module, args):
        raise _Stop

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states at ``stop`` when ``hidden`` is the output of layer ``layer``."""
        for j in range(self.layer + 1, self.stop + 1):
            args, kwargs = self.calls[j]
            hidden = _hidden(self.lm.layers[j](hidden, *args, **kwargs))
        return final_norm(self.lm)(hidden)


class _FullWidth:
    """Steps on every column: δ is added at each row's fact token of the recorded block output."""

    def __init__(self, lm: LoadedModel, rows: Rows, layer: int, stop: int) -> None:
        self.upper = UpperForward(lm, rows, layer, stop)
        self.base = self.upper.block_output
        self.where = torch.zeros(*self.base.shape[:2], 1, dtype=self.base.dtype, device=self.base.device)
        self.where[torch.arange(rows.size, device=lm.device), rows.lookup] = 1.0
        self.lookup = rows.lookup

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        return self.upper(self.base + self.where * delta.to(self.base.dtype))

    def column(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return columns


class _LiveColumns(SplitForward):
    """Steps on the live columns only (LLaMA-type models, loss at the last layer).

    Nothing before a row's fact token depends on δ (attention is causal), so ``SplitForward`` (the
    BaFT/ReFT engine) records those columns' keys/values once and each step runs the layers above the
    edited one on the columns from the fact token on; the fact token is live column 0 of every row.
    """

    def __init__(self, lm: LoadedModel, rows: Rows, layer: int) -> None:
        batch = TFBatch(rows.input_ids, rows.attention_mask, rows.prompt_lengths, rows.lengths)
        super().__init__(lm, batch, layer + 1, rows.lookup)
        self.base = self.start_hidden
        self.where = torch.zeros(*self.base.shape[:2], 1, dtype=self.base.dtype, device=self.base.device)
        self.where[:, 0] = 1.0

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden = self.base + self.where * delta.to(self.base.dtype)
        for layer in self.inner.layers[self.start_layer:]:
            hidden = self._layer(layer, hidden)
        return self.inner.norm(hidden)


def _stepper(lm: LoadedModel, rows: Rows, layer: int, stop: int, fast: bool) -> _FullWidth | _LiveColumns:
    model_type = getattr(lm.model.config, "model_type", "")
    if fast and model_type in SPLIT_FORWARD_MODEL_TYPES and stop == lm.num_layers - 1:
        return _LiveColumns(lm, rows, layer)
    return _FullWidth(lm, rows, layer, stop)


def capture(lm: LoadedModel, rows: Rows, key_layers: Sequence[int] = (), block_layers: Sequence[int] = (),
            mlp_layers: Sequence[int] = ()) -> tuple[dict[int, torch.Tensor], ...]:
    """(down_proj inputs, decoder-layer outputs, MLP outputs) at each row's fact token; no grad.

    The forward pass stops after the highest layer it needs.
    """
    keys: dict[int, torch.Tensor] = {}
    blocks: dict[int, torch.Tensor] = {}
    mlps: dict[int, torch.Tensor] = {}
    rows_index = torch.arange(rows.size, device=rows.lookup.device)

    def key_hook(layer):
        def hook(module, args):
            keys[layer] = args[0][rows_index, rows.lookup].detach()
        return hook

    def block_hook(layer):
        def hook(module, args, output):
            blocks[layer] = _hidden(output)[rows_index, rows.lookup].detach()
        return hook

    def mlp_hook(layer):
        def hook(module, args, output):
            mlps[layer] = _hidden(output)[rows_index, rows.lookup].detach()
        return hook

    handles = [down_proj(lm, layer).register_forward_pre_hook(key_hook(layer)) for layer in set(key_layers)]
    handles += [lm.layers[layer].register_forward_hook(block_hook(layer)) for layer in set(block_layers)]
    handles += [lm.mlp(layer).register_forward_hook(mlp_hook(layer)) for layer in set(mlp_layers)]
    _hooked_pass(lm, rows, handles, max([*key_layers, *block_layers, *mlp_layers]))
    return keys, blocks, mlps


# --------------------------------------------------------------------------- the value optimisation

@dataclass(frozen=True)
class ValueSettings:
    """The δ optimisation shared by ROME (``compute_v``) and MEMIT (``compute_z``)."""

    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float


@dataclass(frozen=True)
class ValueResult:
    target: torch.Tensor  # v₀ + δ
    initial: torch.Tensor  # v₀
    steps: int
    loss: float


def optimize_value(lm: LoadedModel, case: EditCase, templates: Sequence[str], layer: int, site: str,
                   settings: ValueSettings, fact_token: str, fast: bool = True) -> ValueResult:
    """δ at ``site`` ("mlp": the MLP output, ROME; "block": the decoder layer's output, MEMIT) of ``layer``.

    Adding δ to the MLP output of a pre-norm block adds it to the block's output, so both sites are run
    as an addition to the block output at the fact token; they differ in v₀ (what the weight decay and
    the norm ball are relative to, and what v* = v₀ + δ is).
    """
    subject = subject_of(case)
    kl_subject = subject if subject is not None else case.prompt
    specs = [(t.format(case.prompt), case.target_new, subject, fact_token) for t in templates]
    specs.append((KL_PROMPT.format(kl_subject), None, kl_subject, fact_token))  # as compute_v: same lookup rule
    rows = encode_rows(lm, specs)
    n_rewrite = len(templates)
    stop = resolve_loss_layer(lm, settings.v_loss_layer, layer)
    first = Rows(rows.input_ids[:1], rows.attention_mask[:1], rows.prompt_lengths[:1], rows.lengths[:1], rows.lookup[:1])
    _, blocks, mlps = capture(lm, first, block_layers=[layer], mlp_layers=[layer])
    initial = (mlps if site == "mlp" else blocks)[layer][0].float()
    step = _stepper(lm, rows, layer, stop, fast)

    # Positions the loss reads: each rewriting row's answer tokens, then the KL row's fact token.
    pred_rows, pred_cols, gold, owner = [], [], [], []
    for i in range(n_rewrite):
        p, n = int(rows.prompt_lengths[i]), int(rows.lengths[i])
        pred_rows += [i] * (n - p)
        pred_cols += list(range(p - 1, n - 1))
        gold += rows.input_ids[i, p:n].tolist()
        owner += [i] * (n - p)
    device = lm.device
    read_rows = torch.tensor(pred_rows + [n_rewrite], device=device)
    read_cols = step.column(read_rows, torch.tensor(pred_cols + [int(rows.lookup[n_rewrite])], device=device))
    gold_t = torch.tensor(gold, device=device)
    owner_t = torch.tensor(owner, device=device)
    counts = torch.bincount(owner_t, minlength=n_rewrite).to(torch.float32)

    delta = torch.zeros(initial.shape[-1], dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.v_lr)
    init_norm = initial.norm()
    kl_init: torch.Tensor | None = None
    steps, loss_value = 0, math.nan
    for it in range(settings.v_num_grad_steps):
        optimizer.zero_grad(set_to_none=True)
        logits = lm_logits(lm, step(delta)[read_rows, read_cols]).float()
        token_lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, gold_t[:, None]).squeeze(1)
        nll = (-torch.zeros(n_rewrite, device=device).index_add(0, owner_t, token_lp) / counts).mean()
        kl_log_probs = torch.log_softmax(logits[-1:], dim=-1)
        if kl_init is None:
            kl_init = kl_log_probs.detach().clone()
        kl = settings.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
        decay = settings.v_weight_decay * (delta.norm() / init_norm**2)
        loss = nll + kl + decay
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteError(f"non-finite value-optimisation loss at step {it} (case {case.case_id})")
        if loss_value < settings.early_stop_loss or it == settings.v_num_grad_steps - 1:
            break
        loss.backward()
        optimizer.step()
        steps += 1
        max_norm = settings.clamp_norm_factor * init_norm
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    target = initial + delta.detach()
    if not torch.isfinite(target).all():
        raise NonFiniteError(f"non-finite target vector (case {case.case_id})")
    return ValueResult(target, initial, steps, loss_value)


# --------------------------------------------------------------------------- ROME

@dataclass(frozen=True)
class ROMEHParams:
    layers: tuple[int, ...]  # decoder layers whose mlp.down_proj gets a rank-one update (EasyEdit L2: [5])
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1  # -1: the last layer
    v_weight_decay: float = 1.0e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    fact_token: str = "subject_last"
    n_short_templates: int = 0
    n_long_templates: int = 5
    mom2_adjustment: bool = False  # u ← C⁻¹ u (original ROME: on; EasyEdit's LLaMA-2 YAML: off)
    mom2_corpus: str = "shared-offline"
    mom2_n_samples: int = 1000
    mom2_dtype: str = "float32"
    fast_forward: bool = True  # run only the live columns above the edited layer (same numbers up to rounding)

    def __post_init__(self) -> None:
        check_locate_then_edit(self)

    def value_settings(self) -> ValueSettings:
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_loss_layer, self.v_weight_decay,
                             self.clamp_norm_factor, self.kl_factor, self.early_stop_loss)


def check_locate_then_edit(hp: Any) -> None:
    """The checks ROME's and MEMIT's hyperparameters share (layers, fact token, δ optimisation, statistics)."""
    if not hp.layers:
        raise ValueError("layers must name at least one decoder layer")
    if hp.fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {', '.join(FACT_TOKENS)}, got {hp.fact_token!r}")
    if hp.v_num_grad_steps < 1 or hp.v_lr <= 0 or hp.clamp_norm_factor <= 0:
        raise ValueError("v_num_grad_steps must be >= 1, v_lr and clamp_norm_factor > 0")
    if hp.mom2_n_samples < 1:
        raise ValueError(f"mom2_n_samples must be >= 1, got {hp.mom2_n_samples}")
    if hp.mom2_dtype not in STATS_DTYPES:
        raise ValueError(f"mom2_dtype must be one of {', '.join(STATS_DTYPES)}, got {hp.mom2_dtype!r}")
    canonical_corpus(hp.mom2_corpus)


class WeightEditor(Editor):
    """Editors that change ``down_proj`` weights in place and copy the originals back on restore.

    Under ``lm.edit_dtype`` (``dtype: auto`` on a half-precision model) the edited projections run in
    float32 while the editor lives (``PrecisionIsland``); restore copies the originals back, then casts
    them back down, which is exact.
    """

    edits_weights = True

    def __init__(self, lm: LoadedModel, hparams: Any, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self.edit_layers = tuple(hparams.layers)
        for layer in self.edit_layers:
            down_proj(lm, layer)  # range and architecture check: a one-line KebenchError
        self.island = PrecisionIsland(lm, [down_proj(lm, layer) for layer in set(self.edit_layers)], self.name)
        self.originals = {layer: down_proj(lm, layer).weight.detach().clone() for layer in set(self.edit_layers)}

    def restore(self) -> None:
        with torch.no_grad():
            for layer, weight in self.originals.items():
                down_proj(self.lm, layer).weight.copy_(weight)
        self.island.close()

    def trainable_parameters(self) -> int:
        return 0  # closed-form: nothing is trained besides the per-edit δ

    def _add(self, layer: int, update: torch.Tensor) -> None:
        """Add ``update`` ([out, in], nn.Linear's layout) to the layer's down-projection (GPT-2: its transpose)."""
        weight = projection_weight(down_proj(self.lm, layer))
        if update.shape != weight.shape:
            raise RuntimeError(f"update {tuple(update.shape)} does not match down_proj {tuple(weight.shape)}")
        if not torch.isfinite(update).all():
            raise NonFiniteError(f"{self.name}: non-finite weight update at layer {layer}")
        with torch.no_grad():
            weight.add_(update.to(weight.dtype))


@register_method("rome")
class ROME(WeightEditor):
    hparams_class = ROMEHParams
    batch_edits = False  # a call of several cases edits them one after another

    @classmethod
    def layer_rule(cls, num_layers: int) -> dict[str, Any]:
        return {"layers": at_depth(num_layers, 0.16)}  # LLaMA-2/3: 5 of 32, SmolLM2: 5 of 30, Gemma: 4 of 28

    def __init__(self, lm: LoadedModel, hparams: ROMEHParams, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        self.groups = context_templates(hparams.n_short_templates, hparams.n_long_templates)
        self.templates = [t for group in self.groups for t in group]
        self.last_edit: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.moments = {}
        if hparams.mom2_adjustment:
            self.moments = {layer: second_moment(lm, layer, hparams.mom2_corpus, hparams.mom2_n_samples, hparams.mom2_dtype)
                            for layer in set(self.edit_layers)}

    @classmethod
    def requirements(cls, hparams: ROMEHParams) -> tuple[StatsNeed, ...]:
        if not hparams.mom2_adjustment:
            return ()
        return (StatsNeed(tuple(sorted(set(hparams.layers))), hparams.mom2_corpus, hparams.mom2_n_samples,
                          hparams.mom2_dtype),)

    @classmethod
    def provenance(cls, hparams: ROMEHParams) -> str:
        needs = cls.requirements(hparams)
        return provenance_note(needs[0]) if needs else "no mom2 statistics (mom2_adjustment off)"

    def left_vector(self, case: EditCase, layer: int) -> torch.Tensor:
        """u: the mean key over the templated prompts, C⁻¹-adjusted when configured, normalised."""
        subject = subject_of(case)
        rows = encode_rows(self.lm, [(t.format(case.prompt), None, subject, self.hparams.fact_token) for t in self.templates])
        keys, _, _ = capture(self.lm, rows, key_layers=[layer])
        u = keys[layer].float().mean(dim=0)
        if self.hparams.mom2_adjustment:
            moment = self.moments[layer].to(torch.float64)
            u = torch.linalg.solve(moment, u.to(torch.float64)).to(torch.float32)
        return u / u.norm()

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        steps, loss = 0, math.nan
        for case in cases:  # ROME edits one fact per call; a batch is applied one case after another
            # As execute_rome: each layer's update is applied before the next layer's u and v are computed.
            for layer in sorted(set(self.edit_layers)):
                u = self.left_vector(case, layer)
                value = optimize_value(self.lm, case, self.templates, layer, "mlp", self.hparams.value_settings(),
                                       self.hparams.fact_token, self.hparams.fast_forward)
                plain = encode_rows(self.lm, [(case.prompt, None, subject_of(case), self.hparams.fact_token)])
                keys, _, _ = capture(self.lm, plain, key_layers=[layer])
                k_star = keys[layer][0].float()
                current = down_proj(self.lm, layer)(keys[layer][0:1])[0].float()
                denominator = torch.dot(k_star, u)
                right = (value.target - current) / denominator
                self._add(layer, torch.outer(right, u))  # [d_model, d_mlp]: ΔW k = right (u·k)
                self.last_edit[layer] = (k_star, value.target)  # ΔW maps k* to v* (tests read this)
                steps, loss = steps + value.steps, value.loss
        return EditStats(steps=steps, loss=loss)
