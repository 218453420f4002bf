"""Ray Tune sweeps: validation errors, and a two-trial grid search on the tiny model."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from kebench.core.errors import KebenchError
from orchestrator.sweep import best_yaml, load_sweep, parse_sweep, run_sweep

BASE = {
    "name": "t", "model": "tiny-random-llama", "method": "baft",
    "benchmark": {"name": "zsre", "split": "dev", "n": 2}, "scenario": {"kind": "continual", "T": 1},
    "metric": "avg", "samples": 1, "space": {"rank": {"grid": [2, 4]}},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"rnak": {"grid": [2]}}}, "space.rnak: not a hyperparameter of baft"),
        ({"space": {"rank": {"normal": [2]}}}, "space.rank must be one of"),
        ({"benchmark": {"name": "zsre", "split": "test", "n": 2}}, "benchmark.split must be 'dev'"),
        ({"metric": "speed"}, "metric 'speed' unknown"),
        ({"scenario": {"kind": "continual", "T": 0}}, "T must be a positive integer"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"methd": "baft"}, "unknown key 'methd'"),
    ],
)
def test_bad_sweeps_name_the_key(change, message):
    with pytest.raises(KebenchError, match=message):
        parse_sweep({**BASE, **change}, "s.yaml")


def test_shipped_sweep_files_load():
    spec = load_sweep("sweeps/baft-margins.yaml")
    assert spec.method == "baft" and spec.split == "dev" and {name for name, _, _ in spec.space} >= {"alpha", "rank"}


def test_grid_search_runs_every_trial_and_writes_parquet(tmp_path):
    spec = parse_sweep({**BASE, "store": str(tmp_path / "sweep"), "space": {"rank": {"grid": [2, 4]},
                                                                            "max_steps": {"choice": [3]}}}, "s.yaml")
    results = run_sweep(spec, num_cpus=2)
    assert len(results) == 2 and not results.errors
    table = pq.read_table(tmp_path / "sweep" / "trials.parquet").to_pydict()
    assert sorted(table["config/rank"]) == [2, 4]
    assert all(0.0 <= value <= 1.0 for value in table["avg"])
    assert "rank:" in best_yaml(results, spec)
