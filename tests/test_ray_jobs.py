"""The Ray Jobs path: ``ray job submit --working-dir . -- python run_grid.py --grid ...``.

A head node is started here with ``ray start --head`` bound to 127.0.0.1 in its own temp dir, and every
process it started is stopped by PID afterwards (never ``ray stop``, which would end other Ray
instances on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from benchmarks.data import resolve_data_dir
from results.store import latest_attempts

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_processes_under(marker: str) -> None:
    """Every process whose command line names our temp dir is ours: terminate them, then kill stragglers."""
    ours = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []):
                ours.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in ours:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_grid_runs_as_a_ray_job(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="kbray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    grid = tmp_path / "job.yaml"
    store = tmp_path / "store"
    grid.write_text(yaml.safe_dump({
        "name": "job", "store": str(store), "models": ["tiny-random-llama"],
        "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}], "scenarios": [{"kind": "continual", "T": [2]}],
        "methods": [{"name": "reft", "hparams": {"max_steps": 3}}], "seeds": [0],
    }))
    try:
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-2000:]
        data = resolve_data_dir()  # a clean checkout has none yet: the job then reads the embedded ZsRE file
        runtime_env = {"env_vars": {"KEBENCH_DATA": str(data)}} if data.is_dir() else {}
        for _ in range(30):  # the head's job agent can come up after `ray start` returns on a loaded machine
            submitted = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps(runtime_env), "--",
                 "python", "run_grid.py", "--grid", str(grid), "--quiet", "--tables", "continual"],
                env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
            if "No available agent to submit job" not in submitted.stdout + submitted.stderr:
                break
            time.sleep(4)  # refused before any job was created: safe to submit again
        assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-2000:])
        assert "succeeded" in submitted.stdout.lower()
        assert "T=2 Rel." in submitted.stdout  # the table printed by the job
        attempts = latest_attempts(store)
        assert len(attempts) == 1 and all(status == "ok" for _, status in attempts.values())
    finally:
        _stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
