"""PIQA loading and the lower-perplexity choice."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.piqa import PiqaItem, load_piqa, piqa_accuracy, piqa_choices
from kebench.core.errors import KebenchError
from orchestrator.scenarios import plain_logits


@pytest.mark.needs_data("piqa")
def test_load_counts_and_alignment():
    items = load_piqa()
    assert len(items) == 1838  # PROVENANCE.md
    assert items[0].goal == "How do I ready a guinea pig cage for it's new occupants?"
    assert {item.label for item in items} == {0, 1}
    assert load_piqa(n=5) == items[:5]
    with pytest.raises(KebenchError, match=r"n must be in 1\.\.1838"):
        load_piqa(n=5000)


def _write(tmp_path, records, labels):
    (tmp_path / "piqa").mkdir(exist_ok=True)
    (tmp_path / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(f"{label}\n" for label in labels))


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(KebenchError) as error:
        load_piqa(tmp_path)
    assert "piqa/valid.jsonl" in str(error.value) and str(tmp_path) in str(error.value)
    good = {"goal": "g", "sol1": "a", "sol2": "b"}
    _write(tmp_path, [good, {"goal": "g", "sol1": "a"}], [0, 1])
    with pytest.raises(KebenchError, match=r"valid.jsonl: record 1: missing field 'sol2'"):
        load_piqa(tmp_path)
    _write(tmp_path, [good, good], [0, 2])
    with pytest.raises(KebenchError, match=r"valid-labels.lst: line 2: label should be 0 or 1, got '2'"):
        load_piqa(tmp_path)
    _write(tmp_path, [good, good], [0])
    with pytest.raises(KebenchError, match=r"1 labels for the 2 items"):
        load_piqa(tmp_path)


def test_chooses_the_lower_perplexity_solution(tiny_lm):
    tok = tiny_lm.tokenizer
    favourite = tok.convert_tokens_to_ids("a")

    def likes_a(batch):
        logits = torch.zeros(*batch.input_ids.shape, len(tok))
        logits[..., favourite] = 10.0
        return logits

    items = [PiqaItem("goal?", "aaaa", "zzzz", 0), PiqaItem("goal?", "zzzz", "aaaa", 1), PiqaItem("goal?", "zz", "aa", 0)]
    assert piqa_choices(likes_a, tok, tiny_lm.pad_token_id, tiny_lm.device, items) == [0, 1, 1]
    assert piqa_accuracy(likes_a, tok, tiny_lm.pad_token_id, tiny_lm.device, items) == pytest.approx(2 / 3)


def test_mean_normalisation_is_per_token(tiny_lm):
    tok = tiny_lm.tokenizer
    uniform = lambda batch: torch.zeros(*batch.input_ids.shape, len(tok))  # every token costs log V
    items = [PiqaItem("goal?", "aaaa", "aa", 0)]
    args = (uniform, tok, tiny_lm.pad_token_id, tiny_lm.device, items)
    assert piqa_choices(*args, normalization="mean") == [0]  # equal per-token NLL: a tie goes to sol1
    assert piqa_choices(*args, normalization="sum") == [1]  # the shorter solution has the smaller total
    with pytest.raises(KebenchError, match="normalization must be one of mean, sum"):
        piqa_choices(*args, normalization="max")


@pytest.mark.needs_data("piqa")
def test_batching_does_not_change_choices(tiny_lm):
    items = load_piqa(n=6)
    logits = plain_logits(tiny_lm)
    one = piqa_choices(logits, tiny_lm.tokenizer, tiny_lm.pad_token_id, tiny_lm.device, items, batch_size=1)
    many = piqa_choices(logits, tiny_lm.tokenizer, tiny_lm.pad_token_id, tiny_lm.device, items, batch_size=6)
    assert one == many
