"""The Ray fan-out: resume after SIGINT/SIGKILL, failing cells, GPU requests, bad grids.

Every Ray instance here is local (``address="local"``) and bound to 127.0.0.1; processes the tests
start are stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pytest
import yaml

from results.store import latest_attempts
from results.tables import render

ROOT = Path(__file__).resolve().parents[1]
KEBENCH = [sys.executable, "-m", "orchestrator.cli"]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


def _grid(tmp_path: Path, name: str = "g", **changes) -> Path:
    spec = {
        "name": name,
        "store": str(tmp_path / f"store-{name}"),
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "models": ["tiny-random-llama"],
        "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
        "scenarios": [{"kind": "single"}, {"kind": "continual", "T": [2]}],
        "methods": ["reft", {"name": "reft", "label": "reft-r2", "hparams": {"rank": 2, "max_steps": 5}},
                    {"name": "baft", "hparams": {"max_steps": 5}}],
        "seeds": [0],
    }
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _kebench(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*KEBENCH, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def _cell_files(store: Path) -> list[Path]:
    return sorted((store / "cells").rglob("*.parquet")) if (store / "cells").exists() else []


def _stop_tree(process: subprocess.Popen, sig: int) -> None:
    """Signal the driver; then make sure nothing it started outlives it (by PID, never `ray stop`)."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    for child in alive:
        child.kill()


def _wait_for_cells(store: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(_cell_files(store)) < count:
        assert process.poll() is None, process.stderr.read() if process.stderr else "driver exited early"
        assert time.time() < deadline, "grid made no progress"
        time.sleep(0.2)


def _duplicates(store: Path) -> int:
    con = duckdb.connect()
    return con.execute(
        f"""SELECT count(*) FROM (
              SELECT cell_id, case_id, metric, count(*) AS c
              FROM read_parquet('{store}/cases/**/*.parquet', hive_partitioning=true) c
              JOIN (SELECT cell_id AS id, max(attempt) AS latest
                    FROM read_parquet('{store}/cells/**/*.parquet', hive_partitioning=true) GROUP BY cell_id) l
                ON c.cell_id = l.id AND c.attempt = l.latest
              GROUP BY ALL HAVING c > 1)"""
    ).fetchone()[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the grid: its tables are what every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    grid = _grid(tmp, "ref")
    done = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
    assert done.returncode == 0, done.stderr
    store = tmp / "store-ref"
    assert len(_cell_files(store)) == 6
    return {table: render(store, table, "md") for table in ("single", "continual", "params")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_grid_resumes_to_the_same_tables(tmp_path, reference, sig):
    grid = _grid(tmp_path, "ref")  # same name and cells as the reference, another store
    store = tmp_path / "store-ref"
    driver = subprocess.Popen([*KEBENCH, "grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_cells(store, 2, driver)
    _stop_tree(driver, sig)
    finished_before = {f.name for f in _cell_files(store)}
    assert 2 <= len(finished_before) < 6 or len(finished_before) == 6

    again = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
    assert again.returncode == 0, again.stderr
    files = _cell_files(store)
    assert len(files) == 6  # one attempt per cell: no finished cell ran twice
    assert finished_before <= {f.name for f in files}
    assert all(status == "ok" for _, status in latest_attempts(store).values())
    assert _duplicates(store) == 0
    for table in ("single", "continual"):
        assert render(store, table, "md") == reference[table]


def test_a_failing_cell_is_recorded_and_the_rest_finish(tmp_path):
    methods = ["reft", {"name": "baft", "label": "broken", "hparams": {"layers": [7]}}]  # tiny model has 2 layers
    grid = _grid(tmp_path, "fail", methods=methods, scenarios=[{"kind": "single"}])
    done = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "single")
    assert done.returncode == 1
    store = tmp_path / "store-fail"
    con = duckdb.connect()
    rows = con.execute(f"SELECT label, status, error FROM read_parquet('{store}/cells/**/*.parquet', "
                       "hive_partitioning=true) ORDER BY label").fetchall()
    assert [(label, status) for label, status, _ in rows] == [("broken", "failed"), ("reft", "ok")]
    assert "layer 7 out of range" in rows[0][2]
    assert "×" in done.stdout  # the failed cell shows as failed in the table
    rerun = _kebench("grid", "--grid", str(grid), "--quiet", "--tables", "none")
    assert rerun.returncode == 0 and "skipped 2" in rerun.stderr  # failed cells are not retried by default


def test_gpu_cells_are_scheduled_on_a_cpu_machine(tmp_path):
    import ray

    from orchestrator.grid import load_grid
    from orchestrator.runner import run_grid

    grid = load_grid(_grid(tmp_path, "gpu", resources={"num_cpus": 1, "num_gpus": 1}, scenarios=[{"kind": "single"}],
                           methods=["reft"]))
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        report = run_grid(grid, tmp_path / "store-gpu")
    finally:
        ray.shutdown()
    assert report.ok == 1 and report.failed == 0
    device = duckdb.connect().execute(
        f"SELECT device FROM read_parquet('{tmp_path}/store-gpu/cells/**/*.parquet', hive_partitioning=true)"
    ).fetchone()[0]
    assert device.startswith("cpu") and "ray GPU ids 0" in device


def test_bad_grid_is_one_line_exit_2_and_writes_nothing(tmp_path):
    grid = _grid(tmp_path, "bad", scenarios=[{"kind": "continual", "T": [0]}])
    done = _kebench("grid", "--grid", str(grid))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "T" in lines[0]
    assert not (tmp_path / "store-bad").exists()
