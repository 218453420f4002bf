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

pytestmark = pytest.mark.ray  # starts a local Ray instance

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


# SIGINT/SIGTERM (a clean stop, then a rerun) are tests/test_interrupts.py's; here the driver dies with nothing cleaned up
@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["sigkill"])
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
    # Passes every up-front check, then overflows inside the optimizer (out-of-range layers are now refused at
    # expansion, see test_bad_inputs.py).
    methods = ["reft", {"name": "baft", "label": "broken", "hparams": {"lr": 1.0e38}}]
    grid = _grid(tmp_path, "fail", methods=methods, scenarios=[{"kind": "single"}])
    done = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "single")
    assert done.returncode == 1
    store = tmp_path / "store-fail"
    con = duckdb.connect()
    rows = con.execute(f"SELECT label, status, error FROM read_parquet('{store}/cells/**/*.parquet', "
                       "hive_partitioning=true) ORDER BY label").fetchall()
    assert [(label, status) for label, status, _ in rows] == [("broken", "failed"), ("reft", "ok")]
    assert "overflow" in rows[0][2]
    assert "×" in done.stdout  # the failed cell shows as failed in the table
    rerun = _kebench("grid", "--grid", str(grid), "--quiet", "--tables", "none")
    assert rerun.returncode == 0 and "skipped 2" in rerun.stderr  # failed cells are not retried by default


def test_gpu_cells_are_scheduled_on_a_cpu_machine(tmp_path):
    import ray

    from orchestrator.grid import load_grid
    from orchestrator.ray_session import local_ray_loopback
    from orchestrator.runner import run_grid

    grid = load_grid(_grid(tmp_path, "gpu", resources={"num_cpus": 1, "num_gpus": 1}, scenarios=[{"kind": "single"}],
                           methods=["reft"]))
    local_ray_loopback()  # _node_ip_address alone is rewritten by Ray 2.60 to the routable address
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
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


# --------------------------------------------------------------------------- store faults, two drivers, retries


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _csv_rows(text: str) -> list[list[str]]:
    """The CSV renderer's notes are ``# `` comment lines (pandas: comment="#"); everything else must be rows
    of the header's width, with no escape codes or log lines mixed in."""
    import csv
    import io

    assert "\x1b[" not in text and "(raylet)" not in text and "WARNING" not in text
    body = "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    rows = list(csv.reader(io.StringIO(body)))
    assert rows and all(len(row) == len(rows[0]) for row in rows), text
    return rows


def test_second_driver_is_refused_and_a_retried_cell_leaves_stdout_clean(tmp_path):
    """Driver A runs; a worker is killed mid-cell (Ray restarts it and retries the cell); driver B on the same
    store exits 2 naming A's PID; A finishes every cell exactly once; stdout holds tables only."""
    methods = [{"name": "reft", "hparams": {"max_steps": 20}}, {"name": "baft", "hparams": {"max_steps": 20}}]
    grid = _grid(tmp_path, "two", methods=methods)
    store = tmp_path / "store-two"
    a = subprocess.Popen([*KEBENCH, "grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "single"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        victim = None
        while victim is None:
            assert a.poll() is None, a.communicate()[1]
            assert time.time() < deadline, "no worker started"
            victim = next((p for p in _children(a.pid) if "CellWorker.run" in p.name()), None)
            time.sleep(0.1)
        victim.kill()  # SIGKILL a busy worker: the driver runs its cell again on a new worker
        started = time.perf_counter()
        b = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
        b_seconds = time.perf_counter() - started
        out, err = a.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    lines = [line for line in b.stderr.splitlines() if line.strip()]
    assert b.returncode == 2 and len(lines) == 1, b.stderr
    assert f"is in use by another kebench grid (pid {a.pid} on " in lines[0] and b_seconds < 30
    assert a.returncode == 0, err
    assert len(_cell_files(store)) == 4 and _duplicates(store) == 0  # every cell once, no duplicate attempt
    assert all(status == "ok" for _, status in latest_attempts(store).values())
    assert "worker died" in err and "running it again (1 of 2 retries)" in err  # the driver's notice, on stderr ...
    assert "\x1b[" not in out and "(raylet)" not in out and "running it again" not in out  # ... never on stdout
    assert out.lstrip().startswith("## ")  # the table is the first thing on stdout
    table = _kebench("table", "--store", str(store), "--table", "single", "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = _csv_rows(table.stdout)
    assert rows[0][:2] == ["model", "method"] and len(rows) >= 3


def test_a_stale_lock_is_taken_over(tmp_path):
    from results.store import LOCK_NAME

    grid = _grid(tmp_path, "stale", methods=["reft"], scenarios=[{"kind": "single"}])
    store = tmp_path / "store-stale"
    store.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (store / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "here", "since": "then"}}')
    done = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
    assert done.returncode == 0, done.stderr
    assert len(_cell_files(store)) == 1


def test_corrupt_store_files_are_named_set_aside_and_rerun(tmp_path):
    """A truncated cells file, a junk file and a deleted cases partition: ``kebench table`` names the bad file and
    renders the rest; ``kebench grid`` moves bad files aside as ``*.corrupt`` and re-runs exactly those cells."""
    grid = _grid(tmp_path, "bad-store", methods=["reft", {"name": "baft", "hparams": {"max_steps": 5}}],
                 scenarios=[{"kind": "single"}])
    store = tmp_path / "store-bad-store"
    first = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
    assert first.returncode == 0, first.stderr
    before = render(store, "single", "md")
    reft_cell = next(path for path in _cell_files(store) if "method=reft" in str(path))
    reft_cell.write_bytes(reft_cell.read_bytes()[:40])  # truncated
    junk = reft_cell.with_name("0000000000000000-a1.parquet")
    junk.write_text("not parquet")
    baft_cases = next((store / "cases").rglob("method=baft"))
    for path in baft_cases.iterdir():
        path.unlink()
    baft_cases.rmdir()  # a deleted partition

    table = _kebench("table", "--store", str(store), "--table", "single", "--format", "csv")
    assert table.returncode == 0 and "Traceback" not in table.stderr
    assert f"skipped unreadable {reft_cell}" in table.stderr and str(junk) in table.stderr
    _csv_rows(table.stdout)

    again = _kebench("grid", "--grid", str(grid), "--quiet", "--num-cpus", "2", "--tables", "none")
    assert again.returncode == 0, again.stderr
    assert "ran 2 (ok 2, failed 0)" in again.stderr and "moved aside" in again.stderr
    assert reft_cell.with_name(reft_cell.name + ".corrupt").exists() and junk.with_name(junk.name + ".corrupt").exists()
    assert all(status == "ok" for _, status in latest_attempts(store).values()) and _duplicates(store) == 0
    assert render(store, "single", "md") == before


def test_a_signal_inside_rays_wait_counts_as_an_interrupt():
    """Ray's Cython wait wraps the handler's exception: "SystemError: <cyfunction CoreWorker.wait> returned a
    result with an exception set", caused by our GridInterrupted; the runner must still see an interrupt."""
    import signal

    from orchestrator.runner import GridInterrupted, _interrupt_cause

    try:
        try:
            raise GridInterrupted(signal.SIGINT)
        except GridInterrupted as inner:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from inner
    except SystemError as wrapped:
        found = _interrupt_cause(wrapped)
    assert isinstance(found, GridInterrupted) and found.signum == signal.SIGINT
    assert _interrupt_cause(SystemError("unrelated")) is None
