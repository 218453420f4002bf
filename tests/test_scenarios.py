"""Scenario streams, and the exact-restore guard that every stream passes through."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from benchmarks.case import EditCase
from methods.base import Editor, EditStats, register_method
from kebench.core.errors import KebenchError
from orchestrator.scenarios import Scenario, make_streams, run_scenario

CASES = [EditCase(f"c{i}", f"Question number {i} is", f"answer {i}") for i in range(6)]


def test_streams_follow_the_protocol():
    single = make_streams(CASES, Scenario("single"))
    assert [[[c.case_id for c in call] for call in stream.calls] for stream in single] == [[["c0"]], [["c1"]], [["c2"]], [["c3"]], [["c4"]], [["c5"]]]
    continual = make_streams(CASES, Scenario("continual", T=3))
    assert [[[c.case_id for c in call] for call in s.calls] for s in continual] == [[["c0"], ["c1"], ["c2"]], [["c3"], ["c4"], ["c5"]]]
    batched = make_streams(CASES, Scenario("batched", B=3, T=2))
    assert [[[c.case_id for c in call] for call in s.calls] for s in batched] == [[["c0", "c1", "c2"], ["c3", "c4", "c5"]]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="continual", T=0), "T must be a positive integer"),
        (dict(kind="batched", B=-1), "B must be a positive integer"),
        (dict(kind="sequential"), "unknown scenario 'sequential'"),
        (dict(kind="single", T=2), "T and B must be 1"),
    ],
)
def test_bad_scenarios(kwargs, message):
    with pytest.raises(KebenchError, match=message):
        Scenario(**kwargs)


def test_cases_must_fill_whole_streams():
    with pytest.raises(KebenchError, match="do not split into streams of 4"):
        make_streams(CASES, Scenario("continual", T=4))


@dataclass(frozen=True)
class _NoHParams:
    scale: float = 1.5


@register_method("test-leaky")
class _LeakyEditor(Editor):
    """Scales a weight and 'forgets' to put it back: the scenario runner must notice."""

    hparams_class = _NoHParams

    def apply(self, cases):
        with torch.no_grad():
            self.lm.model.lm_head.weight.mul_(self.hparams.scale)
        return EditStats(steps=0, loss=0.0)

    def restore(self):
        pass

    def trainable_parameters(self):
        return 0


def test_a_restore_that_is_not_exact_stops_the_run(tiny_lm):
    original = tiny_lm.model.lm_head.weight.detach().clone()
    try:
        with pytest.raises(RuntimeError, match="did not return the model to its original outputs"):
            run_scenario(tiny_lm, "test-leaky", _NoHParams(), CASES[:1], Scenario("single"), seed=0)
    finally:
        with torch.no_grad():
            tiny_lm.model.lm_head.weight.copy_(original)


def test_continual_run_reports_every_case_once(tiny_lm):
    from methods.hparams import load_hparams

    hp = load_hparams("reft", "tiny-random-llama", "continual", {"max_steps": 2})
    result = run_scenario(tiny_lm, "reft", hp, CASES, Scenario("continual", T=3), seed=0, metrics=("rel", "gen", "loc"))
    assert [c.case_id for c in result.cases] == [c.case_id for c in CASES]
    assert [c.stream for c in result.cases] == [0, 0, 0, 1, 1, 1]
    assert len(result.edit_seconds) == 6 and result.trainable_parameters > 0
    assert all(c.scores.gen is None and c.scores.loc is None for c in result.cases)  # no rephrase / locality given


def test_downstream_scenario_needs_a_stream():
    with pytest.raises(KebenchError, match="unknown downstream check 'nope'"):
        Scenario("continual", T=2, downstream="nope")
    with pytest.raises(KebenchError, match="use a continual, batched or lifelong scenario"):
        Scenario("single", downstream="piqa")
    assert Scenario("batched", B=2, T=1, downstream="piqa").label == "batched(B=2,T=1)+piqa(n=all)"


@pytest.mark.needs_data("piqa")
def test_downstream_is_scored_on_the_edited_model_and_the_unedited_one(tiny_lm):
    """PIQA after each stream uses the editor's logits (before restore); the unedited score is the plain model's."""
    from benchmarks.piqa import load_piqa, piqa_accuracy
    from benchmarks.registry import _DOWNSTREAM, register_downstream
    from methods.hparams import load_hparams
    from orchestrator.scenarios import plain_logits

    seen: list[float] = []

    @register_downstream("test-mean-logit", "the mean logit of a fixed prompt (changes with any edit)")
    def mean_logit(logits_fn, lm, n, data_dir=None):
        batch = __import__("benchmarks.metrics", fromlist=["encode"]).encode(
            lm.tokenizer, [("Question number 0 is", "answer 0")], lm.pad_token_id)
        with torch.no_grad():
            value = float(logits_fn(batch.to(lm.device)).float().mean())
        seen.append(value)
        return value, 1

    try:
        hp = load_hparams("reft", "tiny-random-llama", "continual", {"max_steps": 3})
        result = run_scenario(tiny_lm, "reft", hp, CASES[:4], Scenario("continual", T=2, downstream="test-mean-logit"),
                              seed=0, metrics=("rel",))
    finally:
        _DOWNSTREAM.pop("test-mean-logit")
    check = result.downstream
    assert check is not None and check.name == "test-mean-logit" and check.items == 1
    assert len(check.edited) == 2 and seen[0] == check.unedited  # unedited first, then one per stream
    assert all(value != check.unedited for value in check.edited)  # the edited model was scored

    # The real PIQA check, a cached unedited score, and the model restored afterwards.
    hp = load_hparams("reft", "tiny-random-llama", "continual", {"max_steps": 1})
    items = load_piqa(n=4)
    unedited = piqa_accuracy(plain_logits(tiny_lm), tiny_lm.tokenizer, tiny_lm.pad_token_id, tiny_lm.device, items)
    piqa = run_scenario(tiny_lm, "reft", hp, CASES[:2], Scenario("continual", T=2, downstream="piqa", downstream_n=4),
                        seed=0, metrics=("rel",)).downstream
    assert piqa.items == 4 and piqa.unedited == unedited and len(piqa.edited) == 1
    cached = run_scenario(tiny_lm, "reft", hp, CASES[:2], Scenario("continual", T=2, downstream="piqa", downstream_n=4),
                          seed=0, metrics=("rel",), downstream_unedited=0.25).downstream
    assert cached.unedited == 0.25 and cached.edited == piqa.edited


def test_release_freed_memory_returns_the_heaps_free_pages():
    """Between a cell's phases the freed blocks of one phase go back to the OS, so the next phase's peak does not
    stack on top of them (glibc only: elsewhere it is a no-op)."""
    from orchestrator.scenarios import _malloc_trim, release_freed_memory

    if _malloc_trim() is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("no glibc malloc_trim here")

    def resident_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KB each: below mmap's threshold, so on the heap
    kept = blocks[::50]  # what stays alive pins the heap's top, so glibc trims nothing on its own
    del blocks
    before = resident_mb()
    release_freed_memory()
    assert resident_mb() < before - 100  # about 185 MB were freed
    assert len(kept) == 60
