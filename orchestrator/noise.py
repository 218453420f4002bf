"""``kebench noise``: numeric noise as a measured number.

One cell (the arguments of ``kebench edit``) is run again under perturbations that should not change a
result: the ISA level its kernels dispatch to (``--isa native,avx2,avx512``; ``portable`` runs under the
portable numerics), the torch thread count (``--threads 1,2``) and the seed (``--seeds 0,1,2``).  The first
value of each axis is the baseline; each further value is one run that changes that axis alone (one at a
time: the spreads of the axes are read separately, and a run costs as much as the cell).  Each run is a
fresh ``kebench edit`` process, because ATen, MKL and oneDNN fix their floating-point path when they first
run, so a process cannot change its ISA level or thread pool and start clean.

What it reports, per axis (the baseline and the runs that vary that axis) and over all runs: each metric's
mean over cases in every run, then min, max, spread (max - min) and sd (sample sd, ddof 1) over the runs;
and the ISA torch actually dispatched to in each run (a level the CPU lacks falls back to what it has, and
the report says so).  ``--json FILE`` writes runs and spreads for a README or a leaderboard note.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kebench.core import metrics as metric_registry
from kebench.core.errors import KebenchError
from kebench.core.numerics import (ATEN_REPORTS, ISA_LEVELS, NATIVE, NUMERICS_ENV, PORTABLE, PORTABLE_ISA, isa_env,
                                    numerics_env)

AXES = ("isa", "threads", "seed")
ISA_CHOICES = (NATIVE, PORTABLE, *ISA_LEVELS)
#: ``kebench edit`` options the noise command sets itself, per run
OWN_EDIT_OPTIONS = ("--seed", "--out", "--numerics", "--quiet")
AVG = "avg"


@dataclass(frozen=True)
class Perturbation:
    """One run: which axis it varies (``baseline`` for the first) and the ISA level, threads and seed it runs."""

    axis: str
    isa: str
    threads: int
    seed: int

    @property
    def name(self) -> str:
        return f"isa={self.isa} threads={self.threads} seed={self.seed}"

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The run's environment: ``base`` without any numerics setting of its own, then the run's."""
        env = {key: value for key, value in base.items() if key not in NUMERICS_ENV}
        env.update(numerics_env(PORTABLE if self.isa == PORTABLE else NATIVE))
        if self.isa not in (NATIVE, PORTABLE):
            env.update(isa_env(self.isa))
        env["OMP_NUM_THREADS"] = str(self.threads)  # kebench.core.models.configure_threads reads it
        return env

    @property
    def numerics(self) -> str:
        return PORTABLE if self.isa == PORTABLE else NATIVE


def perturbations(isas: Sequence[str], threads: Sequence[int], seeds: Sequence[int]) -> list[Perturbation]:
    """The baseline (the first value of each axis), then one run per further value of each axis."""
    base = Perturbation("baseline", isas[0], threads[0], seeds[0])
    runs = [base]
    runs += [dataclasses.replace(base, axis="isa", isa=value) for value in isas[1:]]
    runs += [dataclasses.replace(base, axis="threads", threads=value) for value in threads[1:]]
    runs += [dataclasses.replace(base, axis="seed", seed=value) for value in seeds[1:]]
    return runs


@dataclass(frozen=True)
class Run:
    perturbation: Perturbation
    #: protocol -> metric (and "avg") -> mean over the run's cases
    means: dict[str, dict[str, float]]
    #: what torch dispatched to and the rest of the run's hardware record
    hardware: dict[str, Any]
    cases: int
    seconds_per_edit: float


@dataclass(frozen=True)
class Spread:
    axis: str  # an axis of AXES, or "all"
    protocol: str
    metric: str
    values: tuple[float, ...]  # one per run, in run order

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> float:
        return self.high - self.low

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def parse_list(text: str, flag: str, cast: Callable[[str], Any], choices: Sequence[Any] | None = None) -> list[Any]:
    """A comma-separated list for ``flag``: values cast, each at most once, each in ``choices``."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = cast(item)
        except ValueError:
            raise KebenchError(f"{flag}: {item!r} is not a valid value") from None
        if choices is not None and value not in choices:
            raise KebenchError(f"{flag}: unknown value {item!r}; known: {', '.join(map(str, choices))}")
        if value in values:
            raise KebenchError(f"{flag}: {item!r} appears twice")
        values.append(value)
    if not values:
        raise KebenchError(f"{flag}: name at least one value")
    return values


def check_edit_arguments(edit_args: Sequence[str]) -> None:
    """The cell's arguments must leave the per-run options to the noise command."""
    for token in edit_args:
        name = token.split("=", 1)[0]
        if name in OWN_EDIT_OPTIONS:
            raise KebenchError(f"kebench noise: {name} is set per run (use --seeds, --isa); leave it out")


def run_one(index: int, perturbation: Perturbation, edit_args: Sequence[str], workdir: Path,
            base_env: Mapping[str, str] | None = None) -> Run:
    """One ``kebench edit`` process under ``perturbation``; its JSON lines summarized per protocol."""
    out = workdir / f"run-{index}.jsonl"
    command = [sys.executable, "-m", "orchestrator.cli", "edit", *edit_args, "--seed", str(perturbation.seed),
               "--numerics", perturbation.numerics, "--out", str(out), "--quiet"]
    done = subprocess.run(command, env=perturbation.env(os.environ if base_env is None else base_env),
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise KebenchError(f"kebench noise: run {perturbation.name} failed (exit {done.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    return summarize_run(perturbation, rows)


def summarize_run(perturbation: Perturbation, rows: Sequence[Mapping[str, Any]]) -> Run:
    """A run's metric means per protocol (and their Avg.), from ``kebench edit --out`` rows."""
    means: dict[str, dict[str, float]] = {}
    for protocol in sorted({row["protocol"] for row in rows}):
        chosen = [row for row in rows if row["protocol"] == protocol]
        by_metric: dict[str, float] = {}
        for metric in metric_registry.metric_names():
            values = [row[metric] for row in chosen if row.get(metric) is not None]
            if values:
                by_metric[metric] = sum(values) / len(values)
        average = metric_registry.average(by_metric)
        if average is not None:
            by_metric[AVG] = average
        means[protocol] = by_metric
    seconds = [row["seconds"] for row in rows if row.get("seconds") is not None]
    hardware = next((row["hardware"] for row in rows if row.get("hardware")), {})
    return Run(perturbation, means, hardware, len({row["case_id"] for row in rows}),
               sum(seconds) / len(seconds) if seconds else math.nan)


def spreads(runs: Sequence[Run]) -> list[Spread]:
    """Per axis that has a run beside the baseline, and over all runs: every (protocol, metric)'s values."""
    groups = [(axis, [run for run in runs if run.perturbation.axis in ("baseline", axis)]) for axis in AXES]
    groups.append(("all", list(runs)))
    out = []
    for axis, chosen in groups:
        if len(chosen) < 2:
            continue
        for protocol in sorted({p for run in chosen for p in run.means}):
            metrics = {m for run in chosen for m in run.means.get(protocol, {})}
            for metric in [*metric_registry.ordered(metrics - {AVG}), *([AVG] if AVG in metrics else [])]:
                values = tuple(run.means[protocol][metric] for run in chosen if metric in run.means.get(protocol, {}))
                if len(values) == len(chosen):
                    out.append(Spread(axis, protocol, metric, values))
    return out


def measure(edit_args: Sequence[str], isas: Sequence[str], threads: Sequence[int], seeds: Sequence[int],
            keep: Path | None = None, on_run: Callable[[int, int, Perturbation], None] | None = None,
            jobs: int = 1) -> list[Run]:
    """Run every perturbation of the cell (``on_run(i, total, perturbation)`` as each starts), ``jobs`` processes
    at a time: the numbers do not depend on what runs beside them, the seconds per edit do."""
    check_edit_arguments(edit_args)
    chosen = perturbations(isas, threads, seeds)
    with tempfile.TemporaryDirectory(prefix="kebench-noise-") as scratch:
        workdir = Path(keep) if keep is not None else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)

        def one(index: int) -> Run:
            if on_run is not None:
                on_run(index, len(chosen), chosen[index])
            return run_one(index, chosen[index], edit_args, workdir)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, range(len(chosen))))


def _label(metric: str) -> str:
    return "Avg." if metric == AVG else metric_registry.label(metric)


def report_markdown(title: str, runs: Sequence[Run]) -> str:
    """The runs (with the ISA each dispatched to) and the spreads, as Markdown tables."""
    protocols = sorted({p for run in runs for p in run.means})
    metrics = metric_registry.ordered({m for run in runs for by in run.means.values() for m in by} - {AVG})
    out = [f"## Numeric noise: {title}", "",
           "| Run | Varies | ISA asked | ISA run | MKL branch | Threads | Seed | Protocol | "
           + " | ".join(_label(m) for m in metrics) + " | Avg. | s/edit |",
           "| --- | --- | --- | --- | --- | ---: | ---: | --- |" + " ---: |" * (len(metrics) + 2)]
    for index, run in enumerate(runs):
        p, hw = run.perturbation, run.hardware
        for protocol in protocols:
            values = run.means.get(protocol, {})
            cells = [f"{values[m]:.4f}" if m in values else "–" for m in [*metrics, AVG]]
            out.append(f"| {index} | {p.axis} | {p.isa} | {hw.get('isa', '?')} | {hw.get('mkl_cnr') or '–'} | "
                       f"{p.threads} | {p.seed} | {protocol} | " + " | ".join(cells) + f" | {run.seconds_per_edit:.2f} |")
    fallbacks = [run for run in runs if _asked_isa(run.perturbation.isa) not in (None, run.hardware.get("isa"))]
    for run in fallbacks:
        out += ["", f"Note: run {runs.index(run)} asked for {run.perturbation.isa} but torch dispatched to "
                    f"{run.hardware.get('isa')}: this CPU lacks it, so that run repeats another level."]
    out += ["", "| Axis | Runs | Protocol | Metric | Min | Max | Spread | SD |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for spread in spreads(runs):
        out.append(f"| {spread.axis} | {len(spread.values)} | {spread.protocol} | {_label(spread.metric)} | "
                   f"{spread.low:.4f} | {spread.high:.4f} | {spread.spread:.4f} | {spread.sd:.4f} |")
    identical = [axis for axis in (*AXES, "all") if _identical(runs, axis)]
    if identical:
        out += ["", "Identical (every metric of every run equal): " + ", ".join(identical) + "."]
    return "\n".join(out)


def _asked_isa(level: str) -> str | None:
    """What torch should report for a level (None: native, any)."""
    if level == NATIVE:
        return None
    return ATEN_REPORTS[PORTABLE_ISA.aten if level == PORTABLE else level]


def _identical(runs: Sequence[Run], axis: str) -> bool:
    chosen = [s for s in spreads(runs) if s.axis == axis]
    return bool(chosen) and all(s.spread == 0.0 for s in chosen)


def report_json(title: str, edit_args: Sequence[str], runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "cell": title,
        "edit_args": list(edit_args),
        "runs": [{**dataclasses.asdict(run.perturbation), "means": run.means, "cases": run.cases,
                  "seconds_per_edit": run.seconds_per_edit, "hardware": run.hardware} for run in runs],
        "spreads": [{"axis": s.axis, "protocol": s.protocol, "metric": s.metric, "values": list(s.values),
                     "min": s.low, "max": s.high, "spread": s.spread, "sd": s.sd} for s in spreads(runs)],
    }


def noise_command(args: Any, edit_args: Sequence[str], parse_edit: Callable[[Sequence[str]], Any]) -> int:
    """``kebench noise``: validate the cell's arguments as ``kebench edit`` would, run, print, write JSON."""
    isas = parse_list(args.isa, "--isa", str, ISA_CHOICES)
    threads = parse_list(args.threads, "--threads", int)
    if any(value < 1 for value in threads):
        raise KebenchError(f"--threads: expected positive integers, got {args.threads!r}")
    seeds = parse_list(args.seeds, "--seeds", int)
    if any(value < 0 for value in seeds):
        raise KebenchError(f"--seeds: expected integers >= 0, got {args.seeds!r}")
    check_edit_arguments(edit_args)
    edit = parse_edit(edit_args)  # the cell's arguments, checked by `kebench edit`'s own parser
    if edit.method is None:
        raise KebenchError("--method is required (kebench list shows the methods)")
    if args.json is not None and args.json.is_dir():
        raise KebenchError(f"--json {args.json} is a directory; name a file")
    shape = f"{edit.scenario}" + (f"(T={edit.T}, B={edit.B})" if (edit.T, edit.B) != (1, 1) else "")
    title = (f"{edit.method} · {edit.model} · {edit.benchmark}/{edit.split} · {shape} · "
             f"n={edit.n if edit.n is not None else 'all'}")
    total = len(perturbations(isas, threads, seeds))
    print(f"kebench noise: {total} runs of {title}", file=sys.stderr)

    def started(index: int, count: int, perturbation: Perturbation) -> None:
        print(f"  run {index + 1}/{count}: {perturbation.name} ({perturbation.axis})", file=sys.stderr, flush=True)

    runs = measure(edit_args, isas, threads, seeds, keep=args.keep, on_run=started, jobs=args.jobs)
    print(report_markdown(title, runs))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json(title, edit_args, runs), indent=1), encoding="utf-8")
    return 0
