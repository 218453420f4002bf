"""Cell ids are what a resumed grid skips by: a refactoring must not move a single one.

The ids below were computed at fc79b46 (before the cell path was unified) and are hard-coded: every
change to how a grid is parsed, how hyperparameters are resolved or how scenarios and protocols enter
the identity has to leave them exactly as they are.
"""

from __future__ import annotations

import pytest

from orchestrator.grid import expand, parse_grid

TINY_GRID = {
    "name": "pin",
    "models": ["tiny-random-llama"],
    "benchmarks": [{"name": "zsre", "split": "dev", "n": 4}],
    "scenarios": [{"kind": "single"}, {"kind": "continual", "T": [2]}, {"kind": "batched", "B": 2, "T": [1]}],
    "methods": ["baft", "reft", {"name": "ft-l", "label": "ftl-bf16", "dtype": "bfloat16"},
                {"name": "baft", "label": "r2", "hparams": {"rank": 2}}],
    "seeds": [0, 1],
}

PINNED = [
    ("baft", "single", 0, "a6921c6172c3430b"),
    ("baft", "single", 1, "8b7329c40115c198"),
    ("reft", "single", 0, "65d48272e3a1114e"),
    ("reft", "single", 1, "a0a2a0dc71ce6b76"),
    ("ftl-bf16", "single", 0, "39324c79035fe489"),
    ("ftl-bf16", "single", 1, "f6c272ee504e3979"),
    ("r2", "single", 0, "d1e08c9d5664d13c"),
    ("r2", "single", 1, "e3e33224e4408b66"),
    ("baft", "continual(T=2)", 0, "f8e88053ebf0c543"),
    ("baft", "continual(T=2)", 1, "289179d0b2bfd0ad"),
    ("reft", "continual(T=2)", 0, "23eaa4f7741e4643"),
    ("reft", "continual(T=2)", 1, "d1d5c6343a5e9957"),
    ("ftl-bf16", "continual(T=2)", 0, "075bddf4d4622f91"),
    ("ftl-bf16", "continual(T=2)", 1, "e9849778800b467f"),
    ("r2", "continual(T=2)", 0, "a4d7b41f779a9189"),
    ("r2", "continual(T=2)", 1, "97613afa8ccb8d7c"),
    ("baft", "batched(B=2,T=1)", 0, "54bbcee88318af90"),
    ("baft", "batched(B=2,T=1)", 1, "82265dbde1f4c983"),
    ("reft", "batched(B=2,T=1)", 0, "be80d563bc3af857"),
    ("reft", "batched(B=2,T=1)", 1, "8499eca4a4530625"),
    ("ftl-bf16", "batched(B=2,T=1)", 0, "da950ca7356b6ea2"),
    ("ftl-bf16", "batched(B=2,T=1)", 1, "fc1524a2d8361c46"),
    ("r2", "batched(B=2,T=1)", 0, "087d40339374f5bc"),
    ("r2", "batched(B=2,T=1)", 1, "c4cf33bf10aea546"),
]

#: a downstream check in the scenario, a case-parallel setting (not in the id), the reference method and
#: GRACE (scored under two protocols by its class): ids that the scenario and protocol seams must keep
EXTRA_GRID = {
    "name": "pin-extra",
    "models": ["tiny-random-llama"],
    "benchmarks": [{"name": "zsre", "split": "dev", "n": 4}],
    "scenarios": [{"kind": "continual", "T": 2, "downstream": "piqa", "downstream_n": 4},
                  {"kind": "single", "parallel_cases": 2}],
    "methods": ["unedited", "grace"],
    "seeds": [0],
}

PINNED_EXTRA = [
    ("unedited", "continual(T=2)+piqa(n=4)", 0, "101eb99018ea15da"),
    ("grace", "continual(T=2)+piqa(n=4)", 0, "f2850c4d622af8ad"),
    ("unedited", "single", 0, "84bb9a66de2579f0"),
    ("grace", "single", 0, "1a2e8161c56afc08"),
]


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEBENCH_CODE_VERSION", "pinned")


@pytest.mark.parametrize(("grid", "pinned"), [(TINY_GRID, PINNED), (EXTRA_GRID, PINNED_EXTRA)],
                         ids=["single-continual-batched", "downstream-parallel-grace"])
def test_cell_ids_are_pinned(grid: dict, pinned: list) -> None:
    cells = expand(parse_grid(grid, "pin"))
    assert [(c.label, c.scenario.label, c.seed, c.cell_id) for c in cells] == pinned


def test_hparams_source_is_pinned() -> None:
    cells = expand(parse_grid(EXTRA_GRID, "pin"))
    assert cells[0].hparams_source == "hparams: defaults of unedited"
    assert cells[1].hparams_source == "hparams: methods/hparams/grace/tiny-random-llama.yaml (sha256 d41dbd02db0a)"
