"""Grid orchestration overhead: 8 small cells with 1 worker and with 2, on a local Ray instance.

Reports wall time, the sum of the cells' own compute time (measured inside the workers), the
orchestration overhead — worker-time not spent inside a cell: (workers × wall − Σ compute) / (workers × wall),
which includes Ray start-up, worker start-up and model loading — and how many times each worker
loaded the model (the pool keeps it, so this should be 1).

    .venv/bin/python bench/grid_overhead.py [--model smollm2-135m] [--json runs/bench/grid_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def grid_spec(model: str, store: str) -> dict:
    return {
        "name": "overhead",
        "store": store,
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "models": [model],
        "benchmarks": [{"name": "zsre", "split": "test", "n": 2}],
        "scenarios": [{"kind": "single"}],
        "methods": ["reft", "baft"],
        "seeds": [0, 1, 2, 3],
    }


def measure(model: str, workers: int) -> dict:
    from orchestrator.grid import parse_grid
    from orchestrator.runner import run_grid

    with tempfile.TemporaryDirectory() as tmp:
        grid = parse_grid(grid_spec(model, str(Path(tmp) / "store")), source="bench/grid_overhead.py")
        report = run_grid(grid, Path(tmp) / "store", workers=workers, num_cpus=2)
    worker_seconds = workers * report.wall_seconds
    return {
        "workers": workers,
        "cells": report.ok + report.failed,
        "failed": report.failed,
        "wall_s": report.wall_seconds,
        "sum_cell_compute_s": report.compute_seconds,
        "overhead_pct": 100.0 * (worker_seconds - report.compute_seconds) / worker_seconds,
        "model_loads_per_worker": sorted(report.loads_per_worker.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    rows = [measure(args.model, workers) for workers in (1, 2)]
    print("| workers | cells | wall (s) | Σ cell compute (s) | overhead | model loads per worker |")
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['cells']} | {row['wall_s']:.1f} | {row['sum_cell_compute_s']:.1f} | "
              f"{row['overhead_pct']:.0f}% | {row['model_loads_per_worker']} |")
    print(f"\nspeed-up 1 → 2 workers: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}× ({args.model}, 8 single-editing cells of 2 ZsRE cases)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
