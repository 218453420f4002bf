"""BaFT and ReFT on the tiny random model: the paper's equations, training, restore and determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.case import EditCase, PromptAnswer
from benchmarks.evaluate import compute_pre_edit, score_cases
from benchmarks.metrics import encode
from methods._representation import BasisIntervention
from methods.base import get_method
from methods.hparams import load_hparams
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
    editor = _editor(tiny_lm, "baft", balance_form="printed")
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


# ---------------------------------------------------------------- issue 12: BaFT as the paper means it


def test_baft_and_reft_built_with_one_seed_share_the_subspace(tiny_lm):
    for seed in (0, 7):
        hp_b = load_hparams("baft", "tiny-random-llama", "single")
        hp_r = load_hparams("reft", "tiny-random-llama", "single")
        baft, reft = get_method("baft")(tiny_lm, hp_b, seed=seed), get_method("reft")(tiny_lm, hp_r, seed=seed)
        assert len(baft.layer_ids) >= 2  # the gates of the first layer must not shift the second layer's draw
        for layer in baft.layer_ids:
            b, r = baft.interventions[str(layer)], reft.interventions[str(layer)]
            assert torch.equal(b.rotation.weight, r.rotation.weight), (seed, layer)
            assert torch.equal(b.source.weight, r.source.weight), (seed, layer)
            assert torch.equal(b.source.bias, r.source.bias), (seed, layer)
            assert torch.equal(b.gate.weight, torch.zeros_like(b.gate.weight))
        baft.restore()
        reft.restore()
    other = _editor(tiny_lm, "reft")  # a different seed gives a different subspace (the test can fail)
    moved = get_method("reft")(tiny_lm, load_hparams("reft", "tiny-random-llama"), seed=1)
    assert not torch.equal(other.interventions["0"].rotation.weight, moved.interventions["0"].rotation.weight)
    other.restore()
    moved.restore()


def _balance_gradient(editor, layer, eps: float, first_step: bool) -> float:
    """‖∂(balanced loss)/∂w‖ for weights 0.5 + eps·v: R_bal → 0 as eps → 0 (a quadratic in eps)."""
    v = torch.tensor([[1.0, -1.0, 0.5, -0.5], [0.5, -0.5, 1.0, -1.0]])
    current = (0.5 + eps * v).requires_grad_(True)
    ce = torch.tensor(2.0)
    loss = editor.combine_loss(ce, {"balance": editor._balance(current, layer)}, first_step=first_step)
    (grad,) = torch.autograd.grad(loss, current)
    return float(grad.norm())


def test_regularizer_gradient_stays_bounded_as_the_term_vanishes(tiny_lm):
    default = load_hparams("baft", "tiny-random-llama")
    epsilons = [0.3, 0.1, 0.03, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6]
    editor = _editor(tiny_lm, "baft")  # the default balancing, with its floor
    layer = editor.layer_ids[0]
    plain = _editor(tiny_lm, "baft", balancing="fixed", lambda_bal=1.0)  # ‖∇R_bal‖ itself
    raw = [_balance_gradient(plain, layer, eps, first_step=True) for eps in epsilons]
    if default.balancing == "frozen_at_start":  # scales set at the first step of the call, then held
        grads = [_balance_gradient(editor, layer, epsilons[0], first_step=True)]
        grads += [_balance_gradient(editor, layer, eps, first_step=False) for eps in epsilons[1:]]
    else:
        grads = [_balance_gradient(editor, layer, eps, first_step=True) for eps in epsilons]
    bound = 2.0 * max(1.0, 1.0 / default.scale_floor) * max(raw)  # CE = 2: ‖grad‖ <= CE/floor · ‖∇R_bal‖
    assert max(grads) <= bound * 1.0001, (default.balancing, grads, bound)
    assert grads[-1] < 1e-3 * max(grads)  # and it vanishes with the term, as ∇R_bal does
    # Without a (meaningful) floor, the per-step rescaling stop_grad(CE / term) is what the issue reports:
    # its gradient CE·∇log(term) grows as the term shrinks.
    no_floor = _editor(tiny_lm, "baft", balancing="per_step", scale_floor=1e-9)
    unbounded = [_balance_gradient(no_floor, layer, eps, first_step=True) for eps in epsilons]
    assert unbounded[6] > 1000 * unbounded[0] and unbounded[6] > 10 * max(grads), unbounded
    for e in (editor, plain, no_floor):
        e.restore()


def test_each_balancing_weights_the_terms_as_specified(tiny_lm):
    def loss(editor, ce, bal, loc, first):
        terms = {"balance": torch.tensor(bal, requires_grad=True), "locality": torch.tensor(loc, requires_grad=True)}
        return float(editor.combine_loss(torch.tensor(ce), terms, first_step=first).detach())

    fixed = _editor(tiny_lm, "baft", balancing="fixed", lambda_bal=3.0, lambda_loc=0.5)
    assert loss(fixed, 2.0, 0.5, 0.25, True) == pytest.approx(2.0 + 3.0 * 0.5 + 0.5 * 0.25)
    assert loss(fixed, 1.0, 0.1, 0.05, False) == pytest.approx(1.0 + 0.3 + 0.025)
    per_step = _editor(tiny_lm, "baft", balancing="per_step", scale_floor=0.01)
    assert loss(per_step, 2.0, 0.5, 0.25, True) == pytest.approx(6.0)  # each term weighs as much as the CE
    assert loss(per_step, 1.0, 0.1, 0.05, False) == pytest.approx(3.0)  # re-scaled at every step
    assert loss(per_step, 2.0, 1e-4, 0.25, False) == pytest.approx(2.0 + 2.0 * 1e-4 / 0.01 + 2.0)  # floor
    frozen = _editor(tiny_lm, "baft", balancing="frozen_at_start", scale_floor=0.01)
    assert loss(frozen, 2.0, 0.5, 0.25, True) == pytest.approx(6.0)  # scales 4 and 8, set at the first step
    assert loss(frozen, 1.0, 0.1, 0.05, False) == pytest.approx(1.0 + 4 * 0.1 + 8 * 0.05)  # then held
    assert loss(frozen, 1.0, 0.1, 0.05, True) == pytest.approx(3.0)  # the next edit call sets new scales
    assert loss(frozen, 2.0, 0.0, 0.25, True) == pytest.approx(4.0)  # a satisfied term: floored, finite
    for editor in (fixed, per_step, frozen):
        editor.restore()
    with pytest.raises(Exception, match="balancing must be one of"):
        _editor(tiny_lm, "baft", balancing="sometimes")


def test_balance_forms_printed_and_squared_cv(tiny_lm):
    printed = _editor(tiny_lm, "baft", balance_form="printed")
    cv2 = _editor(tiny_lm, "baft", balance_form="cv2")
    layer = printed.layer_ids[0]
    current = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.7, 0.2, 0.4, 0.2]])
    means = current.mean(dim=0)
    spread = ((means - means.mean()) ** 2).sum() / 3
    assert float(printed._balance(current, layer)) == pytest.approx(float(spread / means.mean()), rel=1e-6)
    assert float(cv2._balance(current, layer)) == pytest.approx(float(spread / means.mean() ** 2), rel=1e-6)
    # cv2 is scale-invariant; the printed form falls when every weight shrinks
    assert float(cv2._balance(current * 0.1, layer)) == pytest.approx(float(cv2._balance(current, layer)), rel=1e-5)
    assert float(printed._balance(current * 0.1, layer)) == pytest.approx(0.1 * float(printed._balance(current, layer)), rel=1e-5)
    # w̄ = 0 (every gate shut) is guarded: finite, zero, with a finite gradient
    for editor in (printed, cv2):
        zeros = torch.zeros(2, 4, requires_grad=True)
        value = editor._balance(zeros, layer)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.isfinite(zeros.grad).all()
        editor.restore()


def test_balance_single_leaves_r_bal_out_while_one_fact_is_seen(tiny_lm):
    weights = {layer: torch.full((2, 3, 4), 0.5) for layer in (0, 1)}
    one_row = torch.tensor([[True, True, True], [False, False, False]])
    two_rows = torch.ones(2, 3, dtype=torch.bool)
    off = _editor(tiny_lm, "baft", balance_single=False)
    assert "balance" not in off.regularizers(weights, one_row, None)  # single editing / first edit of a stream
    assert "balance" in off.regularizers(weights, two_rows, None)  # a batch of two facts
    off.after_edit(weights, one_row)
    assert "balance" in off.regularizers(weights, one_row, None)  # second edit of a continual stream
    off.restore()
    on = _editor(tiny_lm, "baft", balance_single=True)
    assert "balance" in on.regularizers(weights, one_row, None)
    on.restore()


def test_early_stop_rules(tiny_lm):
    ce, loss = torch.tensor(0.004), torch.tensor(0.05)
    values = {}
    for rule in ("mean_ce", "sum_ce", "total"):
        editor = _editor(tiny_lm, "baft", early_stop_on=rule)
        values[rule] = editor.stop_value(ce, loss, target_tokens=5)
        editor.restore()
    assert values == pytest.approx({"mean_ce": 0.004, "sum_ce": 0.02, "total": 0.05})
    # In training: the sum over tokens and the whole loss are never below the mean CE, so they stop later.
    steps = {}
    for rule in ("mean_ce", "sum_ce", "total"):
        editor = _editor(tiny_lm, "baft", early_stop_on=rule, early_stop_loss=0.2, max_steps=40, balancing="fixed")
        steps[rule] = editor.apply(CASES[1:]).steps
        editor.restore()
    assert steps["mean_ce"] < 40 and steps["mean_ce"] <= steps["sum_ce"] and steps["mean_ce"] <= steps["total"], steps
    assert steps["sum_ce"] > steps["mean_ce"] or steps["total"] > steps["mean_ce"], steps


def test_gate_weights_are_the_mean_basis_weights_of_each_pair(tiny_lm):
    editor = _editor(tiny_lm, "baft", max_steps=15)
    pairs = [(CASES[0].prompt, CASES[0].target_new), (CASES[0].irrelevant[0].prompt, CASES[0].irrelevant[0].answer)]
    before = editor.gate_weights(pairs)
    assert before.shape == (2, len(editor.layer_ids), editor.hparams.rank) and before.dtype == torch.float32
    assert before.device.type == "cpu"
    assert torch.equal(before, torch.full_like(before, 0.5))  # zero-initialised gates
    editor.apply(CASES[:1])
    after = editor.gate_weights(pairs)
    assert after.shape == before.shape and bool(((after > 0) & (after < 1)).all())
    assert (after - before).abs().max() > 1e-3  # training moved the gates
    # layer 0's gates read the unedited model's output of layer 0: recompute them by hand
    batch = encode(tiny_lm.tokenizer, pairs, 0)
    mask = batch.intervention_mask(editor.hparams.last_prompt_tokens)
    editor.restore()
    with torch.no_grad():
        hidden = tiny_lm.model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     output_hidden_states=True).hidden_states[1]
        w = torch.sigmoid(editor.interventions["0"].gate(hidden.float()))
    manual = (w * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(after[:, 0], manual, atol=1e-5, rtol=1e-5)
    probe = _probe(tiny_lm)
    torch.testing.assert_close(editor.gate_weights(pairs), after)  # after restore: hooked for the call only
    assert torch.equal(_probe(tiny_lm), probe)


def test_provenance_names_the_settings(tiny_lm):
    from methods.hparams import HPARAMS_DIR

    for scenario in ("single", "continual", "batched"):
        for path in sorted((HPARAMS_DIR / "baft").glob("*.yaml")):
            hp = load_hparams("baft", path.stem, scenario)
            note = get_method("baft").provenance(hp)
            for part in (f"balancing={hp.balancing}", f"R_bal form={hp.balance_form}",
                         f"early stop={hp.early_stop_on}", f"lr_source={hp.lr_source}"):
                assert part in note, (path.name, note)
            assert hp.lr_source, path.name
        for path in sorted((HPARAMS_DIR / "reft").glob("*.yaml")):
            hp = load_hparams("reft", path.stem, scenario)
            assert hp.lr_source and f"lr_source={hp.lr_source}" in get_method("reft").provenance(hp), path.name
    assert load_hparams("baft", "llama2-7b", "single").lr_source == "chosen-on-smollm2-dev"
    assert load_hparams("baft", "llama2-7b", "batched").lr_source == "paper-table5"


def test_parameter_counts_measured_and_table3_convention(tiny_lm):
    """r(3d + 2) per layer is what BaFT trains; Table 3's 606,256 for LLaMA-2 (d = 4096, r = 12, 4 layers)
    is 4·(3rd + d + r)."""
    editor = _editor(tiny_lm, "baft")
    d, r, layers = tiny_lm.hidden_size, editor.hparams.rank, len(editor.layer_ids)
    assert editor.trainable_parameters() == layers * r * (3 * d + 2)
    assert editor.paper_parameters() == layers * (3 * r * d + d + r)
    assert 4 * (3 * 12 * 4096 + 4096 + 12) == 606_256
    editor.restore()


def test_gate_weights_of_many_pairs_and_the_artifacts_read_each_pair_alone(tiny_lm):
    """Read out in chunks of BASIS_WEIGHT_ROWS, each pair's weights are the ones it gets on its own; the artifacts'
    one pass over edit, rephrase and unrelated texts gives each kind the mean of its own pairs."""
    from methods import _representation

    editor = _editor(tiny_lm, "baft", max_steps=10)
    editor.apply(CASES[:1])
    pairs = [(case.prompt, case.target_new) for case in CASES] * (_representation.BASIS_WEIGHT_ROWS // len(CASES) + 2)
    together = editor.gate_weights(pairs)
    assert together.shape[0] == len(pairs) > _representation.BASIS_WEIGHT_ROWS
    for index in (0, len(pairs) - 1):
        torch.testing.assert_close(together[index], editor.gate_weights([pairs[index]])[0], atol=1e-5, rtol=1e-5)
    gates = editor.artifacts(CASES[:1])["gate_weights"]
    case = CASES[0]
    alone = {"edit": [(case.prompt, case.target_new)], "rephrase": [(case.rephrase[0], case.target_new)],
             "unrelated": [(items[0].prompt, items[0].answer) for items in case.locality.values() if items]}
    for kind, kind_pairs in alone.items():
        expected = editor.gate_weights(kind_pairs).mean(dim=0)
        torch.testing.assert_close(torch.tensor(gates[kind]), expected, atol=1e-5, rtol=1e-5)
    editor.restore()
