"""FT-L / FT-M and AdaLoRA / LoRA on the tiny random model: objectives, constraints, rank allocation, restore."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import encode
from methods.hparams import load_hparams
from methods.ft import edit_loss
from kebench.core.errors import KebenchError
from orchestrator.scenarios import plain_logits
from helpers import TOY_CASES, changed_keys, make_editor, probe_logits, state_snapshot

CASES = TOY_CASES
_editor, _probe, _state = make_editor, probe_logits, state_snapshot


def _same_state(lm, state) -> bool:
    return not changed_keys(lm, state)


def test_ft_objectives_follow_their_definitions(tiny_lm):
    batch = encode(tiny_lm.tokenizer, [(c.prompt, c.target_new) for c in CASES], tiny_lm.pad_token_id)
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        prompt_last, target_new = edit_loss(tiny_lm, batch, "prompt_last"), edit_loss(tiny_lm, batch, "target_new")
    expected_last, expected_new = [], []
    for i in range(batch.size):
        p, n = int(batch.prompt_lengths[i]), int(batch.lengths[i])
        gold = batch.input_ids[i, p:n]
        # FT-L: every target token scored from the one distribution at the last prompt token.
        expected_last.append(-torch.log_softmax(logits[i, p - 1], -1)[gold].mean())
        # FT-M: teacher forcing, token t predicted from position t - 1.
        expected_new.append(F.cross_entropy(logits[i, p - 1 : n - 1], gold))
    torch.testing.assert_close(prompt_last, torch.stack(expected_last).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_new, torch.stack(expected_new).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_ft_trains_only_its_layer_and_restores_exactly(tiny_lm, method):
    state, probe = _state(tiny_lm), _probe(tiny_lm)
    batch = encode(tiny_lm.tokenizer, [(CASES[0].prompt, CASES[0].target_new)], tiny_lm.pad_token_id)
    objective = "prompt_last" if method == "ft-l" else "target_new"
    with torch.no_grad():
        before = float(edit_loss(tiny_lm, batch, objective))
    editor = _editor(tiny_lm, method)
    stats = editor.apply(CASES[:1])
    assert stats.loss < 0.5 * before
    changed = {k for k, v in tiny_lm.model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    assert editor.trainable_parameters() == 64 * 128
    if method == "ft-m":  # the teacher-forced objective is what reliability measures
        pre = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, torch.device("cpu"), CASES[:1])
        (score,) = score_cases(editor.logits, tiny_lm.tokenizer, 0, torch.device("cpu"), CASES[:1], pre)
        assert score.rel == 1.0
    editor.restore()
    assert _same_state(tiny_lm, state) and torch.equal(_probe(tiny_lm), probe)
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


@pytest.mark.parametrize("anchor", ["original", "edit"])
def test_norm_constraint_is_an_linf_box(tiny_lm, anchor):
    eps = 2e-3
    editor = _editor(tiny_lm, "ft-m", norm_constraint=eps, constraint_anchor=anchor, max_steps=4)
    original = tiny_lm.layers[1].mlp.down_proj.weight.detach().clone()
    editor.apply(CASES[:1])
    editor.apply(CASES[1:])  # a continual stream of two edits
    drift = float((tiny_lm.layers[1].mlp.down_proj.weight - original).abs().max())
    editor.restore()
    if anchor == "original":
        assert drift <= eps + 1e-7
    else:  # each edit stays within eps of the weights it started from
        assert eps + 1e-7 < drift <= 2 * eps + 1e-7


def test_adalora_reallocates_ranks_during_an_edit(tiny_lm):
    hp = load_hparams("adalora", "tiny-random-llama", "single")
    editor = _editor(tiny_lm, "adalora")
    editor.apply(CASES[:1])
    history = editor.rank_history
    assert len(history) == hp.max_steps
    modules = len(history[0])
    assert modules == 2 * tiny_lm.num_layers  # q_proj and v_proj of both layers
    assert all(rank == hp.init_r for rank in history[hp.tinit - 1].values())  # warm-up: full rank everywhere
    final = history[-1]
    assert sum(final.values()) == hp.target_r * modules  # the budget reached its target ...
    assert len(set(final.values())) > 1  # ... by giving modules different ranks
    assert history[hp.max_steps - hp.tfinal] == final  # and the allocation stays fixed in the final phase
    editor.restore()


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_peft_unload_gives_back_the_exact_model(tiny_lm, method):
    state, probe = _state(tiny_lm), _probe(tiny_lm)
    modules = [type(m).__name__ for m in tiny_lm.model.modules()]
    editor = _editor(tiny_lm, method, lora_dropout=0.1, max_steps=8)
    stats = editor.apply(CASES)
    assert editor.trainable_parameters() > 0 and stats.steps == 8
    assert not torch.equal(_probe(tiny_lm), probe)  # the adapters are live in the plain forward
    editor.restore()
    assert _same_state(tiny_lm, state) and torch.equal(_probe(tiny_lm), probe)
    assert [type(m).__name__ for m in tiny_lm.model.modules()] == modules
    assert not hasattr(tiny_lm.model, "peft_config") and not tiny_lm.model.training
    # Same seed, same numbers (adapter init and dropout draw from the seed).
    again = _editor(tiny_lm, method, lora_dropout=0.1, max_steps=8)
    assert again.apply(CASES).loss == stats.loss
    again.restore()


def test_bad_schedules_are_rejected():
    with pytest.raises(KebenchError, match="tinit"):
        load_hparams("adalora", "tiny-random-llama", overrides={"tinit": 8, "tfinal": 4, "max_steps": 12})
    with pytest.raises(KebenchError, match="objective"):
        load_hparams("ft-l", "tiny-random-llama", overrides={"objective": "whole_sentence"})
