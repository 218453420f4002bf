"""Print a store's single and continual results in the README's table shape, each number with its spread.

One row per method label: for each scenario column group (``single``, ``continual T=10`` by default) every
metric as ``mean ± sd`` over seeds (``mean`` alone with one seed) and Avg. with its 95% paired bootstrap
interval (hierarchical with several seeds: ``kebench leaderboard``'s numbers, same resamples and seed), then
trainable parameters and seconds per edit.  Above the table: the seeds and cases, the code version the cells
recorded, the git commit of this checkout, and every hardware configuration (``kebench.core.numerics``) the
cells ran on, flagged when there is more than one.  ``--noise FILE`` (``kebench noise --json``) adds the
measured numeric noise of one cell below the table.

    .venv/bin/python bench/readme_tables.py --store runs/remeasure
    .venv/bin/python bench/readme_tables.py --store runs/smoke --scenarios single,continual:10 --noise runs/noise.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kebench.core import metrics as metric_registry  # noqa: E402  (after the path: run from a checkout)
from results.bootstrap import AVG  # noqa: E402
from results.leaderboard import leaderboard_groups  # noqa: E402
from results.registry import REFERENCE_LABEL, row_order  # noqa: E402
from results.views import connect, records  # noqa: E402

METRICS = ("rel", "gen", "loc", "por")
_CELLS_SQL = """
SELECT label, any_value(code_version) AS code_version, min(trainable_params) AS params,
       avg(seconds_per_edit / greatest(coalesce("B", 1), 1)) AS seconds_per_edit, count(*) AS cells
FROM cells_latest WHERE status = 'ok' AND model = $model GROUP BY label
"""


def _scenarios(text: str) -> list[tuple[str, int]]:
    out = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, t = item.partition(":")
        out.append((kind, int(t) if t else 1))
    return out


def _value(estimate, with_interval: bool = False) -> str:
    if estimate is None:
        return "–"
    text = f"{estimate.mean:.2f}" + ("" if estimate.sd is None else f" ± {estimate.sd:.2f}")
    return text + (f" [{estimate.low:.2f}, {estimate.high:.2f}]" if with_interval else "")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--benchmark", default="zsre")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", default="teacher_forced")
    parser.add_argument("--scenarios", default="single,continual:10", help="kind[:T], comma-separated")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (as kebench leaderboard's)")
    parser.add_argument("--noise", type=Path, action="append", default=[], help="kebench noise --json output (repeatable)")
    args = parser.parse_args()

    wanted = _scenarios(args.scenarios)
    with connect(args.store) as con:
        groups = leaderboard_groups(con, args.resamples, args.seed)
        cells = {row["label"]: row for row in records(con, _CELLS_SQL, {"model": args.model})}
    chosen = {}
    for group in groups:
        k = group.key
        if (k["model"], k["benchmark"], k["split"], k["protocol"]) == (args.model, args.benchmark, args.split,
                                                                       args.protocol) and (k["scenario"], k["T"]) in wanted:
            chosen[(k["scenario"], k["T"])] = group
    missing = [f"{kind} T={t}" for kind, t in wanted if (kind, t) not in chosen]
    if missing:
        raise SystemExit(f"{args.store}: no {args.model} · {args.benchmark}/{args.split} results for {', '.join(missing)}")

    present = [group for group in chosen.values()]
    seeds = sorted({seed for group in present for seed in group.seeds})
    hardware = sorted({label for group in present for label in group.hardware})
    versions = sorted({str(row["code_version"]) for row in cells.values()})
    print(f"Store {args.store}: {args.model} · {args.benchmark}/{args.split} · {len(seeds)} seed(s) "
          f"({', '.join(map(str, seeds))}) × {max(group.cases for group in present)} cases; code "
          f"{', '.join(versions)} (checkout {_git_commit()}).")
    for label in hardware:
        print(f"Hardware: {label}")
    if len(hardware) > 1:
        print(f"WARNING: these numbers come from {len(hardware)} hardware configurations; they are not comparable "
              "bit for bit.")
    print("Each metric: mean over seeds ± sd over seeds; Avg. with its 95% paired bootstrap interval "
          f"({'seeds, then cases' if len(seeds) > 1 else 'cases'}; {args.resamples} resamples, seed {args.seed}).")
    print()

    header = ["Method"]
    for kind, t in wanted:
        shape = kind if kind == "single" else f"{kind} T={t}"
        header += [f"{shape} {metric_registry.label(METRICS[0])}"] + [metric_registry.label(m) for m in METRICS[1:]]
        header.append("Avg.")
    header += ["# Params", "s/edit"]
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    labels = sorted({entry.label for group in present for entry in group.entries}, key=row_order)
    for label in labels:
        row = [f"{label} (reference)" if label == REFERENCE_LABEL else label]
        for kind, t in wanted:
            entry = next((e for e in chosen[(kind, t)].entries if e.label == label), None)
            estimates = entry.estimates if entry else {}
            row += [_value(estimates.get(metric)) for metric in METRICS]
            value = _value(estimates.get(AVG), with_interval=label != REFERENCE_LABEL)
            row.append(f"**{value}**" if entry is not None and entry.status == "leader" else value)
        stats = cells.get(label, {})
        params = stats.get("params")
        row.append("/" if not params else f"{params:,}")
        per_edit = stats.get("seconds_per_edit")
        row.append("–" if per_edit is None or label == REFERENCE_LABEL else f"{per_edit:.2f}")
        print("| " + " | ".join(row) + " |")
    ties = [f"{entry.label} ({kind if kind == 'single' else f'{kind} T={t}'})" for (kind, t), group in chosen.items()
            for entry in group.entries if entry.status == "tied"]
    if ties:
        print(f"\nTied with the leader (Avg. intervals overlap): {', '.join(ties)}.")
    for path in args.noise:
        report = json.loads(path.read_text())
        avg = [s for s in report["spreads"] if s["metric"] == AVG and s["axis"] != "all"]
        parts = [f"{s['axis']} {s['min']:.2f}–{s['max']:.2f} (sd {s['sd']:.3f}, {len(s['values'])} runs)" for s in avg]
        print(f"\nNumeric noise of {report['cell']} (kebench noise {' '.join(report['edit_args'])}): Avg. over "
              + "; ".join(parts) + ".")


if __name__ == "__main__":
    main()
