"""Scoring seconds per case under teacher forcing and the wild protocol, against the naive full re-run.

For each method (default BaFT, ROME, GRACE, WISE) on SmolLM2: edit the first ZsRE test case (single
editing, not timed), then score the same ``--n`` cases three ways with that editor in place:

* ``teacher_forced``: one forward per batch of ``prompt + " " + target`` rows;
* ``wild``: greedy decoding as the protocol runs it (``benchmarks.decoding``): a KV cache where the
  editor's output at a position depends only on its prefix (plain weights: ROME; fixed-position
  interventions: BaFT), a full re-run per step where it routes on the whole sequence (GRACE, WISE);
* ``wild, re-run``: the naive baseline, every step re-runs the whole sequence for every editor.

The unedited model's wild references (the locality answers) are computed once beforehand, as a grid worker
does, and reported separately.  The two wild runs must give the same scores and generated answers; the
script says so per method.  ``--repeat R`` runs the three R times, interleaved, and reports the median:
a shared machine's speed drifts by tens of percent within minutes.

    .venv/bin/python bench/wild_speed.py                                   # baft, rome, grace, wise; 5 cases
    .venv/bin/python bench/wild_speed.py --methods baft,rome --n 10 --json runs/bench/wild.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="baft,rome,grace,wise")
    parser.add_argument("--n", type=int, default=5, help="ZsRE test cases scored")
    parser.add_argument("--protocol", default="wild", help="the wild protocol's spec, e.g. wild(context=chat)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.decoding import uses_cache
    from benchmarks.evaluate import compute_pre_edit, score_cases
    from benchmarks.protocols import get_protocol
    from benchmarks.registry import select_cases
    from benchmarks.scoring import ScoredModel
    from benchmarks.wild import wild_scores
    from kebench.core.models import configure_threads, load_model
    from methods.base import get_method
    from methods.hparams import load_hparams
    from orchestrator.scenarios import plain_logits

    configure_threads()
    lm = load_model(args.model)
    cases = select_cases("zsre", "test", args.n, 0).cases
    wild = get_protocol(args.protocol)
    tok, pad, device = lm.tokenizer, lm.pad_token_id, lm.device
    seconds, pre = _timed(lambda: compute_pre_edit(plain_logits(lm), tok, pad, device, cases,
                                                   protocols=("teacher_forced", wild.tag)))
    print(f"{args.model}: {len(cases)} ZsRE test cases; unedited references (teacher_forced + {wild.tag}) "
          f"{seconds:.1f} s, torch threads {torch.get_num_threads()}")
    references = pre.reference(wild.tag)
    results = []
    for method in args.methods.split(","):
        hparams = load_hparams(method, lm.name, "single", {})
        torch.manual_seed(args.seed)
        editor = get_method(method)(lm, hparams, args.seed)
        try:
            editor.apply([cases[0]])
            model = ScoredModel(editor.logits, tok, pad, device)
            runs: dict[str, list[float]] = {"teacher_forced": [], "wild": [], "wild_rerun": []}
            outputs = {}
            for _ in range(args.repeat):
                runs["teacher_forced"].append(_timed(lambda: score_cases(editor.logits, tok, pad, device, cases, pre))[0])
                for name, decoding in (("wild", "auto"), ("wild_rerun", "rerun")):
                    elapsed, scores = _timed(lambda: wild_scores(model, cases, references, settings=wild.settings,
                                                                 tag=wild.tag, decoding=decoding))
                    runs[name].append(elapsed)
                    outputs[name] = [(s.values, s.details) for s in scores]
        finally:
            editor.restore()
        per_case = {name: statistics.median(values) / len(cases) for name, values in runs.items()}
        mean_rel = sum(dict(v)["rel"] for v, _ in outputs["wild"]) / len(cases)
        row = {"method": method, "decoding": "KV cache" if uses_cache(editor.logits) else "re-run",
               "tf_s_per_case": per_case["teacher_forced"], "wild_s_per_case": per_case["wild"],
               "wild_rerun_s_per_case": per_case["wild_rerun"],
               "speedup": per_case["wild_rerun"] / per_case["wild"],
               "same_scores": outputs["wild"] == outputs["wild_rerun"], "wild_rel": mean_rel}
        results.append(row)
        print(f"{method:>8}: teacher_forced {row['tf_s_per_case']:.2f} s/case · {wild.tag} ({row['decoding']}) "
              f"{row['wild_s_per_case']:.2f} s/case · naive re-run {row['wild_rerun_s_per_case']:.2f} s/case "
              f"(×{row['speedup']:.1f}) · same scores and answers: {'yes' if row['same_scores'] else 'NO'} · "
              f"wild Rel {mean_rel:.2f}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "n": len(cases), "protocol": wild.tag,
                                         "repeat": args.repeat, "results": results}, indent=2))
    return 0 if all(row["same_scores"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
