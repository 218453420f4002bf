"""ROME and MEMIT on the tiny random model: rank one, only the configured layers, the solve, guards, restore."""

from __future__ import annotations

import pytest
import torch

import methods.memit as memit_module
from benchmarks.metrics import encode
from methods.stats import second_moment
from methods.base import NonFiniteError, get_method
from methods.rome import ValueSettings, capture, context_templates, encode_rows, optimize_value
from helpers import TOY_CASES, changed_keys, make_editor, state_snapshot

CASES = TOY_CASES


@pytest.fixture(autouse=True)
def _stats_in_tmp(tmp_path_factory, monkeypatch):
    """Statistics of the tiny model go to a per-session folder, not the user's cache."""
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "kebench-cache"))


_editor, _state, _changed = make_editor, state_snapshot, changed_keys


def test_fact_token_is_the_subjects_last_token_and_answers_match_the_scorer(tiny_lm):
    rows = encode_rows(tiny_lm, [("The capital of Atlantis is", "Poseidonia", "Atlantis", "subject_last"),
                                 ("Nothing to see", None, "Atlantis", "subject_last"),
                                 ("Of Atlantis, the capital", None, "Atlantis", "last")])
    tok = tiny_lm.tokenizer
    assert tok.decode(rows.input_ids[0, : int(rows.lookup[0]) + 1]) == "The capital of Atlantis"
    assert int(rows.lookup[1]) == int(rows.lengths[1]) - 1  # subject absent: the last prompt token
    assert int(rows.lookup[2]) == int(rows.lengths[2]) - 1  # "last" strategy
    scored = encode(tok, [("The capital of Atlantis is", "Poseidonia")], tiny_lm.pad_token_id)
    n = int(scored.lengths[0])
    assert torch.equal(rows.input_ids[0, :n], scored.input_ids[0]) and rows.prompt_lengths[0] == scored.prompt_lengths[0]


def test_fast_value_optimisation_matches_the_full_forward(tiny_lm):
    templates = [t for group in context_templates(1, 1) for t in group]
    settings = ValueSettings(4, 0.5, -1, 1e-3, 4.0, 0.0625, 0.0)
    fast = optimize_value(tiny_lm, CASES[0], templates, 0, "block", settings, "subject_last", fast=True)
    full = optimize_value(tiny_lm, CASES[0], templates, 0, "block", settings, "subject_last", fast=False)
    assert fast.steps == full.steps == 3
    torch.testing.assert_close(fast.target, full.target, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fast.target, fast.initial)


def test_rome_update_is_rank_one_and_writes_v_star_at_k_star(tiny_lm):
    state = _state(tiny_lm)
    weight = tiny_lm.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    editor = _editor(tiny_lm, "rome")
    editor.apply(CASES[:1])
    assert _changed(tiny_lm, state) == {"model.layers.0.mlp.down_proj.weight"}
    singular = torch.linalg.svdvals((weight.detach() - before).double())
    assert singular[0] > 1e-2 and singular[1] / singular[0] < 1e-5  # rank one (float32 rounding aside)
    k_star, v_star = editor.last_edit[0]
    torch.testing.assert_close(weight.detach() @ k_star, v_star, rtol=1e-4, atol=1e-4)
    editor.restore()
    assert not _changed(tiny_lm, state)
    assert editor.trainable_parameters() == 0


@pytest.mark.needs_data("shared-offline")
def test_rome_covariance_adjustment_is_c_inverse_k(tiny_lm):
    editor = _editor(tiny_lm, "rome", mom2_adjustment=True, mom2_n_samples=40)
    rows = encode_rows(tiny_lm, [(t.format(CASES[0].prompt), None, "Atlantis", "subject_last") for t in editor.templates])
    keys, _, _ = capture(tiny_lm, rows, key_layers=[0])
    moment = second_moment(tiny_lm, 0, "shared-offline", 40).double()
    expected = torch.linalg.solve(moment, keys[0].double().mean(dim=0))
    torch.testing.assert_close(editor.left_vector(CASES[0], 0).double(), expected / expected.norm(), rtol=1e-4, atol=1e-5)
    assert "shared-offline" in get_method("rome").provenance(editor.hparams)
    editor.restore()


@pytest.mark.needs_data("shared-offline")
@pytest.mark.parametrize("layers, touched", [((1,), {1}), ((0, 1), {0, 1})])
def test_memit_touches_only_its_configured_layers(tiny_lm, layers, touched):
    state = _state(tiny_lm)
    editor = _editor(tiny_lm, "memit", layers=list(layers), v_num_grad_steps=6, mom2_n_samples=40)
    editor.apply(list(CASES))  # one batch of two edits, solved jointly
    assert _changed(tiny_lm, state) == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in touched}
    editor.restore()
    assert not _changed(tiny_lm, state)


@pytest.mark.needs_data("shared-offline")
def test_memit_update_is_the_regularised_least_squares_solution(tiny_lm, monkeypatch):
    editor = _editor(tiny_lm, "memit", layers=[1], v_num_grad_steps=4, mom2_n_samples=40, mom2_update_weight=50.0)
    weight = tiny_lm.layers[1].mlp.down_proj.weight
    before = weight.detach().clone().double()
    keys = editor._keys(list(CASES), 1).double().T  # [d_mlp, n] on the unedited model
    current = editor._current_z(list(CASES), 1).double().T
    seen = {}
    real = memit_module.optimize_value

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        seen[args[1].case_id] = result.target
        return result

    monkeypatch.setattr(memit_module, "optimize_value", recording)
    editor.apply(list(CASES))
    residual = torch.stack([seen[c.case_id] for c in CASES]).double().T - current
    delta = weight.detach().double() - before
    moment = editor.moments[1].double()
    # ΔW (λC + K Kᵀ) = R Kᵀ: the normal equations of min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ).
    torch.testing.assert_close(delta @ (50.0 * moment + keys @ keys.T), residual @ keys.T, rtol=1e-3, atol=1e-4)
    editor.restore()


@pytest.mark.needs_data("shared-offline")
def test_non_finite_statistics_fail_as_non_finite(tiny_lm):
    state = _state(tiny_lm)
    editor = _editor(tiny_lm, "memit", layers=[1], v_num_grad_steps=2, mom2_n_samples=40)
    editor.moments[1] = torch.full_like(editor.moments[1], float("nan"))
    with pytest.raises(NonFiniteError):
        editor.apply(CASES[:1])
    editor.restore()
    assert not _changed(tiny_lm, state)


def test_batched_rome_applies_cases_in_turn(tiny_lm):
    state = _state(tiny_lm)
    editor = _editor(tiny_lm, "rome", v_num_grad_steps=3)
    weight = tiny_lm.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    editor.apply(list(CASES))
    singular = torch.linalg.svdvals((weight.detach() - before).double())
    assert singular[1] / singular[0] > 1e-3  # two rank-one updates
    editor.restore()
    assert not _changed(tiny_lm, state)
