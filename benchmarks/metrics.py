"""EasyEdit's teacher-forced edit metrics, batched.

Every scored text is ``prompt + " " + answer``.  One forward pass gives, at each answer token, the
argmax prediction from the gold prefix:

* reliability / generality / portability: the fraction of answer tokens whose argmax equals the gold
  token (generality on the rephrased prompt, portability against the portability answer);
* locality: the fraction of answer positions where the edited model's argmax equals the *unedited*
  model's argmax on the same input (the answer text only supplies the teacher-forcing prefix).

The joint string is tokenized once and the prompt/answer boundary is read from the character offsets,
so the answer tokens are exactly the tokens that the model sees after the prompt.  Rows are padded on
the right: with a causal mask the real positions never see the padding, so a padded row scores exactly
like the same text alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

from kebench.core.protocols import TEACHER_FORCED

PROTOCOL_TEACHER_FORCED = TEACHER_FORCED


@dataclass
class KVState:
    """The key/value cache of a batch being decoded step by step (``benchmarks.decoding``).

    Mutable on purpose: each forward appends the columns it ran.  ``seen`` columns of the batch are in
    ``past`` (the model's own cache object, created by the first forward)."""

    past: Any = None
    seen: int = 0


@dataclass(frozen=True)
class TFBatch:
    """Right-padded ``prompt + " " + answer`` rows with their prompt/answer boundaries."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    prompt_lengths: torch.Tensor  # [B] long: tokens before the first answer token
    lengths: torch.Tensor  # [B] long: real tokens in the row
    #: [B] long, or None: which of several independent edits each row belongs to (case-parallel editing
    #: routes each row through its own case's intervention; ``None``: one edited model for every row)
    groups: torch.Tensor | None = None
    #: set only by cached decoding, and only for logits functions marked ``prefix_causal``: the columns
    #: before ``cache.seen`` are in the cache, a forward runs the rest and returns their logits alone
    cache: KVState | None = field(default=None, compare=False)
    #: whether the answer positions take an editor's per-position interventions (BaFT/ReFT).  Teacher forcing
    #: always; under the wild protocol the answer is the model's own generated text and its
    #: ``intervene_generated`` setting decides
    intervene_answer: bool = True

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def answer_mask(self) -> torch.Tensor:
        """[B, L] bool, true at answer tokens."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions[None, :] >= self.prompt_lengths[:, None]) & (positions[None, :] < self.lengths[:, None])

    def intervention_mask(self, last_prompt_tokens: int) -> torch.Tensor:
        """[B, L] bool: the last ``last_prompt_tokens`` prompt tokens and every answer token (only the prompt
        tokens when ``intervene_answer`` is off)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        start = (self.prompt_lengths - last_prompt_tokens).clamp_min(0)
        end = self.lengths if self.intervene_answer else torch.minimum(self.prompt_lengths, self.lengths)
        return (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])

    def live(self, per_column: torch.Tensor) -> torch.Tensor:
        """The columns of a [B, L, ...] tensor that a forward runs: all, or those after the cached ones."""
        return per_column if self.cache is None else per_column[:, self.cache.seen :]

    def to(self, device: torch.device) -> "TFBatch":
        moved = (t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_lengths, self.lengths))
        return TFBatch(*moved, groups=None if self.groups is None else self.groups.to(device), cache=self.cache,
                       intervene_answer=self.intervene_answer)


def join(prompt: str, answer: str) -> tuple[str, int]:
    """The scored string and the character index where the answer part (with its space) begins."""
    return f"{prompt} {answer}", len(prompt)


def right_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token rows, right-padded to the longest: the one padding rule."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    return input_ids, attention


def encode(tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int, max_length: int | None = None,
           groups: Sequence[int] | None = None) -> TFBatch:
    """Tokenize ``prompt + " " + answer`` rows; an answer token is any token that starts at or after the join.

    ``groups``: one index per pair, carried as ``TFBatch.groups``."""
    if not pairs:
        raise ValueError("encode() needs at least one (prompt, answer) pair")
    if groups is not None and len(groups) != len(pairs):
        raise ValueError(f"encode(): {len(groups)} groups for {len(pairs)} pairs")
    rows: list[list[int]] = []
    prompt_lengths: list[int] = []
    for prompt, answer in pairs:
        text, boundary = join(prompt, answer)
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(encoded["input_ids"])
        offsets = encoded["offset_mapping"]
        special = set(tokenizer.all_special_ids)
        # A special token (BOS) has an empty span; count it on the prompt side.
        n_prompt = sum(1 for tid, (start, end) in zip(ids, offsets) if start < boundary or (tid in special and start == end == 0))
        if n_prompt >= len(ids):
            raise ValueError(f"answer {answer!r} produced no tokens after prompt {prompt!r}")
        if n_prompt == 0:
            raise ValueError(f"prompt {prompt!r} produced no tokens")
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length  # keep the answer; drop the start of the prompt
            cut = min(cut, n_prompt - 1)
            ids, n_prompt = ids[cut:], n_prompt - cut
        rows.append(ids)
        prompt_lengths.append(n_prompt)
    input_ids, attention = right_pad(rows, pad_token_id)
    return TFBatch(
        input_ids,
        attention,
        torch.tensor(prompt_lengths, dtype=torch.long),
        torch.tensor([len(r) for r in rows], dtype=torch.long),
        None if groups is None else torch.tensor(list(groups), dtype=torch.long),
    )


def answer_predictions(logits: torch.Tensor, batch: TFBatch) -> list[torch.Tensor]:
    """Per row, the argmax token predicted for each answer position (from the logits one step earlier)."""
    predicted = logits.argmax(dim=-1)  # [B, L]
    out = []
    for i in range(batch.size):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        out.append(predicted[i, p - 1 : n - 1].detach().cpu())
    return out


def answer_tokens(batch: TFBatch) -> list[torch.Tensor]:
    out = []
    for i in range(batch.size):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        out.append(batch.input_ids[i, p:n].detach().cpu())
    return out


def token_accuracy(predicted: torch.Tensor, gold: torch.Tensor) -> float:
    """Fraction of positions where ``predicted == gold`` (EasyEdit's ``rewrite_acc``)."""
    if predicted.shape != gold.shape or predicted.numel() == 0:
        raise ValueError(f"shape mismatch: {tuple(predicted.shape)} vs {tuple(gold.shape)}")
    return float((predicted == gold).float().mean())


LogitsFn = Callable[[TFBatch], torch.Tensor]
F = TypeVar("F", bound=Callable[..., torch.Tensor])


def prefix_causal(fn: F) -> F:
    """Mark a logits function (or an editor's ``logits`` method) whose output at a position depends only on
    the tokens up to it, and which honours ``TFBatch.cache`` (runs ``forward_logits``).  Decoding then keeps a
    KV cache; an unmarked function (a router that looks at the whole sequence: GRACE, MELO, WISE) is
    re-run on the whole sequence at every step.  An override of a marked method is unmarked until it is
    marked itself, so a subclass never inherits a promise it may break."""
    fn.prefix_causal = True  # type: ignore[attr-defined]
    return fn


def supports_kv_cache(logits_fn: Callable) -> bool:
    """Whether ``logits_fn`` was marked ``prefix_causal`` (a bound method reads its function's mark)."""
    return bool(getattr(logits_fn, "prefix_causal", False))


def _cache_names(model: torch.nn.Module) -> tuple[str, str]:
    """(forward keyword, output attribute) of the model's KV cache: ``cache`` from transformers 5,
    ``past_key_values`` before."""
    names = getattr(model, "_kebench_cache_names", None)
    if names is None:
        parameters = inspect.signature(model.forward).parameters
        names = ("cache", "cache") if "cache" in parameters else ("past_key_values", "past_key_values")
        model._kebench_cache_names = names  # type: ignore[assignment]
    return names


def forward_logits(model: torch.nn.Module, batch: TFBatch) -> torch.Tensor:
    """The model's logits on ``batch``: [B, L, V]; with ``batch.cache``, only the columns after the cached ones
    ([B, L - seen, V]), appending them to the cache.

    Under cached decoding rows may have padding columns between their prompt and the generated tokens (rows
    of different prompt lengths share one new column per step); they are masked out, and position ids count
    real tokens only, so a row computes what it would alone."""
    if batch.cache is None:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    state = batch.cache
    keyword, attribute = _cache_names(model)
    positions = (batch.attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    out = model(input_ids=batch.input_ids[:, state.seen :], attention_mask=batch.attention_mask,
                position_ids=positions[:, state.seen :], use_cache=True, **{keyword: state.past})
    state.past, state.seen = getattr(out, attribute), batch.input_ids.shape[1]
    return out.logits


def model_logits(model: torch.nn.Module) -> LogitsFn:
    """The unedited model's logits function (KV-cacheable)."""
    @prefix_causal
    def logits(batch: TFBatch) -> torch.Tensor:
        return forward_logits(model, batch)

    return logits


def predict(logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
            device: torch.device, batch_size: int = 32,
            groups: Sequence[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(argmax predictions, gold answer tokens) for every pair, in order, ``batch_size`` rows at a time
    (``groups``: one index per pair, passed to ``logits_fn`` as ``TFBatch.groups``)."""
    predictions: list[torch.Tensor] = []
    golds: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        chunk_groups = None if groups is None else groups[start : start + batch_size]
        batch = encode(tokenizer, pairs[start : start + batch_size], pad_token_id, groups=chunk_groups).to(device)
        with torch.no_grad():
            logits = logits_fn(batch)
        predictions.extend(answer_predictions(logits, batch))
        golds.extend(answer_tokens(batch))
    return predictions, golds


def mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def keyed_mean(per_key: dict[str, list[float]]) -> float | None:
    """KnowEdit aggregation: mean within each key, then mean over the keys that have prompts."""
    key_means = [sum(v) / len(v) for v in per_key.values() if v]
    return mean(key_means)
