"""The teacher-forced metrics, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import answer_predictions, encode, keyed_mean, token_accuracy
from kebench.core.models import byte_tokenizer


def test_encode_splits_prompt_and_answer_at_the_join():
    tok = byte_tokenizer()
    batch = encode(tok, [("ab", "cd"), ("wxyz", "q")], pad_token_id=0)
    # "ab cd" -> a b Ġ c d ; "wxyz q" -> w x y z Ġ q
    assert batch.prompt_lengths.tolist() == [2, 4]
    assert batch.lengths.tolist() == [5, 6]
    assert batch.input_ids.shape == (2, 6)
    assert batch.input_ids[0, 5].item() == 0 and batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    answer = batch.answer_mask()
    assert answer[0].tolist() == [False, False, True, True, True, False]
    assert answer[1].tolist() == [False, False, False, False, True, True]


def test_intervention_mask_is_last_prompt_tokens_plus_answer():
    tok = byte_tokenizer()
    batch = encode(tok, [("abcdef", "gh")], pad_token_id=0)
    mask = batch.intervention_mask(3)[0].tolist()
    # prompt a..f (6 tokens), answer Ġ g h: positions 3,4,5 and 6,7,8
    assert mask == [False, False, False, True, True, True, True, True, True]
    short = encode(tok, [("ab", "c")], pad_token_id=0).intervention_mask(3)[0].tolist()
    assert short == [True, True, True, True]


def test_token_accuracy_and_the_knowedit_locality_example():
    assert token_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])) == pytest.approx(2 / 3)
    # examples/KnowEdit.md: pre [29,234,334] vs post [29,234,333] scores 66.67
    assert round(token_accuracy(torch.tensor([29, 234, 333]), torch.tensor([29, 234, 334])) * 100, 2) == 66.67


def test_answer_predictions_read_the_logits_one_step_earlier():
    tok = byte_tokenizer()
    batch = encode(tok, [("ab", "cd")], pad_token_id=0)  # tokens a b Ġ c d, answer at 2..4
    vocab = len(tok)
    logits = torch.zeros(1, 5, vocab)
    for position, token in enumerate([7, 8, 9, 10, 11]):
        logits[0, position, token] = 1.0
    # answer tokens 2,3,4 are predicted at positions 1,2,3
    assert answer_predictions(logits, batch)[0].tolist() == [8, 9, 10]


def test_keyed_mean_averages_within_then_across_keys():
    assert keyed_mean({"a": [1.0, 0.0], "b": [1.0]}) == 0.75
    assert keyed_mean({"a": []}) is None


def _teacher(batch):
    """A model that always predicts the gold next token."""
    vocab = 300
    logits = torch.zeros(*batch.input_ids.shape, vocab)
    nxt = torch.roll(batch.input_ids, shifts=-1, dims=1)
    logits.scatter_(2, nxt[..., None], 1.0)
    return logits


def _constant(batch):
    logits = torch.zeros(*batch.input_ids.shape, 300)
    logits[..., 5] = 1.0
    return logits


def test_score_cases_with_known_models():
    tok = byte_tokenizer()
    case = EditCase(
        case_id="c0",
        prompt="Who?",
        target_new="Bob",
        rephrase=("Which person?",),
        locality={"k1": (PromptAnswer("x", "yy"),), "k2": (PromptAnswer("p", "q"), PromptAnswer("r", "s"))},
        portability={"hop": (PromptAnswer("Bob's dog?", "Rex"),)},
    )
    pre = compute_pre_edit(_teacher, tok, 0, torch.device("cpu"), [case])
    perfect = score_cases(_teacher, tok, 0, torch.device("cpu"), [case], pre)[0]
    assert (perfect.rel, perfect.gen, perfect.loc, perfect.por) == (1.0, 1.0, 1.0, 1.0)
    wrong = score_cases(_constant, tok, 0, torch.device("cpu"), [case], pre)[0]
    assert (wrong.rel, wrong.gen, wrong.loc, wrong.por) == (0.0, 0.0, 0.0, 0.0)
    only_rel = score_cases(_teacher, tok, 0, torch.device("cpu"), [case], pre, metrics=("rel",))[0]
    assert only_rel.gen is None and only_rel.loc is None and only_rel.por is None


def test_right_padding_does_not_change_a_rows_predictions(tiny_lm):
    tok = tiny_lm.tokenizer
    short, long = ("The capital of France is", "Paris"), ("A much longer prompt about something else entirely", "yes indeed")
    model = tiny_lm.model
    with torch.no_grad():
        alone = encode(tok, [short], 0)
        together = encode(tok, [short, long], 0)
        assert together.input_ids.shape[1] > alone.input_ids.shape[1]
        logits_alone = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits
        logits_together = model(input_ids=together.input_ids, attention_mask=together.attention_mask).logits
    n = int(alone.lengths[0])
    torch.testing.assert_close(logits_together[0, :n], logits_alone[0, :n], atol=1e-5, rtol=1e-5)
    assert answer_predictions(logits_alone, alone)[0].tolist() == answer_predictions(logits_together, together)[0].tolist()
