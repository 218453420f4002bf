"""AdaLoRA (Zhang et al., ICLR 2023) and plain LoRA (Hu et al., ICLR 2022) through ``peft`` (0.21).

EasyEdit's LoRA path (``easyeditor/models/lora/lora_main.py``, anchors §3.4) trains adapters on the
teacher-forced LM loss (labels masked to the target) with Adam for ``num_steps`` steps, on ``q_proj``
and ``v_proj`` of every layer.  Its AdaLoRA variant never calls ``update_and_allocate``, so no rank is
ever reallocated, and with the peft it pins it fails for want of ``total_step``.  Here:

* ``adalora``: ``AdaLoraConfig(init_r, target_r, tinit, tfinal, deltaT, total_step=max_steps, beta1,
  beta2, orth_reg_weight, ...)``.  Every optimisation step is ``loss.backward(); optimizer.step();
  update_and_allocate(step); zero_grad()`` (peft's documented order), so the budget schedule really
  runs: ``tinit`` warm-up steps at ``init_r`` per module, then the total rank budget shrinks cubically
  towards ``target_r`` × modules until step ``max_steps - tfinal``, pruning the singular values with the
  lowest sensitivity-based importance across *all* modules (so modules end with different ranks), then
  ``tfinal`` steps with the final allocation fixed.  The loss is the LM loss plus peft's orthogonality
  regulariser on P and Q (``orth_reg_weight``), which ``AdaLoraModel.forward`` adds when labels are given.
* ``lora``: ``LoraConfig(r, lora_alpha, lora_dropout, ...)``, same training loop, no allocation.

One edit call is one training run of ``max_steps`` steps (the schedule restarts and the importance
averages are reset at each call; the adapters themselves keep training across a continual stream, as
EasyEdit's sequential mode reuses the PEFT model).  ``early_stop_loss`` stops a run once the
teacher-forced CE is below it, but for AdaLoRA never before the allocation has been finalised (step
``max_steps - tfinal``), so that ranks are always reallocated.  The model is in train mode while
training (adapter dropout), eval mode otherwise; adapter initialisation and dropout draw from a
generator seeded by the seed.  Restore: ``unload()`` takes the adapters out; the base weights were
never merged, so the model is bit-for-bit the original.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from benchmarks.case import EditCase
from benchmarks.metrics import encode
from methods.base import Editor, EditStats, NonFiniteError, register_method
from methods.ft import answer_positions
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel


@dataclass(frozen=True)
class LoRAHParams:
    rank: int  # r
    lr: float
    max_steps: int
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()  # () = every layer (EasyEdit: layers None)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    weight_decay: float = 0.0
    early_stop_loss: float = 0.0  # 0: run every step, as EasyEdit does

    def __post_init__(self) -> None:
        if self.rank < 1 or self.lr <= 0 or self.max_steps < 1:
            raise ValueError("rank and max_steps must be >= 1 and lr > 0")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass(frozen=True)
class AdaLoRAHParams:
    init_r: int  # starting rank of every module's SVD-form update P Λ Q
    target_r: int  # average rank per module after allocation (the final budget is target_r × modules)
    tinit: int  # warm-up steps before pruning starts
    tfinal: int  # final steps with the allocation fixed
    lr: float
    max_steps: int  # = peft's total_step
    deltaT: int = 1  # steps between two allocations
    beta1: float = 0.85  # EMA of the sensitivity (peft default)
    beta2: float = 0.85  # EMA of its uncertainty (peft default)
    orth_reg_weight: float = 0.5
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    weight_decay: float = 0.0
    early_stop_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.init_r < 1 or not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"need 1 <= target_r <= init_r, got init_r={self.init_r}, target_r={self.target_r}")
        if self.lr <= 0 or self.max_steps < 1 or self.deltaT < 1:
            raise ValueError("lr must be > 0, max_steps and deltaT >= 1")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.max_steps - self.tfinal:
            raise ValueError(f"the schedule leaves no allocation phase: need 0 <= tinit < max_steps - tfinal, "
                             f"got tinit={self.tinit}, tfinal={self.tfinal}, max_steps={self.max_steps}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


class PeftEditor(Editor):
    """Adapters injected into ``lm.model`` in place; ``logits`` is the plain forward (adapters active)."""

    adaptive = False

    def __init__(self, lm: LoadedModel, hparams: Any, seed: int) -> None:
        super().__init__(lm, hparams, seed)
        # peft imports transformers (seconds): off `kebench list`'s start-up path
        from peft import get_peft_model

        bad = [layer for layer in hparams.layers if not 0 <= layer < lm.num_layers]
        if bad:
            raise KebenchError(f"{self.name}: layer {bad[0]} out of range for {lm.name} ({lm.num_layers} layers)")
        names = [name for name, _ in lm.model.named_modules()]
        missing = [m for m in hparams.target_modules if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            hint = f" (this {lm.model_type} model calls it '{lm.module_path(missing[0])}')" \
                if lm.module_path(missing[0]) != missing[0] else ""
            raise KebenchError(f"{self.name}: target module '{missing[0]}' not found in {lm.name}{hint}")
        self.generator_seed = seed
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on unused LoRA fields
            torch.manual_seed(seed)
            self.peft_model = get_peft_model(lm.model, self.config())
        self.lm.model.eval()
        self.calls = 0

    def config(self):
        raise NotImplementedError

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft_model.named_parameters() if "lora_" in n and p.requires_grad]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def after_step(self, step: int) -> None:
        """AdaLoRA reallocates ranks here (after optimizer.step, before zero_grad)."""

    def may_stop(self, step: int) -> bool:
        return True

    def apply(self, cases: Sequence[EditCase]) -> EditStats:
        hp, lm = self.hparams, self.lm
        if self.peft_model is None:
            raise RuntimeError("editor was restored; build a new one")
        batch = encode(lm.tokenizer, [(c.prompt, c.target_new) for c in cases], lm.pad_token_id).to(lm.device)
        rows, columns, labels = answer_positions(batch)
        label_ids = torch.full_like(batch.input_ids, -100)
        label_ids[rows, columns + 1] = labels  # HF shifts labels by one inside the loss
        parameters = self.adapter_parameters()
        optimizer = torch.optim.Adam(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        self.start_run()
        steps, ce_value = 0, math.nan
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.generator_seed * 1_000_003 + self.calls)  # dropout masks: seeded, per call
            self.calls += 1
            lm.model.train()
            try:
                for step in range(hp.max_steps):
                    out = self.peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          labels=label_ids, use_cache=False)
                    ce = F.cross_entropy(out.logits[rows, columns].float(), labels)
                    ce_value = float(ce.detach())
                    if not (math.isfinite(ce_value) and math.isfinite(float(out.loss.detach()))):
                        raise NonFiniteError(f"{self.name}: non-finite loss at step {step}")
                    if ce_value < hp.early_stop_loss and self.may_stop(step):
                        break
                    out.loss.backward()
                    optimizer.step()
                    self.after_step(step)
                    optimizer.zero_grad(set_to_none=True)
                    steps = step + 1
            finally:
                lm.model.eval()
                optimizer.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in parameters):
            raise NonFiniteError(f"{self.name}: non-finite adapter weights")
        return EditStats(steps=steps, loss=ce_value)

    def start_run(self) -> None:
        """Called at the start of every edit call."""

    def restore(self) -> None:
        if self.peft_model is None:
            return
        base = self.peft_model.unload()  # adapters out, original modules back; weights never merged
        if hasattr(base, "peft_config"):
            del base.peft_config
        base.eval()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.peft_model = None


@register_method("lora")
class LoRA(PeftEditor):
    hparams_class = LoRAHParams

    def config(self):
        # peft imports transformers (seconds): off `kebench list`'s start-up path
        from peft import LoraConfig

        hp = self.hparams
        return LoraConfig(task_type="CAUSAL_LM", r=hp.rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                          target_modules=list(hp.target_modules), layers_to_transform=list(hp.layers) or None)


@register_method("adalora")
class AdaLoRA(PeftEditor):
    hparams_class = AdaLoRAHParams
    adaptive = True

    def config(self):
        # peft imports transformers (seconds): off `kebench list`'s start-up path
        from peft import AdaLoraConfig

        hp = self.hparams
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=hp.init_r, target_r=hp.target_r, tinit=hp.tinit,
                             tfinal=hp.tfinal, deltaT=hp.deltaT, beta1=hp.beta1, beta2=hp.beta2,
                             orth_reg_weight=hp.orth_reg_weight, total_step=hp.max_steps,
                             lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                             target_modules=list(hp.target_modules), layers_to_transform=list(hp.layers) or None)

    def start_run(self) -> None:
        self.peft_model.base_model.rankallocator.reset_ipt()
        self.rank_history: list[dict[str, int]] = []  # per step of the last edit call, after allocation

    def after_step(self, step: int) -> None:
        self.peft_model.base_model.update_and_allocate(step)
        self.rank_history.append(self.ranks())

    def may_stop(self, step: int) -> bool:
        return step > self.hparams.max_steps - self.hparams.tfinal

    def ranks(self) -> dict[str, int]:
        """The current rank of every adapted module: its non-zero singular values (entries of Λ)."""
        return {name.removesuffix(".lora_E.default"): int((p != 0).sum())
                for name, p in self.peft_model.named_parameters() if name.endswith("lora_E.default")}
