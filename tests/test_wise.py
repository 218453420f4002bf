"""WISE and WISE-light: TIES merging, the margin loss, shard masks and the 1/8 pool, routing, save/merge, restore."""

from __future__ import annotations

import pytest
import torch

from benchmarks.case import EditCase
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import encode
from methods.hparams import load_hparams
from methods.wise import ORIGINAL, SIDE, ties_merge
from kebench.core.errors import KebenchError
from orchestrator.scenarios import Scenario, plain_logits, run_scenario
from helpers import TOY_CASES, make_editor, plain_forward, probe_logits

CPU = torch.device("cpu")
CASES = TOY_CASES
# The plain "{}" template only: the scored row is then exactly the trained row (faster, too).
PLAIN = {"context_lengths": ()}


def _editor(lm, method: str = "wise", **overrides):
    return make_editor(lm, method, **{**PLAIN, **overrides})


_plain, _probe = plain_forward, probe_logits


def test_ties_merge_by_hand():
    base = torch.zeros(4)
    first, second = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -0.2, -4.0])
    # density 0.5 keeps [3, 0, 0, 2] and [0, 2, 0, -4]; weights 0.5 each; elected signs +, +, +, -;
    # agreeing entries averaged with their weights.
    merged = ties_merge(base, [first, second], [0.5, 0.5], density=0.5)
    assert merged.tolist() == [3.0, 2.0, 0.0, -4.0]
    assert torch.equal(ties_merge(base + 1, [first + 1], [1.0], density=1.0), first + 1)  # one shard, dense: itself


def test_margin_loss_terms(tiny_lm):
    editor = _editor(tiny_lm, alpha=1.0, beta=4.0, gamma=2.0)
    inside, outside = torch.tensor([3.0, 5.0]), torch.tensor([2.0])
    # [Δout − Δin + γ]+ = [1, −1] -> 1; [Δout − α]+ = 1; [β − Δin]+ = [1, −1] -> 1
    assert float(editor._margin(inside, outside)) == pytest.approx(3.0)
    assert float(editor._margin(torch.tensor([9.0]), torch.tensor([0.5]))) == 0.0
    editor.restore()


def test_wise_routes_edited_inputs_only_and_restores(tiny_lm):
    before = _probe(tiny_lm)
    batch, unedited = _plain(tiny_lm, [("Grass is", "green"), (CASES[0].prompt, CASES[0].target_new)])
    pre = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, CPU, CASES[:1])
    editor = _editor(tiny_lm)
    with torch.no_grad():
        assert torch.equal(editor.logits(batch), unedited)  # nothing edited yet: every row is original
    editor.apply(CASES[:1])
    assert editor.adapter.min_act.minimum > 0
    with torch.no_grad():
        logits = editor.logits(batch)
    assert editor.adapter.last_route.tolist() == [ORIGINAL, SIDE]
    assert torch.equal(logits[0], unedited[0]) and not torch.equal(logits[1], unedited[1])
    assert score_cases(editor.logits, tiny_lm.tokenizer, 0, CPU, CASES[:1], pre, ("rel",))[0].rel >= 0.5
    editor.restore()
    assert torch.equal(_probe(tiny_lm), before)


def test_updates_stay_in_the_shard_mask_and_the_norm_ball(tiny_lm):
    editor = _editor(tiny_lm, n_iter=10)
    weight = editor._original.weight.detach().float()
    editor.apply(CASES[:1])
    changed = editor.adapter.side != weight
    assert changed.any() and not (changed & ~editor.shard_mask).any()  # weight decay included
    assert float((editor.adapter.side - weight).abs().max()) <= 1.0 + 1e-6  # norm_constraint
    assert editor.trainable_parameters() == weight.numel()
    editor.restore()


def test_wise_light_pool_is_one_eighth_and_bounds_every_update(tiny_lm):
    full = _editor(tiny_lm, "wise", n_iter=5)
    full_count = full.trainable_parameters()
    full.restore()
    light = _editor(tiny_lm, "wise-light", n_iter=5)
    numel = light._original.weight.numel()
    assert full_count == numel and light.trainable_parameters() == round(numel / 8)
    weight = light._original.weight.detach().float()
    for case in CASES:  # two shards' masks, both inside the pool
        light.apply([case])
    changed = light.adapter.side != weight
    assert changed.any() and not (changed & ~light.pool).any()
    light.restore()


def test_retrieve_saves_and_ties_merges_shards(tiny_lm):
    editor = _editor(tiny_lm, save_freq=1, merge_freq=2, retrieve=True)
    weight = editor._original.weight.detach().float()
    editor.apply(CASES[:1])
    assert len(editor.adapter.memory) == 1 and torch.equal(editor.adapter.side, weight)  # saved, W′ restarted
    shards = []
    merge = editor._merge
    editor._merge = lambda: (shards.extend(m.clone() for m in editor.adapter.memory), merge())
    editor.apply(CASES[1:])
    assert len(shards) == 2 and len(editor.adapter.memory) == 1 and editor.merges == 1
    expected = ties_merge(weight, shards, [0.5, 0.5], editor.hparams.densities)
    assert torch.equal(editor.adapter.memory[0], expected)
    # The margin trained "The sky is blue" to stay quiet (on this random model other texts are not
    # reliably separated from a merged shard; SmolLM2's numbers show they are there).
    batch, unedited = _plain(tiny_lm, [("The sky is", "blue")] + [(c.prompt, c.target_new) for c in CASES])
    with torch.no_grad():
        logits = editor.logits(batch)
    assert editor.adapter.last_route.tolist() == [ORIGINAL, 1, 1]  # edited rows: the merged memory shard
    assert torch.equal(logits[0], unedited[0])
    editor.restore()


def test_merge_variant_merges_leftover_edits_before_evaluation(tiny_lm):
    editor = _editor(tiny_lm, save_freq=1, merge_freq=2, retrieve=False)
    weight = editor._original.weight.detach().float()
    editor.apply(CASES[:1])
    shard = editor.adapter.memory[0].clone()
    assert editor.adapter.merged is None  # saved, not merged yet (merge_freq 2)
    batch, unedited = _plain(tiny_lm, [("Grass is", "green"), (CASES[0].prompt, CASES[0].target_new)])
    with torch.no_grad():
        logits = editor.logits(batch)  # EasyEdit's final merge happens here
    assert torch.equal(editor.adapter.merged, ties_merge(weight, [shard], [1.0], editor.hparams.densities))
    assert editor.adapter.memory == [] and editor.merges == 1
    assert torch.equal(logits[0], unedited[0]) and editor.adapter.last_route[0] == ORIGINAL
    editor.restore()


def test_cases_need_unrelated_training_texts(tiny_lm):
    editor = _editor(tiny_lm)
    with pytest.raises(KebenchError, match="no unrelated training text"):
        editor.apply([EditCase("x", "A prompt", "an answer")])
    editor.restore()


@pytest.mark.parametrize("method", ["wise", "wise-light"])
def test_split_forward_matches_the_naive_forward(tiny_lm, method):
    results = {}
    for fast in (True, False):
        editor = _editor(tiny_lm, method, fast_forward=fast, n_iter=4, context_lengths=(2,))
        stats = editor.apply(CASES)
        batch = encode(tiny_lm.tokenizer, [(c.prompt, c.target_new) for c in CASES], 0)
        with torch.no_grad():
            results[fast] = (stats, editor.logits(batch), editor.adapter.side.clone())
        editor.restore()
    assert results[True][0].loss == pytest.approx(results[False][0].loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(results[True][2], results[False][2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-4, rtol=1e-4)


def test_continual_run_restores_exactly(tiny_lm):
    hp = load_hparams("wise-light", "tiny-random-llama", "continual", {**PLAIN, "n_iter": 5, "save_freq": 1, "merge_freq": 2})
    result = run_scenario(tiny_lm, "wise-light", hp, CASES, Scenario("continual", T=2), seed=0)  # raises if not exact
    assert [c.scores.protocol for c in result.cases] == ["teacher_forced"] * 2
    assert result.trainable_parameters == round(64 * 128 / 8)


@pytest.mark.integration
def test_wise_light_routes_on_smollm2(smol_lm):
    """Routing on the real model (plain template, 20 steps, for time; the full numbers are in the README)."""
    from benchmarks.registry import select_cases

    case = select_cases("zsre", "test", n=1).cases[0]
    loc = case.locality["nq"][0]
    before = _probe(smol_lm)
    batch, unedited = _plain(smol_lm, [(loc.prompt, loc.answer), (case.prompt, case.target_new)])
    editor = _editor(smol_lm, "wise-light", n_iter=20)
    editor.apply([case])
    with torch.no_grad():
        logits = editor.logits(batch)
    assert editor.adapter.last_route.tolist() == [ORIGINAL, SIDE]
    assert torch.equal(logits[0], unedited[0]) and not torch.equal(logits[1], unedited[1])
    assert editor.trainable_parameters() == 1536 * 576 // 8
    editor.restore()
    assert torch.equal(_probe(smol_lm), before)
