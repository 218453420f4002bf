"""A node lost mid-grid never hangs it (issue 31, item 1), and the data directory reaches the nodes.

A two-node ``ray.cluster_utils.Cluster`` on 127.0.0.1 (head and worker, one CPU each), started here and
stopped here (its processes by the ``Node`` objects that started them, never ``ray stop``).  The grid runs
through ``run_grid(..., ray_address=...)`` as ``kebench grid --ray-address`` does, with ``KEBENCH_DATA`` set only
in the driver: the nodes' processes were started without it, and their default data directory holds a
different copy of the ZsRE file (or none), so a worker that did not get the driver's path would find data
with another hash and every cell would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from benchmarks.data import resolve_data_dir
from kebench.core.errors import KebenchError
from results.store import latest_attempts
from results.tables import render

pytestmark = pytest.mark.ray

ZSRE = "zsre/zsre_mend_eval_portability_gpt4.json"
BOUND_S = 120  # the grid finishes within this after losing a node (it took ~15 s here; 240 s was a hang)


@pytest.fixture(scope="module")
def cluster():
    """Head + worker node, one CPU each, on 127.0.0.1, started without ``KEBENCH_DATA`` in their environment;
    the driver (this process) then gets ``KEBENCH_DATA`` pointing at a reformatted copy of the ZsRE file."""
    from orchestrator.ray_session import local_ray_loopback

    local_ray_loopback()
    import ray
    from ray.cluster_utils import Cluster

    base = Path(tempfile.mkdtemp(prefix="kbnl-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    saved = os.environ.pop("KEBENCH_DATA", None)
    data = base / "data"
    (data / "zsre").mkdir(parents=True)
    source = (Path(saved) if saved else resolve_data_dir()) / ZSRE
    records = json.loads(source.read_text("utf-8") if source.is_file() else _embedded_zsre())
    (data / ZSRE).write_text(json.dumps(records, indent=1), encoding="utf-8")  # same records, another hash
    head = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": str(base / "ray"), "include_dashboard": False})
    try:
        worker = head.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        os.environ["KEBENCH_DATA"] = str(data)  # the driver's only
        yield head, worker, base
    finally:
        ray.shutdown()
        head.shutdown()
        if saved is None:
            os.environ.pop("KEBENCH_DATA", None)
        else:
            os.environ["KEBENCH_DATA"] = saved
        shutil.rmtree(base, ignore_errors=True)


def _embedded_zsre() -> str:
    from benchmarks.data import EMBEDDED_DIR

    return (EMBEDDED_DIR / ZSRE).read_text("utf-8")


def _grid(base: Path, store: str):
    from orchestrator.grid import parse_grid

    spec = {"name": "nodeloss", "store": str(base / store), "resources": {"num_cpus": 1},
            "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}],
            "methods": [{"name": "reft", "hparams": {"max_steps": 30}}, {"name": "baft", "hparams": {"max_steps": 30}}],
            "seeds": list(range(6))}  # 12 cells
    return parse_grid(yaml.safe_load(yaml.safe_dump(spec)), f"{store}.yaml")


def _rows(store: Path) -> list[tuple]:
    return duckdb.connect().execute(
        f"SELECT cell_id, attempt, status, error, retries FROM read_parquet('{store}/cells/**/*.parquet', "
        "hive_partitioning=true, union_by_name=true) ORDER BY cell_id, attempt").fetchall()


def _uninterrupted(base: Path, store: Path) -> None:
    """The reference: every cell of the grid run once, one after another, by the grid workers' own code in this
    process (one torch thread, as a 1-CPU Ray worker has), so that only the node-loss run pays for Ray workers."""
    import torch

    from orchestrator.cell import ModelCache, execute_cell
    from orchestrator.grid import expand
    from results.store import write_cell_attempt

    saved, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # what Ray gives a num_cpus=1 worker (configure_threads reads it)
    try:
        cache = ModelCache()
        for cell in expand(_grid(base, "reference")):
            outcome = execute_cell(cell, 1, cache, os.environ["KEBENCH_DATA"])
            assert outcome.cell_row["status"] == "ok", outcome.cell_row["error"]
            write_cell_attempt(store, {**outcome.cell_row, "retries": 0}, outcome.case_rows, outcome.artifact)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        torch.set_num_threads(threads)


@pytest.mark.timeout(400)
def test_losing_a_node_mid_grid_finishes_every_cell_once_and_resumes_to_the_same_tables(cluster):
    """The node check names a node that reads other data; then the worker node is removed mid-grid: the grid
    finishes within the bound, every cell is stored once (the lost one run again on the head, or failed with the
    reason), a rerun completes the failed ones, and the tables equal an uninterrupted run's."""
    import ray

    from orchestrator.grid import expand
    from orchestrator.runner import run_grid
    from orchestrator.supervisor import check_nodes_read_data

    head, worker, base = cluster
    _uninterrupted(base, base / "reference")

    ray.init(address=head.address, log_to_driver=False)
    cells = expand(_grid(base, "lost"))
    with pytest.raises(KebenchError) as caught:
        check_nodes_read_data(cells, None)  # the node's own default data directory: another copy of the file
    line = str(caught.value)
    assert "\n" not in line and line.startswith("node 127.0.0.1 (id ") and "cannot read the cells' benchmark data" in line
    assert "zsre/dev: its data differ from the driver's" in line

    store = base / "lost"
    removed: list[float] = []

    def remove_worker_node() -> None:
        # Mid-grid: both workers are busy (each cell is a fraction of a second; there are always more queued).
        while len(list((store / "cells").rglob("*.parquet")) if (store / "cells").exists() else []) < 3:
            time.sleep(0.05)
        head.remove_node(worker)
        removed.append(time.perf_counter())

    remover = threading.Thread(target=remove_worker_node, daemon=True)
    remover.start()
    started = time.perf_counter()
    report = run_grid(_grid(base, "lost"), store, ray_address=head.address)  # checks the node reads the driver's path
    elapsed = time.perf_counter() - started
    remover.join(timeout=30)
    assert removed, "the worker node was never removed"
    assert elapsed < BOUND_S and not report.interrupted
    rows = _rows(store)
    assert len(rows) == 12 and len({row[0] for row in rows}) == 12  # every cell stored exactly once
    assert all(status == "ok" or error.startswith("worker died") for _, _, status, error, _ in rows), rows
    assert report.retried >= 1 and sum(row[4] for row in rows) == report.retried  # counted in its row

    again = run_grid(_grid(base, "lost"), store, ray_address=head.address, rerun_failed=True)
    assert again.failed == 0 and again.skipped + again.ok == 12
    assert all(status == "ok" for _, status in latest_attempts(store).values())
    assert render(store, "single", "md") == render(base / "reference", "single", "md")
