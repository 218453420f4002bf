"""The ``Editor`` contract, checked for every registered method on the tiny model.

- apply moves the model towards the target: the target tokens' log-probability on the edit prompt rises
  (``unedited`` is the one method whose outputs must not move);
- restore is bit-exact: every parameter and the logits on unrelated probes equal the originals;
- trainable_parameters is a stable non-negative int and nothing of the model is left trainable;
- each shipped hyperparameter YAML loads and validates for its model, for every scenario block.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.metrics import encode
from kebench.core.models import model_names
from methods.base import get_method, method_names
from kebench.core.scenarios import scenario_names
from methods.hparams import hparams_path, load_hparams
from helpers import probe_logits

# Every method kebench ships or an installed plug-in brings; not the throw-away editors other test modules register.
METHODS = [name for name in method_names() if not get_method(name).__module__.split(".")[-1].startswith("test_")]


def _target_logprob(logits_fn, lm, case) -> float:
    batch = encode(lm.tokenizer, [(case.prompt, case.target_new)], lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        logits = logits_fn(batch)
    predicted_at = batch.answer_mask()[:, 1:]
    targets = batch.input_ids[:, 1:][predicted_at]
    return -float(F.cross_entropy(logits[:, :-1][predicted_at].float(), targets))




def test_every_builtin_method_is_covered() -> None:
    assert {"baft", "reft", "ft-l", "ft-m", "adalora", "lora", "rome", "memit", "alphaedit", "grace", "melo", "wise", "wise-light",
            "unedited"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_apply_moves_towards_the_target_and_restore_is_bit_exact(method: str, tiny_lm, zsre_dev) -> None:
    case = zsre_dev[0]
    editor_class = get_method(method)
    hparams = load_hparams(method, "tiny-random-llama", "single")
    original = {name: tensor.clone() for name, tensor in tiny_lm.model.state_dict().items()}
    probes = probe_logits(tiny_lm)
    plain = lambda batch: tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # noqa: E731
    before = _target_logprob(plain, tiny_lm, case)

    torch.manual_seed(0)
    editor = editor_class(tiny_lm, hparams, seed=0)
    try:
        stats = editor.apply([case])
        after = _target_logprob(editor.logits, tiny_lm, case)
        params = editor.trainable_parameters()
        assert isinstance(params, int) and params >= 0 and editor.trainable_parameters() == params
        assert stats.steps >= 0 and math.isfinite(stats.loss)
        assert isinstance(editor.artifacts([case]), dict)
    finally:
        editor.restore()

    if method == "unedited":
        assert after == before
    else:
        assert after > before + 1e-3, f"{method}: target log-prob {before:.4f} -> {after:.4f}"
    state = tiny_lm.model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[name], original[name]) for name in original), f"{method}: weights changed"
    assert torch.equal(probe_logits(tiny_lm), probes), f"{method}: outputs changed after restore"
    assert not any(p.requires_grad for p in tiny_lm.model.parameters()), f"{method}: left the model trainable"


@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_hparams_yaml_validates(method: str) -> None:
    editor_class = get_method(method)
    shipped = [model for model in model_names() if hparams_path(method, model).is_file()]
    if editor_class.needs_hparams_file:
        assert {"tiny-random-llama", "smollm2-135m"} <= set(shipped), f"{method}: YAMLs for the embedded models"
    for model in shipped:
        for scenario in scenario_names():
            assert isinstance(load_hparams(method, model, scenario), editor_class.hparams_class)
