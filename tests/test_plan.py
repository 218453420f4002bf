"""``kebench plan``: the cost model of a grid (orchestrator/plan.py), on a tiny grid and stores written here."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from helpers import NOW, put_cell
from orchestrator.cli import main
from orchestrator.grid import expand, load_grid
from orchestrator.plan import lpt_makespan, make_plan, render_plan
from results.store import write_cell_attempt

MODEL = "tiny-random-llama"
GRID = {
    "name": "plan-test",
    "resources": {"num_cpus": 2, "num_gpus": 0},
    "models": [MODEL],
    "benchmarks": [{"name": "zsre", "split": "dev", "n": 4}],
    "scenarios": [{"kind": "single"}, {"kind": "continual", "T": [2]}, {"kind": "batched", "B": 2, "T": [1]}],
    "methods": ["unedited", "reft"],
    "seeds": [0],
}


def _grid_file(directory: Path, **changes) -> Path:
    path = directory / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grid_and_cells(tmp_path_factory):
    grid = load_grid(_grid_file(tmp_path_factory.mktemp("grid")))
    return grid, expand(grid)


def _row(plan, label: str, scenario: str):
    return next(row for row in plan.rows if row.label == label and row.scenario == scenario)


def _store_cell(store: Path, cell, *, seconds_per_edit: float, wall: float, status: str = "ok",
                device: str = "cpu") -> None:
    """Store ``cell`` itself (its real cell_id) with a given edit time and wall time."""
    row = dict(cell.key_dict(), cell_id=cell.cell_id, attempt=1, status=status,
               error=None if status == "ok" else "OOM", hparams=cell.hparams, seconds_per_edit=seconds_per_edit,
               trainable_params=1, peak_rss_mb=None, device=device, dtype="float32", code_version=cell.code_version,
               data_sha256=cell.data_sha256, provenance="", packages="{}", started_at=NOW,
               finished_at=NOW + dt.timedelta(seconds=wall))
    cases = [dict(stream=0, case_id="q0", metric="rel", value=1.0, protocol="teacher_forced")] if status == "ok" else []
    write_cell_attempt(store, row, cases)  # an ok cell without its cases file would count as missing


def test_lpt_schedules_longest_first_on_the_worker_that_frees_up_first() -> None:
    # 3 -> w1, 3 -> w2, 2 -> w1 (5), 2 -> w2 (5), 2 -> w1 (7): 7, not the even split 12 / 2 = 6
    assert lpt_makespan([2, 3, 2, 3, 2], 2) == 7
    assert lpt_makespan([2, 3, 2, 3, 2], 1) == 12
    assert lpt_makespan([2, 3, 2, 3, 2], 10) == 3
    assert lpt_makespan([], 4) == 0


def test_store_seconds_per_edit_times_edits_gives_the_hours(tmp_path: Path, grid_and_cells) -> None:
    grid, cells = grid_and_cells
    store = tmp_path / "store"
    put_cell(store, "reft", 1, scenario="single", model=MODEL, seconds=3.0)  # wall 0: edit time only
    put_cell(store, "reft", 2, scenario="continual", model=MODEL, seconds=2.0)
    put_cell(store, "reft", 1, scenario="batched", B=2, model=MODEL, seconds=5.0)  # one call edits 2 cases
    plan = make_plan(grid, cells, store, workers=2)

    single, continual, batched = (_row(plan, "reft", kind) for kind in ("single", "continual", "batched"))
    assert (single.cells, single.stored, single.edits) == (1, 0, 4)
    assert single.seconds_per_edit == pytest.approx(3.0)
    assert continual.seconds_per_edit == pytest.approx(2.0)
    assert batched.seconds_per_edit == pytest.approx(2.5)
    assert single.eval_seconds_per_case is None and "edit only" in single.source
    assert single.source.startswith(f"this store {store}")
    # 4 edits x 3 s on a cell holding 2 CPU cores
    assert single.device_hours == pytest.approx(4 * 3.0 * 2 / 3600)
    assert batched.device_hours == pytest.approx(4 * 2.5 * 2 / 3600)
    assert plan.unit == "CPU-core-h"
    # LPT of the reft cells (12 s, 10 s, 8 s) on 2 workers: 12 | 10 + 8 = 18 s
    assert plan.wall_hours == pytest.approx(18 / 3600)
    assert plan.even_split_hours == pytest.approx(30 / 2 / 3600)
    assert plan.longest_cell_hours == pytest.approx(12 / 3600)


def test_wall_time_beyond_the_edits_is_evaluation(tmp_path: Path, grid_and_cells) -> None:
    grid, cells = grid_and_cells
    store = tmp_path / "store"
    reft_single = next(c for c in cells if c.label == "reft" and c.scenario.kind == "single")
    # 4 cases, 1 s per edit call, 20 s of wall time: 4 s of edits, 16 s of evaluation = 4 s per case
    _store_cell(store, reft_single, seconds_per_edit=1.0, wall=20.0)
    plan = make_plan(grid, cells, store, workers=1, rerun_failed=False)
    row = _row(plan, "reft", "single")
    assert row.stored == 1 and row.edits == 0 and row.device_hours == 0  # stored: resume skips it
    assert row.seconds_per_edit == pytest.approx(1.0)
    assert row.eval_seconds_per_case == pytest.approx(4.0)
    continual = _row(plan, "reft", "continual")  # priced from the single cell: same model and method
    assert continual.source.startswith(f"this store {store}") and "single editing" in continual.source
    assert continual.device_hours == pytest.approx(4 * (1.0 + 4.0) * 2 / 3600)


def test_a_cell_the_store_holds_costs_nothing_unless_failed_and_rerun(tmp_path: Path, grid_and_cells) -> None:
    grid, cells = grid_and_cells
    store = tmp_path / "store"
    put_cell(store, "reft", 1, scenario="single", model=MODEL, seconds=3.0)
    held = next(c for c in cells if c.label == "reft" and c.scenario.kind == "continual")
    _store_cell(store, held, seconds_per_edit=9.0, wall=0.0, status="failed")
    assert _row(make_plan(grid, cells, store), "reft", "continual").stored == 1  # kebench grid skips it too
    rerun = make_plan(grid, cells, store, rerun_failed=True)
    assert _row(rerun, "reft", "continual").stored == 0
    assert _row(rerun, "reft", "continual").edits == 4

    ok_cell = next(c for c in cells if c.label == "reft" and c.scenario.kind == "batched")
    _store_cell(store, ok_cell, seconds_per_edit=4.0, wall=0.0)
    plan = make_plan(grid, cells, store)
    assert plan.stored == 2 and plan.cells == len(cells)
    row = _row(plan, "reft", "batched")
    assert (row.stored, row.edits, row.device_hours) == (1, 0, 0)
    assert row.seconds_per_edit == pytest.approx(2.0)  # still its measurement, 4 s per call of 2 cases


def test_unknown_method_is_unknown_and_left_out_of_the_totals(tmp_path: Path, grid_and_cells) -> None:
    grid, cells = grid_and_cells
    store = tmp_path / "store"
    put_cell(store, "reft", 1, scenario="single", model=MODEL, seconds=3.0)
    plan = make_plan(grid, cells, store, workers=2)
    unedited = _row(plan, "unedited", "single")
    assert unedited.seconds_per_edit is None and unedited.device_hours is None
    assert plan.priced_cells == 3  # the reft cells only
    assert plan.device_hours == pytest.approx(3 * 4 * 3.0 * 2 / 3600)
    assert len(plan.warnings) == 1 and "unedited (3 cells, 12 edits)" in plan.warnings[0]
    text = render_plan(plan, "md")
    assert "| unknown |" in text and "warning" not in text  # warnings go to stderr (plan_command)


def test_other_stores_and_a_device_mismatch_are_named(tmp_path: Path) -> None:
    grid = load_grid(_grid_file(tmp_path, resources={"num_cpus": 4, "num_gpus": 1}, methods=["reft"],
                                scenarios=[{"kind": "single"}]))
    cells = expand(grid)
    own, other = tmp_path / "own", tmp_path / "other"
    put_cell(other, "reft", 1, scenario="continual", model=MODEL, seconds=6.0)
    plan = make_plan(grid, cells, own, from_stores=[other])
    row = plan.rows[0]
    assert row.seconds_per_edit == pytest.approx(6.0)
    assert f"store {other}" in row.source and "continual editing" in row.source
    assert "measured on cpu, planned for gpu" in row.source
    assert plan.unit == "GPU-h" and row.device_hours == pytest.approx(4 * 6.0 / 3600)  # one GPU per cell
    assert any("no speed-up factor" in warning for warning in plan.warnings)
    put_cell(own, "reft", 1, scenario="single", model=MODEL, seconds=1.0)  # the grid's own store comes first
    assert make_plan(grid, cells, own, from_stores=[other]).rows[0].seconds_per_edit == pytest.approx(1.0)


def test_edit_speed_records_and_extrapolation_to_another_model(tmp_path: Path) -> None:
    from kebench.core.models import model_facts

    grid = load_grid(_grid_file(tmp_path, methods=["reft", "unedited"], scenarios=[{"kind": "single"}]))
    cells = expand(grid)
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps([
        {"model": "smollm2-135m", "method": "reft", "scenario": "single", "seconds_per_edit": 2.0, "device": "cpu",
         "variant": "fast", "n": 3},
        {"model": "smollm2-135m", "method": "reft", "scenario": "single", "seconds_per_edit": 9.0, "device": "cpu",
         "variant": "naive", "n": 3},
        {"model": MODEL, "method": "unedited", "scenario": "single", "seconds_per_edit": 0.5, "device": "cpu"},
    ]))
    plan = make_plan(grid, cells, tmp_path / "none", edit_speed=[speed])
    unedited = _row(plan, "unedited", "single")
    assert unedited.seconds_per_edit == pytest.approx(0.5) and unedited.source.startswith(f"edit_speed {speed}")
    reft = _row(plan, "reft", "single")
    big, small = model_facts("smollm2-135m"), model_facts(MODEL)
    factor = (small.num_layers * small.hidden_size ** 2) / (big.num_layers * big.hidden_size ** 2)
    assert reft.seconds_per_edit == pytest.approx(2.0 * factor)  # the naive variant is not a measurement
    assert reft.source.startswith(f"extrapolated from smollm2-135m x{factor:.3g}")
    assert not plan.warnings


def test_cli_formats(tmp_path: Path, capsys) -> None:
    path = _grid_file(tmp_path, methods=["reft"], scenarios=[{"kind": "single"}])
    store = tmp_path / "store"
    put_cell(store, "reft", 1, scenario="single", model=MODEL, seconds=3.0)
    assert main(["plan", "--grid", str(path), "--store", str(store), "--workers", "3", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workers"] == 3 and data["cells"] == 1 and data["device_hours"] == pytest.approx(4 * 3.0 * 2 / 3600)
    assert main(["plan", "--grid", str(path), "--store", str(store), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model,method,label,scenario,cells,stored,edits,seconds_per_edit")
    assert lines[1].startswith(f"{MODEL},reft,reft,single,1,0,4,3,")
    assert main(["plan", "--grid", str(path), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "| model | method | scenario |" in out and "wall time on 4 workers" in out


@pytest.mark.parametrize("extra, needle", [
    (["--grid", "no/such/grid.yaml"], "grid file not found"),
    (["--workers", "0"], "--workers: expected a positive integer"),
    (["--workers", "many"], "--workers: expected a positive integer"),
    (["--format", "latex"], "unknown format 'latex'"),
    (["--from-store", "no/such/store"], "--from-store no/such/store: not a store directory"),
    (["--edit-speed", "no/such.json"], "--edit-speed no/such.json: not a file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, extra, needle) -> None:
    argv = ["plan", "--grid", str(_grid_file(tmp_path, methods=["reft"], scenarios=[{"kind": "single"}])),
            "--store", str(tmp_path / "store"), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
