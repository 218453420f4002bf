"""Batched greedy decoding through an edited model's logits function, with a KV cache where it is sound.

Every scored prompt goes through the same ``logits_fn(TFBatch)`` that teacher forcing uses, so an editor is
in exactly the state teacher forcing sees.  Two ways to decode, giving the same tokens:

* **cached** (``logits_fn`` marked ``benchmarks.metrics.prefix_causal``: plain weights, ROME/MEMIT/FT/LoRA,
  BaFT/ReFT whose interventions sit at fixed positions): one forward over the prompts fills the cache,
  then each step runs one new column.  Rows of different prompt lengths are right-padded once; every
  step appends one column to all rows, so a short row has masked padding between its prompt and its
  generated tokens (position ids count real tokens; ``forward_logits``).
* **re-run** (anything else: GRACE, MELO and WISE route each row on the whole sequence): every step runs
  the whole right-padded sequence, prompt plus tokens so far, as EasyEdit's ``use_cache=False`` does.
  ``prompt_lengths`` is the prompt's token count and ``lengths`` the current length, so a router keyed
  on the last prompt token or on all real tokens sees the growing sequence exactly as a scored row.

Rows leave the batch when their stop rule says so; the batch shrinks with them (the cache too).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from benchmarks.metrics import KVState, LogitsFn, TFBatch, right_pad, supports_kv_cache

#: a row's generated tokens so far -> whether it is finished
StopFn = Callable[[Sequence[int]], bool]
DECODINGS = ("auto", "cache", "rerun")


def uses_cache(logits_fn: LogitsFn, decoding: str = "auto") -> bool:
    """Whether ``greedy_decode`` keeps a KV cache for ``logits_fn`` (``decoding``: auto, cache or rerun).

    ``cache`` on an unmarked function is refused: its output may depend on tokens after a position."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding == "cache" and not supports_kv_cache(logits_fn):
        raise ValueError("this logits function is not marked prefix_causal; it cannot decode with a KV cache")
    return decoding != "rerun" and supports_kv_cache(logits_fn)


def greedy_decode(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int,
                  device: torch.device, stop: StopFn | None = None, batch_size: int = 32,
                  groups: Sequence[int] | None = None, intervene_answer: bool = True,
                  decoding: str = "auto") -> list[list[int]]:
    """Greedily generated tokens for every prompt (token ids), in order: at most ``max_new_tokens`` each,
    ending with the token after which ``stop`` said the row was finished.

    ``groups``: one case index per prompt (case-parallel scoring, ``TFBatch.groups``); prompts of one case
    must be consecutive.  ``intervene_answer``: passed on as ``TFBatch.intervene_answer``.
    """
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"greedy_decode(): {len(groups)} groups for {len(prompts)} prompts")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("greedy_decode(): every prompt needs at least one token")
    cached = uses_cache(logits_fn, decoding)
    step = _decode_cached if cached else _decode_rerun
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_groups = None if groups is None else list(groups[start : start + batch_size])
        out.extend(step(logits_fn, [list(p) for p in prompts[start : start + batch_size]], max_new_tokens,
                        pad_token_id, device, stop or _never, chunk_groups, intervene_answer))
    return out


def _never(tokens: Sequence[int]) -> bool:
    return False


def _decode_rerun(logits_fn: LogitsFn, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int,
                  device: torch.device, stop: StopFn, groups: list[int] | None,
                  intervene_answer: bool) -> list[list[int]]:
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        rows = [prompts[i] + generated[i] for i in active]
        input_ids, attention = right_pad(rows, pad_token_id)
        batch = TFBatch(input_ids, attention, torch.tensor([len(prompts[i]) for i in active], dtype=torch.long),
                        torch.tensor([len(row) for row in rows], dtype=torch.long),
                        None if groups is None else torch.tensor([groups[i] for i in active], dtype=torch.long),
                        intervene_answer=intervene_answer).to(device)
        with torch.no_grad():
            logits = logits_fn(batch)
        last = (batch.lengths - 1).to(logits.device)
        next_tokens = logits[torch.arange(len(active), device=logits.device), last].argmax(dim=-1).tolist()
        for row, token in zip(active, next_tokens):
            generated[row].append(int(token))
        active = [row for row in active if not stop(generated[row])]
    return generated


def _decode_cached(logits_fn: LogitsFn, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int,
                   device: torch.device, stop: StopFn, groups: list[int] | None,
                   intervene_answer: bool) -> list[list[int]]:
    generated: list[list[int]] = [[] for _ in prompts]
    input_ids, attention = right_pad(prompts, pad_token_id)
    input_ids, attention = input_ids.to(device), attention.to(device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    group_ids = None if groups is None else torch.tensor(groups, dtype=torch.long, device=device)
    state = KVState()
    active = list(range(len(prompts)))
    # the column whose logits give each row's next token: its last prompt token, then the newest column
    last = prompt_lengths - 1
    for _ in range(max_new_tokens):
        width = input_ids.shape[1]
        batch = TFBatch(input_ids, attention, prompt_lengths, torch.full_like(prompt_lengths, width), group_ids,
                        cache=state, intervene_answer=intervene_answer)
        seen = state.seen
        with torch.no_grad():
            logits = logits_fn(batch)
        rows = torch.arange(len(active), device=logits.device)
        next_tokens = logits[rows, (last - seen).to(logits.device)].argmax(dim=-1)
        for row, token in zip(active, next_tokens.tolist()):
            generated[row].append(int(token))
        keep = [index for index, row in enumerate(active) if not stop(generated[row])]
        if not keep:
            break
        input_ids = torch.cat([input_ids, next_tokens.to(device)[:, None]], dim=1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        last = torch.full_like(prompt_lengths, width)
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            input_ids, attention, prompt_lengths, last = input_ids[index], attention[index], prompt_lengths[index], last[index]
            group_ids = None if group_ids is None else group_ids[index]
            _select_rows(state.past, index)
            active = [active[i] for i in keep]
    return generated


def _select_rows(past, index: torch.Tensor) -> None:
    """Keep only rows ``index`` of a transformers cache (in place)."""
    select = getattr(past, "batch_select_indices", None)
    if select is not None:
        select(index)
        return
    for layer in getattr(past, "layers", ()):  # a cache without the helper: its layers' tensors by hand
        layer.keys, layer.values = layer.keys[index], layer.values[index]
