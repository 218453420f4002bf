"""BaFT and ReFT on the tiny random model: the paper's equations, training, restore and determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import encode
from methods._representation import BasisIntervention
from methods.base import get_method, load_hparams
from orchestrator.scenarios import PROBE_TEXTS, plain_logits

CASES = (
    EditCase("t0", "The capital of Atlantis is", "Poseidonia", locality={"nq": (PromptAnswer("Grass is", "green"),)},
             rephrase=("Atlantis has its capital in",), irrelevant=(PromptAnswer("The sky is", "blue"),)),
    EditCase("t1", "The inventor of the zorb is", "Quill", locality={"nq": (PromptAnswer("Snow is", "white"),)},
             rephrase=("Who invented the zorb?",), irrelevant=(PromptAnswer("Fire is", "hot"),)),
)


def _editor(lm, method: str, **overrides):
    hp = load_hparams(method, "tiny-random-llama", "single", overrides)
    return get_method(method)(lm, hp, seed=0)


def _probe(lm):
    batch = encode(lm.tokenizer, [(t, "X") for t in PROBE_TEXTS], lm.pad_token_id)
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_phi_matches_equation_3_and_reduces_to_reft():
    torch.manual_seed(0)
    gated = BasisIntervention(16, 4, gated=True)
    h = torch.randn(3, 16)
    with torch.no_grad():
        gated.gate.weight.normal_()
        gated.gate.bias.normal_()
    out, w = gated(h)
    R, A, b = gated.rotation.weight, gated.source.weight, gated.source.bias
    expected = h + ((torch.sigmoid(h @ gated.gate.weight.T + gated.gate.bias)) * (h @ A.T + b - h @ R.T)) @ R
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)
    # W ≡ I: a saturated gate gives ReFT's update with the same R, A, b.
    ungated = BasisIntervention(16, 4, gated=False)
    ungated.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(60.0)
    torch.testing.assert_close(gated(h)[0], ungated(h)[0])
    assert torch.equal(ungated(h)[1], torch.ones(3, 4))


def test_rotation_stays_orthonormal_after_training(tiny_lm):
    editor = _editor(tiny_lm, "baft", max_steps=10)
    editor.apply(CASES[:1])
    for module in editor.interventions.values():
        R = module.rotation.weight
        torch.testing.assert_close(R @ R.T, torch.eye(R.shape[0]), atol=1e-5, rtol=0)
    editor.restore()


def test_parameter_counts(tiny_lm):
    d, r, layers = 64, 4, 2
    reft, baft = _editor(tiny_lm, "reft"), _editor(tiny_lm, "baft")
    assert reft.trainable_parameters() == layers * r * (2 * d + 1)  # R, A, b
    assert baft.trainable_parameters() == layers * r * (3 * d + 2)  # + one logistic regression per basis
    reft.restore()
    baft.restore()


@pytest.mark.parametrize("method", ["baft", "reft"])
def test_edit_raises_reliability_and_restore_is_exact(tiny_lm, method):
    before_probe = _probe(tiny_lm)
    device = torch.device("cpu")
    pre = compute_pre_edit(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, device, CASES)
    unedited = score_cases(plain_logits(tiny_lm), tiny_lm.tokenizer, 0, device, CASES, pre)
    for case, before in zip(CASES, unedited):
        editor = _editor(tiny_lm, method)
        editor.apply([case])
        after = score_cases(editor.logits, tiny_lm.tokenizer, 0, device, [case], pre)[0]
        editor.restore()
        assert before.rel < 0.2 and after.rel >= before.rel + 0.4, (case.case_id, before.rel, after.rel)
        assert torch.equal(_probe(tiny_lm), before_probe)
    continual = _editor(tiny_lm, method, max_steps=5)  # the same intervention keeps training
    for case in CASES:
        continual.apply([case])
    continual.restore()
    assert torch.equal(_probe(tiny_lm), before_probe)


@pytest.mark.parametrize("method", ["baft", "reft"])
def test_split_forward_matches_the_naive_forward(tiny_lm, method):
    results = {}
    for fast in (True, False):
        editor = _editor(tiny_lm, method, fast_forward=fast, max_steps=3, lr=1e-3)
        stats = editor.apply(CASES)
        batch = encode(tiny_lm.tokenizer, [(c.prompt, c.target_new) for c in CASES], 0)
        with torch.no_grad():
            results[fast] = (stats, editor.logits(batch))
        editor.restore()
    assert results[True][0].steps == results[False][0].steps
    assert results[True][0].loss == pytest.approx(results[False][0].loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-4, rtol=1e-4)


def test_same_seed_same_numbers(tiny_lm):
    runs = []
    for _ in range(2):
        editor = _editor(tiny_lm, "baft", max_steps=8)
        stats = editor.apply(CASES)
        runs.append((stats, [p.detach().clone() for p in editor.interventions.parameters()]))
        editor.restore()
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_load_balancing_formula(tiny_lm):
    editor = _editor(tiny_lm, "baft")
    layer = editor.layer_ids[0]
    editor.weight_sums[layer] = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    editor.weight_count = 4
    current = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    value = editor._balance(current, layer)
    means = torch.tensor([2.5, 2.5, 4.5, 2.5]) / 6  # (past sums + current sums) / (4 + 2)
    overall = means.mean()
    expected = ((means - overall) ** 2).sum() / (3 * overall)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    value.backward()
    assert current.grad is not None  # only the current edit's weights take a gradient
    editor.restore()


def test_locality_margin_terms(tiny_lm):
    editor = _editor(tiny_lm, "baft", alpha=0.1, beta=0.5, gamma=0.3)
    edit = torch.tensor([[0.6, 0.2], [0.4, 0.9]])
    irrelevant = torch.tensor([[0.3, 0.05]])
    value = editor._locality(edit, irrelevant)
    low = (0.2 + 0.0) / 2  # relu(w_ir - alpha)
    high = (0.0 + 0.3 + 0.1 + 0.0) / 4  # relu(beta - w_edit)
    gap = max(0.0, 0.3 - ((0.6 + 0.9) / 2 - 0.3))
    assert float(value) == pytest.approx(low + high + gap, rel=1e-6)
    editor.restore()


def test_running_means_accumulate_across_edits(tiny_lm):
    editor = _editor(tiny_lm, "baft", max_steps=3)
    editor.apply(CASES[:1])
    first = editor.weight_count
    editor.apply(CASES[1:])
    assert first > 0 and editor.weight_count > first
    means = editor.basis_weight_means()
    assert set(means) == set(editor.layer_ids) and all(0.0 < v < 1.0 for row in means.values() for v in row)
    editor.restore()


def test_locality_regularizer_uses_irrelevant_texts(tiny_lm):
    editor = _editor(tiny_lm, "baft")
    assert editor.irrelevant_pairs(CASES) == [("The sky is", "blue"), ("Fire is", "hot")]
    editor.restore()
    off = _editor(tiny_lm, "baft", locality_reg=False)
    assert off.irrelevant_pairs(CASES) == []
    off.restore()
    assert _editor(tiny_lm, "reft").irrelevant_pairs(CASES) == []


def test_bad_layer_is_a_clear_error(tiny_lm):
    from kebench.core.errors import KebenchError

    with pytest.raises(KebenchError, match="layer 5 out of range"):
        _editor(tiny_lm, "baft", layers=[5])
    hp = load_hparams("baft", "tiny-random-llama")
    assert dataclasses.replace(hp, rank=3).rank == 3
