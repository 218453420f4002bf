"""What portable numerics cost: seconds per edit (and per optimisation step) under native and portable numerics.

Each variant runs ``kebench edit`` in a fresh process (ATen, MKL and oneDNN fix their floating-point path when
they first run), with the grid workers' layout: one torch thread per process unless ``--threads`` says
otherwise (``OMP_NUM_THREADS``, which a one-CPU Ray worker gets), single editing of the same ZsRE test cases
from the same seed.  The first case of every run is a warm-up and is not timed.  ``--repeat R`` runs the
variants R times, interleaved (native, portable, native, portable, ...), and reports the median run: a shared
machine's speed drifts by tens of percent within minutes.

Variants (``kebench noise --isa`` levels): ``native`` (the CPU's best kernels), ``portable`` (ATen at AVX2,
MKL's COMPATIBLE branch, oneDNN at AVX2: ``kebench.core.numerics``), and for comparison ``avx2`` (ATen, MKL
and oneDNN all at AVX2, native numerics: MKL honours ``MKL_CBWR=AVX2`` on Intel processors only) or
``default``/``avx512``.  s/step separates the kernels' cost from a change in how many steps the edits took
(numerics can flip early stopping); the ratio column is each variant's median s/edit over native's.

    .venv/bin/python bench/numerics_cost.py                                   # BaFT, SmolLM2, 6 cases, 1 thread
    .venv/bin/python bench/numerics_cost.py --n 6 --repeat 3 --json runs/bench/numerics-cost.json
    .venv/bin/python bench/numerics_cost.py --variants native,portable,avx2 --method reft --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.noise import ISA_CHOICES, Perturbation  # noqa: E402  (after the path: run from a checkout)


def run_variant(variant: str, args: argparse.Namespace, workdir: Path, index: int) -> dict:
    """One ``kebench edit`` process under ``variant``; its per-case seconds and steps, warm-up case left out."""
    perturbation = Perturbation("isa", variant, args.threads, args.seed)
    out = workdir / f"{variant}-{index}.jsonl"
    command = [sys.executable, "-m", "orchestrator.cli", "edit", "--model", args.model, "--method", args.method,
               "--benchmark", "zsre", "--split", "test", "--scenario", "single", "--n", str(args.n + 1),
               "--seed", str(args.seed), "--numerics", perturbation.numerics, "--out", str(out), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=perturbation.env(os.environ), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant}: kebench edit failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    timed = rows[1:]  # the first case warms up allocator and kernels
    seconds = sum(row["seconds"] for row in timed)
    steps = sum(row["steps"] for row in timed)
    hardware = rows[0]["hardware"]
    return {"variant": variant, "run": index, "seconds_per_edit": seconds / len(timed),
            "seconds_per_step": seconds / max(steps, 1), "steps": steps, "wall_seconds": time.perf_counter() - started,
            "isa": hardware["isa"], "mkl_cnr": hardware.get("mkl_cnr"), "threads": hardware["threads"],
            "rel": statistics.mean(row["rel"] for row in timed), "hardware": hardware}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="baft")
    parser.add_argument("--n", type=int, default=6, help="timed cases (one more runs first, untimed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (a grid worker's num_cpus)")
    parser.add_argument("--variants", default="native,portable",
                        help=f"comma-separated, the first the baseline: {', '.join(ISA_CHOICES)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, interleaved; the median is reported")
    parser.add_argument("--json", type=Path, default=None, help="also write every run as JSON")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ISA_CHOICES]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(ISA_CHOICES)}")

    runs = []
    with tempfile.TemporaryDirectory(prefix="kebench-numerics-cost-") as scratch:
        for index in range(args.repeat):
            for variant in variants:
                print(f"run {index + 1}/{args.repeat}: {variant}", file=sys.stderr, flush=True)
                runs.append(run_variant(variant, args, Path(scratch), index))

    def median(variant: str, key: str) -> float:
        return statistics.median(run[key] for run in runs if run["variant"] == variant)

    baseline = median(variants[0], "seconds_per_edit")
    first = runs[0]["hardware"]
    print(f"{args.method} single editing on {args.model}, {args.n} timed cases (seed {args.seed}), {args.threads} torch "
          f"thread(s) per process, median of {args.repeat} run(s); CPU {first['cpu']}, torch {first['torch']}")
    print()
    print(f"| Numerics | ISA | MKL branch | s/edit | s/step | steps | Rel. | × {variants[0]} |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for variant in variants:
        one = next(run for run in runs if run["variant"] == variant)
        per_edit = median(variant, "seconds_per_edit")
        print(f"| {variant} | {one['isa']} | {one['mkl_cnr'] or '–'} | {per_edit:.2f} | "
              f"{median(variant, 'seconds_per_step'):.3f} | {one['steps']} | {one['rel']:.2f} | {per_edit / baseline:.2f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1,
                                        default=str))


if __name__ == "__main__":
    main()
