"""PIQA (Bisk et al., AAAI 2020) validation accuracy: the BaFT paper's downstream locality check (Table 8).

The paper (App. D.2, following Yao et al. 2023) counts an item correct when the model "chooses the
correct answer according to its perplexity".  For each of the two solutions we compute, on the
teacher-forced text ``prompt + " " + solution``, the **mean negative log-likelihood of the solution's
tokens given the prompt** (its log-perplexity) and choose the solution with the lower value; a tie
goes to ``sol1`` (lm-eval's argmax picks the first maximum the same way).  ``normalization="sum"``
gives lm-eval's unnormalised ``acc`` (total log-likelihood) instead.  The prompt is lm-eval's PIQA
template ``"Question: {goal}\\nAnswer:"``; pass ``template="{goal}"`` for the bare goal.

The solution tokens are found exactly as the edit metrics find answer tokens (``benchmarks.metrics.encode``:
character offsets of the joined string, right padding), so an editor's ``logits`` (which may route on the
prompt/answer boundary, as BaFT and ReFT do) sees PIQA rows the way it sees evaluation rows.

Data: ``piqa/valid.jsonl`` (1,838 goals with two solutions) and ``piqa/valid-labels.lst`` (the index of
the correct solution), aligned line by line.  ``piqa`` is a downstream check, not an edit benchmark: it
is registered with ``register_downstream`` and a continual or batched scenario runs it with
``downstream: piqa`` (the edited model after each stream, beside the unedited model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from benchmarks.data import data_file, read_json, read_text, require_text, resolve_data_dir
from benchmarks.metrics import LogitsFn, encode
from benchmarks.registry import register_downstream
from kebench.core.errors import KebenchError

PIQA_ITEMS = "piqa/valid.jsonl"
PIQA_LABELS = "piqa/valid-labels.lst"
PIQA_SOURCE = "the PIQA site (yonatanbisk.com/piqa, valid.jsonl and valid-labels.lst)"
PIQA_TEMPLATE = "Question: {goal}\nAnswer:"
NORMALIZATIONS = ("mean", "sum")


@dataclass(frozen=True)
class PiqaItem:
    goal: str
    sol1: str
    sol2: str
    label: int  # 0: sol1 is correct, 1: sol2


def load_piqa(data_dir: str | os.PathLike[str] | None = None, n: int | None = None) -> list[PiqaItem]:
    """The first ``n`` validation items (all 1,838 when ``n`` is None), in file order."""
    root = resolve_data_dir(data_dir)
    items_path = data_file(root, PIQA_ITEMS, PIQA_SOURCE)
    labels_path = data_file(root, PIQA_LABELS, PIQA_SOURCE)
    records = read_json(items_path)
    labels = [line.strip() for line in read_text(labels_path).splitlines() if line.strip()]
    if len(labels) != len(records):
        raise KebenchError(f"{labels_path}: {len(labels)} labels for the {len(records)} items of {items_path}")
    if n is not None and not 0 < n <= len(records):
        raise KebenchError(f"n must be in 1..{len(records)} for PIQA validation, got {n}")
    out = []
    for index, (record, label) in enumerate(zip(records, labels)):
        if n is not None and index >= n:
            break
        where = f"{items_path}: record {index}"
        if label not in ("0", "1"):
            raise KebenchError(f"{labels_path}: line {index + 1}: label should be 0 or 1, got {label!r}")
        out.append(PiqaItem(require_text(record, "goal", where), require_text(record, "sol1", where),
                            require_text(record, "sol2", where), int(label)))
    return out


def _solution_nll(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device,
                  pairs: Sequence[tuple[str, str]], normalization: str) -> list[float]:
    """Per (prompt, solution) row: mean (or summed) NLL of the solution tokens given the prompt."""
    batch = encode(tokenizer, pairs, pad_token_id).to(device)
    with torch.no_grad():
        logits = logits_fn(batch)
    out = []
    for row in range(batch.size):
        p, n = int(batch.prompt_lengths[row]), int(batch.lengths[row])
        nll = F.cross_entropy(logits[row, p - 1 : n - 1].float(), batch.input_ids[row, p:n], reduction="sum")
        out.append(float(nll) / (n - p) if normalization == "mean" else float(nll))
    return out


def piqa_choices(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, items: Sequence[PiqaItem],
                 batch_size: int = 8, template: str = PIQA_TEMPLATE, normalization: str = "mean") -> list[int]:
    """The chosen solution (0 or 1) per item; ``batch_size`` items (2 rows each) per forward pass."""
    if normalization not in NORMALIZATIONS:
        raise KebenchError(f"PIQA normalization must be one of {', '.join(NORMALIZATIONS)}, got '{normalization}'")
    if batch_size <= 0:
        raise KebenchError(f"PIQA batch_size must be > 0, got {batch_size}")
    choices = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pairs = [(template.format(goal=item.goal), solution) for item in chunk for solution in (item.sol1, item.sol2)]
        nll = _solution_nll(logits_fn, tokenizer, pad_token_id, device, pairs, normalization)
        choices.extend(0 if nll[2 * i] <= nll[2 * i + 1] else 1 for i in range(len(chunk)))
    return choices


def piqa_accuracy(logits_fn: LogitsFn, tokenizer, pad_token_id: int, device: torch.device, items: Sequence[PiqaItem],
                  batch_size: int = 8, template: str = PIQA_TEMPLATE, normalization: str = "mean") -> float:
    """Fraction of ``items`` whose lower-perplexity solution is the correct one.

    ``logits_fn`` maps a ``TFBatch`` to logits: ``orchestrator.scenarios.plain_logits(lm)`` for the
    unedited model, ``editor.logits`` for an edited one (call it before ``editor.restore()``).
    """
    if not items:
        raise KebenchError("piqa_accuracy needs at least one item")
    choices = piqa_choices(logits_fn, tokenizer, pad_token_id, device, items, batch_size, template, normalization)
    return sum(choice == item.label for choice, item in zip(choices, items)) / len(items)



@register_downstream("piqa", "PIQA validation accuracy, lower-perplexity solution (BaFT paper Table 8)")
def piqa_downstream(logits_fn: LogitsFn, lm, n: int | None, data_dir: str | os.PathLike[str] | None = None
                    ) -> tuple[float, int]:
    """Accuracy on the first ``n`` validation items (all when None) and the number of items scored."""
    items = load_piqa(data_dir, n)
    return piqa_accuracy(logits_fn, lm.tokenizer, lm.pad_token_id, lm.device, items), len(items)
