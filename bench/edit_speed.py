"""Seconds per edit and peak memory of editing methods on SmolLM2, against a naive variant, in one run.

Each (method, variant) runs in its own subprocess so its peak RSS is its own.  A variant edits the
same ZsRE test cases (single editing) from the same seed; the first edit is a warm-up and is not
timed.  Every method whose hyperparameters have ``fast_forward`` (BaFT, ReFT, ROME, MEMIT, GRACE, MELO,
WISE, WISE-light) also runs its naive variant (``fast_forward: false``): the full forward pass and
full-vocabulary logits at every optimisation step, where the default runs the frozen prefix below the
edited layer once per edit.  FT-L and AdaLoRA train weights at every depth of their path and have no
such variant.

``--throughput`` measures case-parallel single editing instead (the single scenario's ``parallel_cases``):
BaFT and ReFT (or any ``--methods`` with a case-parallel path: FT-L, FT-M) edit the same ZsRE test cases at
K = 1 (one by one, the naive baseline) and at each K of ``--parallel`` (K cases training at once; BaFT and
ReFT give a stopped case's place to the next case, FT-L/FT-M train chunks of K), through ``run_scenario`` as
a grid cell would, after one untimed warm-up edit; it reports the editing time summed over the cases
(amortised s/edit, edits per second), the wall time with evaluation, and the peak RSS of the process.
``--repeat R`` runs every K R times, interleaved, and reports the median run: a shared machine's speed drifts
by tens of percent within minutes.

    .venv/bin/python bench/edit_speed.py                 # every method, 10 cases
    .venv/bin/python bench/edit_speed.py --methods baft,rome --n 5 --json runs/bench/speed.json
    .venv/bin/python bench/edit_speed.py --throughput --methods baft,reft,ft-l --n 20 --parallel 1,5,10,20
    .venv/bin/python bench/edit_speed.py --throughput --methods baft,reft --n 20 --parallel 1,10,20 --repeat 3
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
    from methods.base import get_method
    from methods.hparams import load_hparams
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
    device = str(lm.device) + (f" ({torch.cuda.get_device_name(lm.device)})" if lm.device.type == "cuda" else "")
    return {
        # what `kebench plan --edit-speed FILE` reads: model, method, scenario, seconds_per_edit, device
        "model": model,
        "method": method,
        "scenario": "single",
        "seconds_per_edit": statistics.median(seconds),
        "device": device,
        "variant": variant,
        "median_s_per_edit": statistics.median(seconds),
        "mean_s_per_edit": statistics.fmean(seconds),
        "mean_steps": statistics.fmean(steps),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "n": len(seconds),
    }


def _throughput_worker(method: str, parallel: int, n: int, model: str, seed: int) -> dict:
    import torch

    from benchmarks.evaluate import compute_pre_edit
    from benchmarks.registry import select_cases
    from methods.hparams import load_hparams
    from kebench.core.models import load_model
    from orchestrator.scenarios import Scenario, peak_rss_mb, plain_logits, run_scenario

    lm = load_model(model)
    hparams = load_hparams(method, model, "single", {})
    selected = select_cases("zsre", "test", n=n + 1).cases
    cases, warm_up = selected[:n], selected[n:]
    pre = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, selected)
    run_scenario(lm, method, hparams, warm_up, Scenario("single"), seed, pre=pre)
    started = time.perf_counter()
    result = run_scenario(lm, method, hparams, cases, Scenario("single", parallel_cases=parallel), seed, pre=pre)
    wall = time.perf_counter() - started
    editing = sum(result.edit_seconds)
    return {"model": model, "method": method, "scenario": "single", "parallel_cases": parallel,
            "edit_seconds": editing, "seconds_per_edit": editing / n, "edits_per_second": n / editing,
            "wall_with_eval_s": wall, "mean_steps": statistics.fmean(c.steps for c in result.cases),
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "n": n,
            "scores": {c.case_id: c.scores.as_dict() for c in result.cases}}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median editing time (ties: the faster), annotated with every run's time and the
    largest peak RSS; the runs must agree on every score (one seed fixes the result)."""
    ordered = sorted(runs, key=lambda run: run["edit_seconds"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if any(run["scores"] != runs[0]["scores"] for run in runs):
        raise SystemExit(f"{row['method']} K={row['parallel_cases']}: repeated runs gave different scores")
    row["runs_edit_seconds"] = [run["edit_seconds"] for run in runs]
    row["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    return row


def _throughput(methods: list[str], ks: list[int], n: int, model: str, seed: int, repeat: int = 1) -> list[dict]:
    rows = []
    for method in methods:
        # Interleaved (K=1, K=a, K=b, K=1, ...), so a slow spell of a shared machine hits every K alike.
        runs: dict[int, list[dict]] = {k: [] for k in ks}
        for _ in range(repeat):
            for k in ks:
                runs[k].append(_run_variant(method, f"parallel:{k}", n, model, seed))
        base = None
        for k in ks:
            row = _median_run(runs[k])
            base = base or row
            row["speedup_vs_k1"] = base["seconds_per_edit"] / row["seconds_per_edit"]
            row["same_scores_as_k1"] = all(
                {m: round(v, 2) for m, v in scores.items()} == {m: round(v, 2) for m, v in base["scores"][case].items()}
                for case, scores in row["scores"].items())
            rows.append(row)
    print("| method | K | edit s (total) | s/edit (amortised) | edits/s | speed-up vs K=1 | wall with eval (s) | "
          "mean steps | peak RSS (MB) | scores = K=1 (2 dp) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['method']} | {row['parallel_cases']} | {row['edit_seconds']:.1f} | {row['seconds_per_edit']:.2f} | "
              f"{row['edits_per_second']:.2f} | {row['speedup_vs_k1']:.2f}× | {row['wall_with_eval_s']:.1f} | "
              f"{row['mean_steps']:.1f} | {row['peak_rss_mb']:.0f} | {'yes' if row['same_scores_as_k1'] else 'NO'} |")
    print(f"\n{model}, ZsRE test cases 1–{n}, single editing (one untimed warm-up edit first), "
          f"{rows[0]['threads']} torch threads; K = 1 is the one-by-one baseline, run in the same invocation")
    if repeat > 1:
        print(f"each K ran {repeat} times, interleaved with the others; the row is the run with the median editing time "
              "(edit s of every run: " + "; ".join(
                  f"{row['method']} K={row['parallel_cases']}: " + ", ".join(f"{t:.1f}" for t in row["runs_edit_seconds"])
                  for row in rows) + "); peak RSS is the largest of the runs")
    if ks[0] != 1:
        print("note: the first K is the baseline; pass --parallel 1,... to compare against one-by-one editing")
    return rows


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
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the rows as JSON (kebench plan --edit-speed reads them)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "VARIANT"))
    parser.add_argument("--throughput", action="store_true",
                        help="case-parallel single-editing throughput (default BaFT, ReFT) at each K of --parallel")
    parser.add_argument("--parallel", default="1,5,10,20", help="K values for --throughput (the first is the baseline)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="--throughput: run each K this many times, interleaved, and report the median run")
    args = parser.parse_args()
    if args.worker:
        method, variant = args.worker
        if variant.startswith("parallel:"):
            print(json.dumps(_throughput_worker(method, int(variant.split(":", 1)[1]), args.n, args.model, args.seed)))
        else:
            print(json.dumps(_worker(method, variant, args.n, args.model, args.seed)))
        return
    if args.throughput:
        methods = args.methods.split(",") if args.methods != DEFAULT_METHODS else ["baft", "reft"]
        if args.repeat < 1:
            parser.error(f"--repeat must be >= 1, got {args.repeat}")
        rows = _throughput(methods, [int(k) for k in args.parallel.split(",")], args.n, args.model, args.seed, args.repeat)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2))
        return
    rows = []
    for method in args.methods.split(","):
        variants = ["fast", "naive"] if _has_naive_variant(method) else ["fast"]
        results = {variant: _run_variant(method, variant, args.n, args.model, args.seed) for variant in variants}
        for variant, row in results.items():
            if "naive" in results:
                row["speedup_vs_naive"] = results["naive"]["median_s_per_edit"] / row["median_s_per_edit"]
            rows.append(row)
    print("| method | variant | median s/edit | mean steps | peak RSS (MB) | speed-up vs naive |")
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
