"""Seconds per edit and peak memory of editing methods on SmolLM2, against a naive variant, in one run.

Each (method, variant) runs in its own subprocess so its peak RSS is its own.  A variant edits the
same ZsRE test cases (single editing) from the same seed; the first edit is a warm-up and is not
timed.  Every method whose hyperparameters have ``fast_forward`` (BaFT, ReFT, ROME, MEMIT, GRACE, MELO,
WISE, WISE-light) also runs its naive variant (``fast_forward: false``): the full forward pass and
full-vocabulary logits at every optimisation step, where the default runs the frozen prefix below the
edited layer once per edit.  FT-L and AdaLoRA train weights at every depth of their path and have no
such variant.

    .venv/bin/python bench/edit_speed.py                 # every method, 10 cases
    .venv/bin/python bench/edit_speed.py --methods baft,rome --n 5 --json runs/bench/speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_METHODS = "baft,reft,ft-l,adalora,rome,memit,grace,melo,wise,wise-light"
NAIVE = {"fast_forward": False}


def _has_naive_variant(method: str) -> bool:
    import dataclasses

    from methods.base import get_method

    return any(f.name == "fast_forward" for f in dataclasses.fields(get_method(method).hparams_class))


def _worker(method: str, variant: str, n: int, model: str, seed: int) -> dict:
    import torch

    from benchmarks.registry import select_cases
    from methods.base import get_method, load_hparams
    from kebench.core.models import load_model
    from orchestrator.scenarios import peak_rss_mb

    lm = load_model(model)
    overrides = NAIVE if variant == "naive" else {}
    hparams = load_hparams(method, model, "single", overrides)
    cases = select_cases("zsre", "test", n=n + 1).cases
    seconds, steps = [], []
    for index, case in enumerate(cases):
        torch.manual_seed(seed)
        editor = get_method(method)(lm, hparams, seed)
        started = time.perf_counter()
        stats = editor.apply([case])
        elapsed = time.perf_counter() - started
        editor.restore()
        if index > 0:  # the first edit warms up allocator and kernels
            seconds.append(elapsed)
            steps.append(stats.steps)
    return {
        "method": method,
        "variant": variant,
        "median_s_per_edit": statistics.median(seconds),
        "mean_s_per_edit": statistics.fmean(seconds),
        "mean_steps": statistics.fmean(steps),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "n": len(seconds),
    }


def _run_variant(method: str, variant: str, n: int, model: str, seed: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, variant, "--n", str(n), "--model", model, "--seed", str(seed)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"{method}/{variant} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "VARIANT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.n, args.model, args.seed)))
        return
    rows = []
    for method in args.methods.split(","):
        variants = ["fast", "naive"] if _has_naive_variant(method) else ["fast"]
        results = {variant: _run_variant(method, variant, args.n, args.model, args.seed) for variant in variants}
        for variant, row in results.items():
            if "naive" in results:
                row["speedup_vs_naive"] = results["naive"]["median_s_per_edit"] / row["median_s_per_edit"]
            rows.append(row)
    print(f"| method | variant | median s/edit | mean steps | peak RSS (MB) | speed-up vs naive |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        speedup = f"{row['speedup_vs_naive']:.2f}×" if "speedup_vs_naive" in row else "–"
        print(f"| {row['method']} | {row['variant']} | {row['median_s_per_edit']:.2f} | {row['mean_steps']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {speedup} |")
    print(f"\n{args.model}, ZsRE test cases 1–{args.n} (single editing, first edit untimed), "
          f"{rows[0]['threads']} torch threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
