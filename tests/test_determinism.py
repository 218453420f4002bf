"""The same cell run twice on CPU with the same seed gives byte-identical case rows (issue 15).

Each run uses a fresh worker cache (the model is built again, the pre-edit outputs recomputed), as two
separate grid runs would; timing fields live only in the cell row and are left out of the comparison.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.grid import expand, parse_grid
from orchestrator.cell import ModelCache, execute_cell

# Few optimisation steps keep the test fast; nondeterminism (unseeded draws, set ordering) shows after one.
METHODS = {
    "baft": {"max_steps": 3},
    "reft": {"max_steps": 3},
    "rome": {"v_num_grad_steps": 4},
    "grace": {"n_iter": 3},
    "wise": {"n_iter": 4},
}
TIMING = ("seconds_per_edit", "peak_rss_mb", "started_at", "finished_at")


def _cells(method: str, hparams: dict) -> list:
    grid = parse_grid({
        "name": "det", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
        "scenarios": [{"kind": "single"}, {"kind": "continual", "T": 2}],
        "methods": [{"name": method, "hparams": hparams}] if hparams else [method], "seeds": [3],
    }, "det")
    return expand(grid)


def _run(cell) -> tuple[bytes, dict]:
    outcome = execute_cell(cell, 1, ModelCache())
    assert outcome.cell_row["status"] == "ok", outcome.cell_row["error"]
    rows = json.dumps(outcome.case_rows, sort_keys=True, allow_nan=True).encode()
    return rows, {k: v for k, v in outcome.cell_row.items() if k not in TIMING}


@pytest.mark.parametrize("method", list(METHODS))
def test_same_cell_same_seed_gives_identical_case_rows(method):
    for cell in _cells(method, METHODS[method]):
        first_rows, first_cell = _run(cell)
        second_rows, second_cell = _run(cell)
        assert first_rows == second_rows, f"{method} {cell.scenario.label}: case rows differ between runs"
        assert first_cell == second_cell, f"{method} {cell.scenario.label}: cell row differs between runs"
        assert first_rows != b"[]"
