"""GRACE, MELO and the generation protocol: codebook rules, routing, training, protocol tags, restore."""

from __future__ import annotations

import pytest
import torch

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.protocols import cell_protocols
from benchmarks.generation import PROTOCOL_GENERATION, generate, greedy_continuations
from benchmarks.metrics import PROTOCOL_TEACHER_FORCED, encode
from methods.hparams import load_hparams
from methods.grace import Codebook
from methods.melo import NO_BLOCK, VectorDatabase
from orchestrator.scenarios import Scenario, plain_logits, run_scenario
from helpers import TOY_CASES, make_editor, plain_forward, probe_logits

CPU = torch.device("cpu")
CASES = TOY_CASES
UNRELATED = ("Grass is", "green")
_editor, _plain, _probe = make_editor, plain_forward, probe_logits


# --------------------------------------------------------------------------- generation protocol

def _teacher(batch):
    """Predicts the next token of the row it is given (perfect under teacher forcing)."""
    logits = torch.zeros(*batch.input_ids.shape, 300)
    logits.scatter_(2, torch.roll(batch.input_ids, shifts=-1, dims=1)[..., None], 1.0)
    return logits


def test_generation_never_sees_the_answer(tiny_lm):
    tok = tiny_lm.tokenizer
    case = EditCase("c0", "Who?", "Bob", locality={"nq": (PromptAnswer("Where?", "Rome"),)})
    pre = compute_pre_edit(_teacher, tok, 0, CPU, [case], protocols=(PROTOCOL_TEACHER_FORCED, PROTOCOL_GENERATION))
    forced = score_cases(_teacher, tok, 0, CPU, [case], pre, ("rel", "loc"))[0]
    generated = score_cases(_teacher, tok, 0, CPU, [case], pre, ("rel", "loc"), protocol=PROTOCOL_GENERATION)[0]
    assert forced.rel == 1.0 and forced.protocol == PROTOCOL_TEACHER_FORCED
    assert generated.rel < 1.0 and generated.protocol == PROTOCOL_GENERATION  # only the prompt is given
    assert generated.loc == 1.0  # same model before and after: generations agree


def test_generation_is_greedy_and_padding_free(tiny_lm):
    logits_fn = plain_logits(tiny_lm)
    pairs = [("The capital of Atlantis is", "Poseidonia"), ("Snow is", "white")]
    generated, golds = generate(logits_fn, tiny_lm.tokenizer, pairs, 0, CPU)
    assert [len(g) for g in generated] == [len(g) for g in golds] == [11, 6]  # k = answer tokens
    for (prompt, answer), tokens in zip(pairs, generated):  # batched rows = each row alone, step by step
        batch = encode(tiny_lm.tokenizer, [(prompt, answer)], 0)
        ids = batch.input_ids[0, : int(batch.prompt_lengths[0])].tolist()
        for token in tokens.tolist():
            with torch.no_grad():
                assert int(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)
    alone = greedy_continuations(logits_fn, [[1, 70, 71]], [4], 0, CPU)[0]
    padded = greedy_continuations(logits_fn, [[1, 70, 71], [1, 72, 73, 74, 75, 76]], [4, 2], 0, CPU)[0]
    assert torch.equal(alone, padded)


# --------------------------------------------------------------------------- GRACE

def test_codebook_add_expand_split():
    book = Codebook(init_eps=1.0, expand="coverage")
    origin = torch.zeros(4)
    value = torch.ones(3)
    assert book.update(origin, (1,), value) == 0 and book.epsilons == [1.0]
    assert book.update(origin + torch.tensor([0.5, 0, 0, 0]), (1,), value) == 0  # inside ε, same label
    assert len(book) == 1 and book.epsilons == [1.0]
    assert book.update(origin + torch.tensor([1.5, 0, 0, 0]), (1,), value) == 0  # within ε_init + ε: expand
    assert len(book) == 1 and book.epsilons == [1.5]
    chosen = book.update(origin + torch.tensor([0, 1.2, 0, 0]), (2,), value)  # another label: add and split
    assert chosen == 1 and book.epsilons == pytest.approx([0.6 - 1e-5, 0.6])
    assert book.update(origin + torch.tensor([0, 0, 9.0, 0]), (2,), value) == 2  # far away: a new key
    assert book.epsilons[2] == 1.0
    hits, values = book.lookup(torch.stack([origin + 0.1, origin + torch.tensor([0, 0, 0, 5.0])]))
    assert hits.tolist() == [True, False]


def test_grace_routes_edited_inputs_only_and_restores(tiny_lm):
    before = _probe(tiny_lm)
    edited = ("The capital of Atlantis is", "Poseidonia")
    batch, unedited = _plain(tiny_lm, [UNRELATED, edited])
    pre = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, CPU, CASES[:1])
    rel_before = score_cases(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, CPU, CASES[:1], pre, ("rel",))[0].rel
    editor = _editor(tiny_lm, "grace")
    editor.apply(CASES[:1])
    with torch.no_grad():
        logits = editor.logits(batch)
    assert editor.adapter.last_hits.tolist() == [False, True]
    assert torch.equal(logits[0], unedited[0])  # the unrelated row takes the original path, bit for bit
    assert not torch.equal(logits[1], unedited[1])
    # The replaced value sits at the last prompt position, which predicts the first answer token; on this
    # 2-layer random model later answer tokens barely read it (SmolLM2 learns them all: integration test).
    first_answer = batch.input_ids[1, int(batch.prompt_lengths[1])]
    assert int(unedited[1, int(batch.prompt_lengths[1]) - 1].argmax()) != first_answer
    assert int(logits[1, int(batch.prompt_lengths[1]) - 1].argmax()) == first_answer
    rel_after = score_cases(editor.logits, tiny_lm.tokenizer, 0, CPU, CASES[:1], pre, ("rel",))[0].rel
    assert rel_after > rel_before, (rel_before, rel_after)
    assert editor.trainable_parameters() == 64  # one value of d_out = 64
    editor.restore()
    assert torch.equal(_probe(tiny_lm), before)


@pytest.mark.parametrize("method", ["grace", "melo"])
def test_split_forward_matches_the_naive_forward(tiny_lm, method):
    results = {}
    for fast in (True, False):
        editor = _editor(tiny_lm, method, fast_forward=fast, **({"n_iter": 5} if method == "grace" else {"num_iter": 5}))
        stats = editor.apply(CASES)
        batch = encode(tiny_lm.tokenizer, [(c.prompt, c.target_new) for c in CASES], 0)
        with torch.no_grad():
            results[fast] = (stats, editor.logits(batch))
        editor.restore()
    assert results[True][0].loss == pytest.approx(results[False][0].loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-4, rtol=1e-4)


def test_grace_reports_both_protocols_tagged(tiny_lm):
    hp = load_hparams("grace", "tiny-random-llama", "continual", {"n_iter": 5})
    result = run_scenario(tiny_lm, "grace", hp, CASES, Scenario("continual", T=2), seed=0)  # checks restore
    tags = [(c.case_id, c.scores.protocol) for c in result.cases]
    assert tags == [("t0", "teacher_forced"), ("t1", "teacher_forced"), ("t0", "generation"), ("t1", "generation")]
    assert result.trainable_parameters == 2 * 64  # two keys, far apart
    # The grid runner hands over a cached teacher-forced PreEdit: the generation references are topped up.
    cached = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, CPU, CASES)
    assert set(cached.references) == {PROTOCOL_TEACHER_FORCED}
    again = run_scenario(tiny_lm, "grace", hp, CASES, Scenario("continual", T=2), seed=0, pre=cached)
    assert [c.scores for c in again.cases] == [c.scores for c in result.cases]


# --------------------------------------------------------------------------- MELO

def test_vector_database_add_expand_split():
    db = VectorDatabase(init_radius=1.0)
    origin = torch.zeros(3)
    assert db.insert(origin, (1,), block=0) == "add"
    assert db.insert(origin + torch.tensor([2.0, 0, 0]), (1,), block=1) == "expand"  # 2 <= r + r_init
    cluster = db.clusters[0]
    assert torch.equal(cluster.centre, torch.tensor([1.0, 0, 0])) and cluster.radius == 1.0 and cluster.blocks == [0, 1]
    assert db.route(torch.stack([origin, origin + torch.tensor([1.9, 0, 0]), origin + 5])).tolist() == [0, 1, NO_BLOCK]
    assert db.insert(torch.tensor([1.0, 1.5, 0]), (2,), block=2) == "split"  # d = 1.5 to the centre
    assert cluster.radius == pytest.approx(0.75 - 1e-5) and db.clusters[1].radius == pytest.approx(0.75 + 1e-5)
    assert cluster.blocks == [NO_BLOCK] and db.forgotten == 2  # both points lay 1.0 from the centre


def test_melo_trains_only_the_routed_block_and_routes(tiny_lm):
    before = _probe(tiny_lm)
    batch, unedited = _plain(tiny_lm, [UNRELATED, (CASES[0].prompt, CASES[0].target_new)])
    editor = _editor(tiny_lm, "melo")
    (adapter,) = editor.lora
    initial_a = adapter.lora_a.clone()
    editor.apply(CASES[:1])
    assert not torch.equal(adapter.lora_b[0], torch.zeros_like(adapter.lora_b[0]))
    assert torch.equal(adapter.lora_b[1:], torch.zeros_like(adapter.lora_b[1:]))  # other blocks untouched
    assert torch.equal(adapter.lora_a[1:], initial_a[1:])
    with torch.no_grad():
        logits = editor.logits(batch)
    assert torch.equal(logits[0], unedited[0]) and not torch.equal(logits[1], unedited[1])
    pre = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, CPU, CASES)
    assert score_cases(editor.logits, tiny_lm.tokenizer, 0, CPU, CASES[:1], pre, ("rel",))[0].rel >= 0.9
    editor.apply(CASES[1:])  # the next edit gets the next block
    assert not torch.equal(adapter.lora_b[1], torch.zeros_like(adapter.lora_b[1]))
    assert editor.trainable_parameters() == 16 * 2 * (64 + 128)  # the whole bank: blocks x rank x (d_in + d_out)
    editor.restore()
    assert torch.equal(_probe(tiny_lm), before)


@pytest.mark.integration
def test_grace_and_melo_route_on_smollm2(smol_lm):
    """Routing on the real model; the full 100/50-step numbers are in the README (few steps here, for time)."""
    from benchmarks.registry import select_cases

    case = select_cases("zsre", "test", n=1).cases[0]
    loc = case.locality["nq"][0]
    protocols = (PROTOCOL_TEACHER_FORCED, PROTOCOL_GENERATION)
    pre = compute_pre_edit(plain_logits(smol_lm), smol_lm.tokenizer, smol_lm.pad_token_id, CPU, [case], protocols=protocols)
    unedited_rel = score_cases(plain_logits(smol_lm), smol_lm.tokenizer, smol_lm.pad_token_id, CPU, [case], pre,
                               ("rel",))[0].rel
    batch, unedited = _plain(smol_lm, [(loc.prompt, loc.answer), (case.prompt, case.target_new)])
    before = _probe(smol_lm)
    for method, steps in (("grace", {"n_iter": 25}), ("melo", {"num_iter": 15})):
        editor = _editor(smol_lm, method, **steps)
        editor.apply([case])
        with torch.no_grad():
            logits = editor.logits(batch)
        assert torch.equal(logits[0], unedited[0]) and not torch.equal(logits[1], unedited[1]), method
        for protocol in cell_protocols(None, editor.required_protocols):
            scores = score_cases(editor.logits, smol_lm.tokenizer, smol_lm.pad_token_id, CPU, [case], pre,
                                 ("rel", "loc"), protocol=protocol)[0]
            assert scores.loc == 1.0, (method, protocol, scores)
            if protocol == PROTOCOL_TEACHER_FORCED:
                assert scores.rel > unedited_rel, (method, unedited_rel, scores)
        editor.restore()
        assert torch.equal(_probe(smol_lm), before)
