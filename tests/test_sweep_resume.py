"""A sweep survives a SIGKILL of its driver: rerun, it continues the same Tune experiment (Tuner.restore).

Tiny model: an 8-trial Optuna sweep (two objectives, one trial at a time) in a driver subprocess; once
the store holds >= 2 trials the driver is SIGKILLed; the sweep is run again in this process.  Then the
store holds exactly 8 trials, no trial id twice (one attempt each), and every trial stored before the
kill was neither recomputed nor rewritten (same stored attempt; Tune kept its old result or replayed
the stored scores).  The Ray processes the killed driver left behind are ended by PID (its session).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.sweep import load_sweep, run_sweep
from results.views import connect, records

pytestmark = pytest.mark.ray  # starts Ray Tune sweeps

SWEEP = {
    "name": "resume", "model": "tiny-random-llama", "method": "baft",
    "benchmark": {"name": "zsre", "split": "dev", "n": 4}, "scenario": {"kind": "continual", "T": 2},
    "objectives": ["rel", "loc"], "search": "optuna", "samples": 8, "max_concurrent": 1, "seed": 0,
    "space": {"lr": {"loguniform": [0.01, 0.2]}, "rank": {"grid": [2, 4]}, "max_steps": {"choice": [12]}},
}
DRIVER = """
import sys
from orchestrator.sweep import load_sweep, run_sweep

run_sweep(load_sweep(sys.argv[1]), num_cpus=2)
"""


def _trials(store: Path) -> list[dict]:
    if not (store / "cells").is_dir():
        return []
    with connect(store) as con:
        return records(con, "SELECT trial_id, cell_id, attempt, status, finished_at FROM cells_all WHERE kind = 'tune'")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def test_sigkilled_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    store = tmp_path / "store"
    sweep_file = tmp_path / "resume.yaml"
    sweep_file.write_text(yaml.safe_dump({**SWEEP, "store": str(store)}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(sweep_file)], cwd=Path.cwd(), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_trials(store)) < 2:
            assert driver.poll() is None, f"the driver exited early with {driver.returncode}"
            assert time.monotonic() < deadline, "no two trials finished within 240 s"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        killed_at = time.time()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        time.sleep(1.0)
        for pid in _session_pids(driver.pid):  # Ray processes the killed driver started, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    before = {row["trial_id"]: row for row in _trials(store)}
    assert 2 <= len(before) < 8, f"kill landed after {len(before)} trials: the test proves nothing"

    outcome = run_sweep(load_sweep(sweep_file), num_cpus=2)
    assert outcome.resumed and not outcome.interrupted and outcome.failed == 0

    after = _trials(store)
    ids = [row["trial_id"] for row in after]
    assert len(ids) == 8 and len(set(ids)) == 8, ids  # eight trials, no trial id twice
    assert all(row["attempt"] == 1 for row in after)
    by_id = {row["trial_id"]: row for row in after}
    for trial_id, row in before.items():  # stored before the kill: not rewritten ...
        assert by_id[trial_id]["finished_at"] == row["finished_at"]
    results = {result.metrics.get("trial_id"): result.metrics for result in outcome.results}
    assert set(results) == set(ids)
    for trial_id in before:  # ... and not recomputed: Tune kept its result, or the store's scores were replayed
        metrics = results[trial_id]
        assert metrics.get("replayed") == 1 or metrics["timestamp"] <= killed_at, (trial_id, metrics)
    assert sum(1 for m in results.values() if m.get("replayed") != 1 and m["timestamp"] > killed_at) == 8 - len(before)

    again = run_sweep(load_sweep(sweep_file), num_cpus=2)  # a finished sweep: nothing runs, nothing is added
    assert again.resumed and len(_trials(store)) == 8


@pytest.mark.slow  # 25 s: `make test-slow`
def test_restart_starts_a_new_experiment_whose_ranking_and_export_see_only_its_trials(tmp_path, capsys):
    """``--restart`` with a changed space: the old experiment's trials stay in the store but never enter the new
    ranking or the export (issue 31: an old ``lr: 0.121`` was exported though the new space was
    ``loguniform [0.001, 0.002]``); Tune's configuration box goes to stderr, stdout holds the tables."""
    from orchestrator.cli import main
    from orchestrator.exports import read_export_identity

    spec_raw = {**SWEEP, "store": str(tmp_path / "s"), "samples": 2, "max_concurrent": 2, "search": "random",
                "metric": "avg", "space": {"lr": {"loguniform": [0.1, 0.2]}, "max_steps": {"choice": [2]}}}
    spec_raw.pop("objectives")
    sweep_file = tmp_path / "r.yaml"
    sweep_file.write_text(yaml.safe_dump(spec_raw), encoding="utf-8")
    first = run_sweep(load_sweep(sweep_file), num_cpus=2)
    assert not first.resumed and first.stored == 2
    old_ids = {row["trial_id"] for row in _trials(tmp_path / "s")}

    spec_raw["space"]["lr"] = {"loguniform": [0.001, 0.002]}
    sweep_file.write_text(yaml.safe_dump(spec_raw), encoding="utf-8")
    capsys.readouterr()
    assert main(["sweep", "--sweep", str(sweep_file), "--num-cpus", "2"]) == 2  # a changed space: refused ...
    assert "'space' changed since sweep 'resume' started" in capsys.readouterr().err
    export = tmp_path / "best.yaml"
    code = main(["sweep", "--sweep", str(sweep_file), "--num-cpus", "2", "--restart", "--export", str(export)])
    out, err = capsys.readouterr()
    assert code == 0, err  # ... unless restarted
    assert "Configuration for experiment" in err and "Configuration for experiment" not in out
    assert out.startswith("resume: ran; 2 trials in the store") and "╭" not in out and "View detailed results" not in out

    trials = _trials(tmp_path / "s")
    assert len({row["trial_id"] for row in trials}) == 4  # the first run's trials stay stored ...
    exported = read_export_identity(export)
    assert exported["trial_id"] not in old_ids  # ... but never enter the ranking or the export
    body = yaml.safe_load(export.read_text(encoding="utf-8"))
    assert 0.001 <= body["lr"] <= 0.002, body["lr"]
    table = [line for line in out.splitlines() if line.startswith("| ") and "_0000" in line]
    assert len(table) == 2 and not any(trial_id in line for line in table for trial_id in old_ids)
    assert any(p.name.startswith("resume.replaced-") for p in (tmp_path / "s" / "ray").iterdir())
