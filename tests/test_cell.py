"""One path through a cell: a grid worker, a sweep trial and ``kebench edit`` compute the same cell alike.

The same (model, method, hyperparameters, cases, scenario, seed) goes through the grid worker's
``execute_cell``, a sweep trial's request (``orchestrator.sweep.trial_request``) and ``run_cell`` as
``kebench edit`` builds it; the case rows must be identical and so must the provenance, apart from what
only a sweep adds (its own note).  No Ray: the bodies are called in this process.
"""

from __future__ import annotations

import pytest

from orchestrator.cell import CellRequest, ModelCache, execute_cell, grid_request, run_cell
from orchestrator.grid import expand, parse_grid, precision_for
from orchestrator.scenarios import Scenario
from orchestrator.sweep import trial_request
from orchestrator.sweep_spec import parse_sweep

SETUP = {"model": "tiny-random-llama", "benchmark": {"name": "zsre", "split": "dev", "n": 2},
         "scenario": {"kind": "continual", "T": 2}}


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEBENCH_CODE_VERSION", "pinned")


def test_grid_sweep_and_edit_compute_one_cell_alike() -> None:
    (cell,) = expand(parse_grid({"name": "one", "models": ["tiny-random-llama"],
                                 "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
                                 "scenarios": [{"kind": "continual", "T": 2}],
                                 "methods": [{"name": "reft", "hparams": {"max_steps": 4}}]}, "one.yaml"))
    cache = ModelCache()
    grid = execute_cell(cell, 1, cache)
    assert grid.cell_row["status"] == "ok", grid.cell_row["error"]

    spec = parse_sweep({"name": "one", "method": "reft", **SETUP, "metric": "rel", "space": {"max_steps": {"choice": [4]}}},
                       "one-sweep.yaml")
    trial = trial_request(spec, {"max_steps": 4})
    assert trial.hparams == grid_request(cell).hparams and trial.precision == cell.precision
    swept = run_cell(trial, cache)

    edit = run_cell(CellRequest("tiny-random-llama", "zsre", "dev", 2, 0, Scenario("continual", T=2), "reft",
                                trial.hparams, 0, precision_for("auto", "reft", "tiny-random-llama", False),
                                hparams_source=cell.hparams_source), ModelCache())

    assert grid.case_rows == swept.case_rows == edit.case_rows
    assert grid.cell_row["provenance"] == swept.provenance == edit.provenance
    assert cell.hparams_source in edit.provenance
    # every row says what computed it: CPU, the ISA torch dispatched to, BLAS/MKL/oneDNN, threads (issue 30)
    for record in (grid.cell_row["hardware"], swept.fields["hardware"], edit.fields["hardware"]):
        assert record == grid.cell_row["hardware"]
        assert record["cpu"] and record["isa"] and record["torch"] and record["threads"] >= 1
        assert {"mkl", "mkl_cnr", "onednn", "blas", "env", "numerics"} <= set(record)
    assert grid.cell_row["notes"] == edit.notes and "; ".join(edit.notes) == edit.provenance
    assert {key: grid.cell_row[key] for key in ("trainable_params", "dtype", "device")} == \
        {key: swept.fields[key] for key in ("trainable_params", "dtype", "device")}
