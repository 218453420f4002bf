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

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PROTOCOL_TEACHER_FORCED = "teacher_forced"


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

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def answer_mask(self) -> torch.Tensor:
        """[B, L] bool, true at answer tokens."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions[None, :] >= self.prompt_lengths[:, None]) & (positions[None, :] < self.lengths[:, None])

    def intervention_mask(self, last_prompt_tokens: int) -> torch.Tensor:
        """[B, L] bool: the last ``last_prompt_tokens`` prompt tokens and every answer token."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        start = (self.prompt_lengths - last_prompt_tokens).clamp_min(0)
        return (positions[None, :] >= start[:, None]) & (positions[None, :] < self.lengths[:, None])

    def to(self, device: torch.device) -> "TFBatch":
        moved = (t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_lengths, self.lengths))
        return TFBatch(*moved, groups=None if self.groups is None else self.groups.to(device))


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
