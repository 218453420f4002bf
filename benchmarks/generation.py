"""EasyEdit's vanilla-generation protocol (the one it selects for GRACE; editing-anchors §2.5).

For a scored pair (x, y): let k be the number of answer tokens of y, greedily generate k new tokens from
the prompt x alone (no cache, no sampling), and score the fraction of positions i where generated
token i equals answer token i.  Locality generates k tokens from the locality prompt before and after
the edit and scores their position-wise agreement.  Rel/Gen/Por therefore never see the gold prefix,
unlike the teacher-forced protocol (``benchmarks.metrics``), and rows carry the ``generation`` tag.

Choice (a named deviation): the answer tokens are the ones the teacher-forced protocol scores, i.e.
the tokens of ``prompt + " " + answer`` after the prompt (``benchmarks.metrics.encode``), and the prompt
is that row's own prefix.  EasyEdit encodes the target alone without its leading space; for SentencePiece
(LLaMA) tokenizers that is the same token sequence, but for byte-level BPE (GPT-2, SmolLM2) it is not the
sequence a model would generate after the prompt ("Paris" vs " Paris"), which depresses GRACE's
scores there (editing-anchors §2.5, caution).  Using the joined row keeps both protocols on the same
answer tokens.

Generation goes through the same ``logits_fn(TFBatch)`` as teacher forcing, so an editor that routes
per input (GRACE, MELO, WISE) routes the growing sequence exactly as it routes a scored row: the batch
given to ``logits_fn`` has ``prompt_lengths`` = the prompt's token count and ``lengths`` = the current
length (prompt + tokens generated so far).  Rows are right-padded; with a causal mask a row's real
positions never see the padding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.metrics import LogitsFn, TFBatch, encode, right_pad

PROTOCOL_GENERATION = "generation"


def _right_padded(rows: Sequence[list[int]], prompt_lengths: Sequence[int], pad_token_id: int,
                  device: torch.device) -> TFBatch:
    input_ids, attention = right_pad(rows, pad_token_id)
    batch = TFBatch(input_ids, attention, torch.tensor(list(prompt_lengths), dtype=torch.long),
                    torch.tensor([len(row) for row in rows], dtype=torch.long))
    return batch.to(device)


def greedy_continuations(logits_fn: LogitsFn, prompts: Sequence[list[int]], steps: Sequence[int], pad_token_id: int,
                         device: torch.device) -> list[torch.Tensor]:
    """Greedily append ``steps[i]`` tokens to ``prompts[i]`` (token ids); returns the new tokens per row.

    Every step re-runs the whole sequence (EasyEdit generates with ``use_cache=False``), which is also what
    lets a routing editor see the full input at every step.  Rows that have all their tokens drop out.
    """
    if len(prompts) != len(steps):
        raise ValueError("one step count per prompt is needed")
    sequences = [list(prompt) for prompt in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max(steps, default=0)):
        active = [i for i, k in enumerate(steps) if step < k]
        batch = _right_padded([sequences[i] for i in active], [len(prompts[i]) for i in active], pad_token_id, device)
        with torch.no_grad():
            logits = logits_fn(batch)
        last = batch.lengths - 1
        next_tokens = logits[torch.arange(len(active), device=logits.device), last.to(logits.device)].argmax(dim=-1)
        for row, token in zip(active, next_tokens.tolist()):
            sequences[row].append(int(token))
            generated[row].append(int(token))
    return [torch.tensor(tokens, dtype=torch.long) for tokens in generated]


def generate(logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id: int,
             device: torch.device, batch_size: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(k greedily generated tokens, the k gold answer tokens) for every (prompt, answer) pair, in order.

    The same return shape as ``benchmarks.metrics.predict``, so the scorer treats both protocols alike.
    """
    generated: list[torch.Tensor] = []
    golds: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        batch = encode(tokenizer, pairs[start : start + batch_size], pad_token_id)
        prompts, steps = [], []
        for i in range(batch.size):
            p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
            prompts.append(batch.input_ids[i, :p].tolist())
            steps.append(n - p)
            golds.append(batch.input_ids[i, p:n].clone())
        generated.extend(greedy_continuations(logits_fn, prompts, steps, pad_token_id, device))
    return generated, golds
