"""Scoring protocols as a seam: registered, chosen per cell (grid-wide or per benchmark entry, plus what the
method requires), and in the cell id only when a cell's set is not its method's default."""

from __future__ import annotations

from typing import Sequence

import pytest

from benchmarks import protocols as protocol_registry
from benchmarks.metrics import answer_tokens, encode
from benchmarks.protocols import DEFAULT_PROTOCOLS, TokenProtocol, cell_protocols, register_protocol
from kebench.core.errors import KebenchError
from orchestrator.grid import expand, parse_grid

GRID = {"name": "p", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
        "scenarios": [{"kind": "single"}], "methods": ["reft", "grace"], "seeds": [0]}


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEBENCH_CODE_VERSION", "pinned")


def _cells(**changes):
    return {cell.label: cell for cell in expand(parse_grid({**GRID, **changes}, "p.yaml"))}


def test_the_default_set_and_what_a_method_requires() -> None:
    assert DEFAULT_PROTOCOLS == ("teacher_forced",)
    assert cell_protocols(None, ("generation",)) == ("teacher_forced", "generation")
    assert cell_protocols(("generation",), ("generation",)) == ("generation",)
    with pytest.raises(KebenchError, match="unknown protocol 'wildest'"):
        cell_protocols(("wildest",))


def test_protocols_enter_the_cell_id_only_when_not_the_default() -> None:
    default = _cells()
    assert all(cell.protocols == () for cell in default.values())
    assert "protocols" not in default["reft"].identity()
    same = _cells(protocols=["teacher_forced"])  # the default, spelled out
    assert {k: c.cell_id for k, c in same.items()} == {k: c.cell_id for k, c in default.items()}
    both = _cells(protocols=["teacher_forced", "generation"])
    assert both["reft"].protocols == ("teacher_forced", "generation")
    assert both["reft"].cell_id != default["reft"].cell_id
    assert both["grace"].cell_id == default["grace"].cell_id  # GRACE is scored under both anyway
    per_entry = _cells(benchmarks=[{"name": "zsre", "split": "dev", "n": 2, "protocols": ["generation"]}])
    assert per_entry["reft"].protocols == ("generation",) and per_entry["grace"].protocols == ("generation",)


@pytest.mark.parametrize("changes, message", [
    ({"protocols": ["teacher-forced"]}, r"p.yaml: protocols\[0\] must be one of .*did you mean 'teacher_forced'"),
    ({"protocols": []}, r"p.yaml: protocols must be a non-empty list"),
    ({"protocols": ["generation", "generation"]}, r"protocols\[1\]: duplicate entry 'generation'"),
    ({"benchmarks": [{"name": "zsre", "split": "dev", "n": 2, "protocols": "generation"}]},
     r"benchmarks\[0\].protocols must be a non-empty list"),
])
def test_bad_protocols_name_the_key(changes, message) -> None:
    with pytest.raises(KebenchError, match=message):
        parse_grid({**GRID, **changes}, "p.yaml")


class _Oracle(TokenProtocol):
    """Predicts the gold answer whatever the model says: every Rel/Gen/Por is 1, every Loc is 1."""

    def predict(self, logits_fn, tokenizer, pairs: Sequence[tuple[str, str]], pad_token_id, device, batch_size=32,
                groups=None):
        gold = answer_tokens(encode(tokenizer, pairs, pad_token_id))
        return [token.clone() for token in gold], gold


def test_a_registered_protocol_scores_every_case(tiny_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import TOY_CASES
    from methods.hparams import load_hparams
    from orchestrator.scenarios import Scenario, run_scenario

    monkeypatch.setattr(protocol_registry, "_REGISTRY", dict(protocol_registry._REGISTRY))
    register_protocol("oracle")(_Oracle)
    hparams = load_hparams("reft", "tiny-random-llama", "continual", {"max_steps": 2})
    result = run_scenario(tiny_lm, "reft", hparams, list(TOY_CASES), Scenario("continual", T=2), seed=0,
                          protocols=("teacher_forced", "oracle"))
    tags = [(c.case_id, c.scores.protocol) for c in result.cases]
    assert tags == [("t0", "teacher_forced"), ("t1", "teacher_forced"), ("t0", "oracle"), ("t1", "oracle")]
    oracle = [c.scores.as_dict() for c in result.cases if c.scores.protocol == "oracle"]
    assert all(value == 1.0 for scores in oracle for value in scores.values())
