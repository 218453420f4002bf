"""A local grid's Ray instance listens on the loopback interface only (issue 18).

``kebench grid`` starts Ray with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in effect (``ray_session.local_ray_loopback``),
which makes 127.0.0.1 the node address that the GCS, raylet, workers, dashboard agent, runtime-env agent and
the metrics exporters bind to.  The test lists the listening TCP sockets of the driver and every process it
started (psutil), while cells run, and fails on any address that is not loopback.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.ray  # starts a local Ray instance

ROOT = Path(__file__).resolve().parents[1]
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
ENV["TOKENIZERS_PARALLELISM"] = "false"


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _listening(pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of ``pid`` and its descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in processes:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((process.pid, process.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_a_local_grid_listens_on_loopback_only(tmp_path):
    spec = {"name": "lo", "store": str(tmp_path / "store"), "resources": {"num_cpus": 1, "num_gpus": 0},
            "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}, {"kind": "continual", "T": [2]}],
            "methods": [{"name": "reft", "hparams": {"max_steps": 20}}], "seeds": [0]}
    grid = tmp_path / "lo.yaml"
    grid.write_text(yaml.safe_dump(spec))
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "grid", "--grid", str(grid), "--quiet",
                               "--num-cpus", "2", "--tables", "none"], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets: set[tuple[int, str, str, int]] = set()
    try:
        deadline = time.time() + 300
        seen_worker = None
        while driver.poll() is None and time.time() < deadline:
            sockets.update(_listening(driver.pid))
            names = " ".join(process.name() for process in _children(driver.pid))
            if "CellWorker" in names and seen_worker is None:
                seen_worker = time.time()
            if seen_worker is not None and time.time() - seen_worker > 3:
                break  # every Ray process is up (agents, workers); listeners do not change after this
            time.sleep(0.3)
        assert seen_worker is not None, "no worker started"
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err
    names = {name for _, name, _, _ in sockets}
    assert any("gcs_server" in name for name in names) and any("raylet" in name for name in names), sockets
    exposed = sorted(entry for entry in sockets if not is_loopback(entry[2]))
    assert exposed == [], f"listening on non-loopback addresses: {exposed}"


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
