"""Grid orchestration overhead: the fixed cost of a small grid, and 8 small cells with 1 worker and with 2.

Fixed cost: the 4-cell tiny grid a new user tries first (tiny random model; ReFT and BaFT × single and
continual T=2; 4 ZsRE dev cases) run as ``kebench grid`` in a fresh process, its wall time split into
the driver's phases (``GridReport.phases``: Python imports and grid expansion before the runner, Ray
start, worker start-up up to the first cell's result, the other cells, store writes, shutdown).

Per-cell overhead: wall time, the sum of the cells' own compute time (measured inside the workers), the
orchestration overhead — worker-time not spent inside a cell: (workers × wall − Σ compute) / (workers × wall),
which includes Ray start-up, worker start-up and model loading — and how many times each worker
loaded the model (the pool keeps it, so this should be 1).

    .venv/bin/python bench/grid_overhead.py [--model smollm2-135m] [--json runs/bench/grid_overhead.json]
    .venv/bin/python bench/grid_overhead.py --fixed-only     # the tiny grid's fixed cost alone (seconds)
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


TINY_GRID = """name: tiny4
store: {store}
resources: {{num_cpus: 1, num_gpus: 0}}
models: [tiny-random-llama]
benchmarks: [{{name: zsre, split: dev, n: 4}}]
scenarios: [{{kind: single}}, {{kind: continual, T: 2}}]
methods: [reft, baft]
seeds: [0]
"""

#: run in a fresh interpreter as `kebench grid` does, timing the imports and the runner's phases
_FIXED_COST_DRIVER = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from orchestrator.grid import expand, load_grid
from orchestrator.runner import run_grid
grid = load_grid(sys.argv[1])
cells = expand(grid)
ready = time.perf_counter()
report = run_grid(grid, Path(grid.store), num_cpus=2)
print(json.dumps({"imports and grid expansion": ready - started, **report.phases,
                  "runner wall": report.wall_seconds, "cells": report.ok, "failed": report.failed,
                  "sum_cell_compute_s": report.compute_seconds}))
"""


def fixed_cost() -> dict:
    """The tiny 4-cell grid: ``kebench grid`` wall time in a fresh process, and the same grid's phases."""
    import subprocess
    import time

    with tempfile.TemporaryDirectory() as tmp:
        grid_file = Path(tmp) / "tiny4.yaml"
        grid_file.write_text(TINY_GRID.format(store=Path(tmp) / "cli-store"))
        started = time.perf_counter()
        kebench = Path(sys.executable).parent / "kebench"
        done = subprocess.run([str(kebench), "grid", "--grid", str(grid_file), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True)
        cli_wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"kebench grid failed:\n{done.stderr[-2000:]}")
        grid_file.write_text(TINY_GRID.format(store=Path(tmp) / "phases-store"))
        started = time.perf_counter()
        driver = subprocess.run([sys.executable, "-c", _FIXED_COST_DRIVER, str(grid_file)], cwd=ROOT,
                                capture_output=True, text=True)
        driver_wall = time.perf_counter() - started
        if driver.returncode != 0:
            raise SystemExit(f"tiny grid driver failed:\n{driver.stderr[-2000:]}")
    phases = json.loads(driver.stdout.strip().splitlines()[-1])
    return {"kebench_grid_wall_s": cli_wall, "driver_wall_s": driver_wall, "phases": phases}


def print_fixed_cost(row: dict) -> None:
    phases = row["phases"]
    print(f"Fixed cost: the 4-cell tiny grid (ReFT, BaFT × single, continual T=2; 4 cases), "
          f"`kebench grid` in a fresh process: {row['kebench_grid_wall_s']:.1f} s wall "
          f"({phases['cells']} cells ok, Σ cell compute {phases['sum_cell_compute_s']:.1f} s)")
    print("| phase (a second run of the same grid) | seconds |")
    print("|---|---:|")
    print(f"| interpreter start-up | {row['driver_wall_s'] - phases['imports and grid expansion'] - phases['runner wall']:.1f} |")
    for name in ("imports and grid expansion", "ray start", "statistics", "first cell result", "other cells",
                 "shutdown"):
        if name in phases:
            print(f"| {name} | {phases[name]:.1f} |")
    print(f"| (store writes, inside the cell phases) | {phases.get('store writes', 0.0):.2f} |")
    print(f"| **total** | **{row['driver_wall_s']:.1f}** |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fixed-only", action="store_true", help="only the tiny grid's fixed cost")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    fixed = fixed_cost()
    print_fixed_cost(fixed)
    if args.fixed_only:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"fixed_cost": fixed}, indent=2))
        return
    rows = [measure(args.model, workers) for workers in (1, 2)]
    print("| workers | cells | wall (s) | Σ cell compute (s) | overhead | model loads per worker |")
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['cells']} | {row['wall_s']:.1f} | {row['sum_cell_compute_s']:.1f} | "
              f"{row['overhead_pct']:.0f}% | {row['model_loads_per_worker']} |")
    print(f"\nspeed-up 1 → 2 workers: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}× ({args.model}, 8 single-editing cells of 2 ZsRE cases)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"fixed_cost": fixed, "per_cell": rows}, indent=2))


if __name__ == "__main__":
    main()
