"""The ``kebench`` command line.

Each command imports the layers it needs inside its own function: torch comes with the methods and
models, Ray with grids and sweeps, pyarrow and DuckDB with the store, and ``kebench --help`` or a usage
error must not wait seconds for any of them.  Those imports are the only function-level ones here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from kebench.core.errors import KebenchError, RunError
from kebench.core.numerics import DEFAULT_NUMERICS, NUMERICS_CHOICES, PORTABLE, apply_numerics, numerics_env
from kebench.core.scenarios import is_scenario, scenario_names
from orchestrator._config import MAX_SEED


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value




def _resamples(text: str) -> int:
    from results.bootstrap import MAX_RESAMPLES

    value = _positive_int(text)
    if value > MAX_RESAMPLES:  # 10**7 took 1.9 GB on four cases (issue 31)
        raise argparse.ArgumentTypeError(f"expected at most {MAX_RESAMPLES:,}, got {value:,}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED} (stored as a 64-bit integer), got {value}")
    return value


def _gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kebench", description="Benchmark knowledge-editing methods for LLMs.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback behind a one-line error (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    edit = sub.add_parser("edit", help="run one method on one benchmark and scenario, print Rel/Gen/Loc/Por")
    edit.add_argument("--model", default="smollm2-135m",
                      help="a registered model (kebench list), hf:<repo id>[@<revision>] or path:<folder>")
    edit.add_argument("--benchmark", default="zsre")
    edit.add_argument("--split", default="test", help="dev (tuning), test (reporting) or all")
    edit.add_argument("--method", default=None, help="the editing method (required; kebench list shows them)")
    edit.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (float32 on a CPU; on a GPU "
                      "bfloat16 for half-precision checkpoints, with ROME/MEMIT/FT's edited layers in float32)")
    edit.add_argument("--scenario", default="single", help=f"{', '.join(scenario_names())}")
    edit.add_argument("--T", type=_positive_int, default=1, help="edit calls per stream (continual, batched)")
    edit.add_argument("--B", type=_positive_int, default=1, help="cases per edit call (batched)")
    edit.add_argument("--downstream", default=None,
                      help="a downstream check scored after each stream and on the unedited model, e.g. piqa")
    edit.add_argument("--downstream-n", type=_positive_int, default=None, help="items of the downstream check")
    edit.add_argument("--scenario-param", dest="scenario_params", type=_override, action="append", default=[],
                      metavar="KEY=VALUE", help="a parameter of the scenario kind beyond T and B (repeatable)")
    edit.add_argument("--protocol", dest="protocols", action="append", default=[], metavar="PROTOCOL",
                      help="score under this protocol (repeatable; default teacher_forced; the method may add its own): "
                           "teacher_forced, generation, wild, or wild(context=qa|chat,max_new_tokens=N,intervene_generated=false)")
    edit.add_argument("--parallel-cases", type=_positive_int, default=1, metavar="K",
                      help="single editing: keep K independent edits training at once in one batch (BaFT, ReFT, FT-L, FT-M; the same training, rounded differently)")
    edit.add_argument("--n", type=_positive_int, default=None, help="number of cases (default: the whole split)")
    edit.add_argument("--offset", type=int, default=0)
    edit.add_argument("--seed", type=_seed, default=0)
    edit.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                      help="override a hyperparameter (repeatable)")
    edit.add_argument("--hparams", type=Path, default=None, help="hyperparameter YAML instead of methods/hparams/<method>/<model>.yaml")
    edit.add_argument("--data-dir", default=None)
    edit.add_argument("--device", default=None)
    edit.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS_CHOICES,
                      help=f"floating-point path: native (the CPU's best kernels) or portable (AVX2 kernels and MKL's "
                           f"COMPATIBLE branch: the same numbers on any x86-64 CPU with AVX2); default {DEFAULT_NUMERICS}")
    edit.add_argument("--out", type=Path, default=None,
                      help="write one JSON object per case (JSON lines), each with the hardware record")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")

    noise = sub.add_parser("noise", allow_abbrev=False,
                           help="re-run one cell (kebench edit's arguments) under ISA levels, thread counts and seeds; "
                                "print each metric's spread")
    noise.add_argument("--isa", default="native",
                       help="comma-separated ISA levels, the first the baseline: native, portable, default, avx2, avx512")
    noise.add_argument("--threads", default="1", help="comma-separated torch thread counts, the first the baseline")
    noise.add_argument("--seeds", default="0", help="comma-separated seeds, the first the baseline")
    noise.add_argument("--json", type=Path, default=None, help="also write runs and spreads as JSON")
    noise.add_argument("--keep", type=Path, default=None, help="keep each run's JSON lines in this folder")
    noise.add_argument("--jobs", type=_positive_int, default=1,
                       help="runs at a time (each a kebench edit process; its s/edit then includes the sharing)")

    grid = sub.add_parser("grid", help="run a grid file's cells as Ray tasks into a Parquet store")
    add_grid_arguments(grid)

    table = sub.add_parser("table", help="render a paper-shaped table from a result store")
    table.add_argument("--store", type=Path, required=True)
    table.add_argument("--table", default="continual",
                       help="single, continual, batched, params, downstream, protocols (teacher-forced beside wild), "
                            "or a table a plug-in registered")
    table.add_argument("--format", dest="fmt", default="md", help="md, latex, csv or html")

    sweep = sub.add_parser("sweep", help="tune a method's hyperparameters on a dev split with Ray Tune")
    sweep.add_argument("--sweep", type=Path, required=True, help="sweep YAML (see sweeps/)")
    sweep.add_argument("--ray-address", default=None, help="join a running Ray cluster ('auto' on a cluster head)")
    sweep.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs for a local Ray instance")
    sweep.add_argument("--num-gpus", type=_gpus, default=None,
                       help="GPUs for a local Ray instance (default: CUDA devices; >0 on a CPU machine is bookkeeping)")
    sweep.add_argument("--data-dir", default=None)
    sweep.add_argument("--restart", action="store_true", help="start afresh instead of resuming the sweep's Tune experiment")
    sweep.add_argument("--export", type=Path, default=None,
                       help="write the chosen configuration as a hyperparameter YAML (usable as a grid's hparams_file)")

    stats = sub.add_parser("stats", help="compute and cache second-moment statistics (ROME/MEMIT) for a model")
    stats.add_argument("--model", default="smollm2-135m")
    stats.add_argument("--layers", required=True, help="comma-separated 0-based decoder layers, e.g. 4,5,6")
    stats.add_argument("--corpus", default="shared-offline",
                       help="shared-offline, wikipedia, or hf:<dataset>[@<config>] (needs the datasets package)")
    stats.add_argument("--n", type=_positive_int, required=True, help="number of texts (articles) to read")
    stats.add_argument("--dtype", default="float32", help="precision the statistics are stored in")
    stats.add_argument("--data-dir", default=None)
    stats.add_argument("--device", default=None)
    stats.add_argument("--force", action="store_true", help="recompute even if cached")

    board = sub.add_parser("leaderboard", help="write leaderboard.md and a self-contained leaderboard.html from a store")
    board.add_argument("--store", type=Path, required=True)
    board.add_argument("--out", type=Path, default=None, help="output folder (default: <store>/leaderboard)")
    board.add_argument("--resamples", type=_resamples, default=1000,
                       help="bootstrap resamples for the 95%% intervals (1..100,000)")
    board.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    plan = sub.add_parser("plan", help="what a grid will cost: edits, seconds per edit, GPU-hours, wall time on N workers")
    plan.add_argument("--grid", type=Path, required=True, help="grid YAML (see grids/)")
    plan.add_argument("--store", type=Path, default=None, help="result store (default: the grid's 'store'); "
                      "its cells cost 0 and its timings come first")
    plan.add_argument("--from-store", type=Path, action="append", default=[], metavar="DIR",
                      help="another store to take timings from (repeatable)")
    plan.add_argument("--edit-speed", type=Path, action="append", default=[], metavar="FILE",
                      help="timings written by bench/edit_speed.py --json (repeatable)")
    plan.add_argument("--workers", type=_positive_int, default=4,
                      help="concurrent cells for the wall time (default 4: cluster.yaml's GPU pool)")
    plan.add_argument("--rerun-failed", action="store_true", help="price failed cells too, as kebench grid --rerun-failed runs them")
    plan.add_argument("--data-dir", default=None)
    plan.add_argument("--format", dest="fmt", default="md", help="md, csv or json")

    show = sub.add_parser("hparams", help="print the hyperparameters a method would use on a model, and where they come from")
    show.add_argument("--method", required=True)
    show.add_argument("--model", default="smollm2-135m",
                      help="a registered model, hf:<repo id>[@<revision>] or path:<folder>")
    show.add_argument("--scenario", default="single",
                      help=f"{', '.join(scenario_names())} (selects a YAML's scenario block)")
    show.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                      help="override a hyperparameter (repeatable)")
    show.add_argument("--hparams", type=Path, default=None, help="hyperparameter YAML instead of the method's own")

    sub.add_parser("list", help="list registered models, benchmarks, methods (with their source) and plug-in failures")
    add_data_parser(sub)
    return parser


def add_data_parser(sub: Any) -> None:
    """``kebench data fetch|status`` (the work is in ``benchmarks.fetch``)."""
    data = sub.add_parser("data", help="fetch benchmark files from their pinned sources; show where each is read from")
    actions = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = actions.add_parser("fetch", help="download, sha256-check and cache the files of benchmarks")
    fetch.add_argument("--benchmark", action="append", default=[], metavar="NAME",
                       help="a benchmark, piqa or shared-offline (repeatable)")
    fetch.add_argument("--all", action="store_true", help="every file in the manifest")
    fetch.add_argument("--dest", type=Path, default=None, help="fetch into DIR (default: ~/.cache/kebench/data)")
    status = actions.add_parser("status", help="each benchmark's files: where each is read from, verified, or missing")
    status.add_argument("--benchmark", action="append", default=[], metavar="NAME")
    status.add_argument("--data-dir", default=None)


def _data(args: argparse.Namespace) -> int:
    from benchmarks.data import resolve_data_dir
    from benchmarks.fetch import fetch, select_entries, status_lines

    if args.data_command == "fetch":
        fetch(select_entries(args.benchmark, args.all), args.dest, report=lambda line: print(line, flush=True))
        return 0
    if args.benchmark:
        select_entries(args.benchmark, False)  # an unknown name is an error here too
    print("\n".join(status_lines(resolve_data_dir(args.data_dir), args.benchmark)))
    return 0


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", type=Path, required=True, help="grid YAML (see grids/)")
    parser.add_argument("--store", type=Path, default=None, help="result store (default: the grid's 'store')")
    parser.add_argument("--rerun-failed", action="store_true", help="also re-run cells whose latest attempt failed")
    parser.add_argument("--force", action="store_true", help="re-run every cell (new attempts; old ones are kept)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="at most this many concurrent cells")
    parser.add_argument("--ray-address", default=None, help="join a running Ray cluster ('auto' on a cluster head)")
    parser.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs for a local Ray instance")
    parser.add_argument("--num-gpus", type=_gpus, default=None,
                        help="GPUs for a local Ray instance (default: CUDA devices; >0 on a CPU machine is bookkeeping)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tables", default="single,continual,batched,params",
                        help="tables to print when the grid finishes (comma-separated, or 'none')")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "noise":  # only `kebench noise` passes arguments on (to kebench edit)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "edit":
            with _numerics_environment(args, own_process=argv is None):
                return _edit(args)
        if args.command == "noise":
            from orchestrator.noise import noise_command  # subprocesses only: no torch here

            return noise_command(args, extra, lambda tokens: _edit_parser(parser).parse_args([*tokens]))
        if args.command == "list":
            return _list()
        if args.command == "hparams":
            return _hparams(args)
        if args.command == "grid":
            return run_grid_command(args)
        if args.command == "table":
            return _table(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "leaderboard":
            return _leaderboard(args)
        if args.command == "plan":
            from orchestrator.plan import plan_command  # torch and DuckDB: off the start-up path

            return plan_command(args)
        if args.command == "data":
            return _data(args)
    except KebenchError as exc:
        _debug_traceback(args)
        print(f"kebench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except RunError as exc:  # found only while working (an inexact restore): one line, like a failed cell
        _debug_traceback(args)
        print(f"kebench: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kebench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "NonFiniteError":  # methods.base: an edit diverged (not a bug, not bad input)
            _debug_traceback(args)
            print(f"kebench: error: non-finite: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        if _out_of_memory(exc):  # found only while working, like a failed cell's "out of memory: ..."
            _debug_traceback(args)
            print(f"kebench: error: out of memory: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                  file=sys.stderr)
            return 1
        raise
    return 0


def _out_of_memory(exc: BaseException) -> bool:
    """``orchestrator.cell.is_out_of_memory``, asked only where torch is loaded already (it imports torch)."""
    if "torch" not in sys.modules:
        return isinstance(exc, MemoryError)
    from orchestrator.cell import is_out_of_memory

    return is_out_of_memory(exc)


def _edit_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``kebench edit``'s own parser (``kebench noise`` checks the cell's arguments with it)."""
    actions = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return actions.choices["edit"]


#: set in a ``kebench edit`` process that re-executed itself for its numerics (it must not do so twice)
_REEXEC_ENV = "KEBENCH_NUMERICS_REEXEC"


@contextlib.contextmanager
def _numerics_environment(args: argparse.Namespace, own_process: bool):
    """``--numerics``'s environment, set before anything imports torch (ATen, MKL and oneDNN read it when they
    first run).  Called in another program's process (``main(argv)``), the environment is put back afterwards:
    that process's later work must not claim numerics it was not started under."""
    saved = {name: os.environ.get(name) for name in numerics_env(args.numerics)}
    args.torch_was_loaded = apply_numerics(args.numerics)
    args.own_process = own_process
    try:
        yield
    finally:
        if not own_process:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _enter_numerics(args: argparse.Namespace) -> None:
    """Check that the process computes under ``--numerics``.  Where torch was loaded before the settings were
    made (a plug-in imported at start-up) and the check fails, the ``kebench`` process starts itself again with
    the settings in its environment, once; otherwise the failed check is a one-line error."""
    from kebench.core.numerics import verify_numerics  # torch: off the command line's start-up path

    try:
        verify_numerics(args.numerics)
    except KebenchError:
        if (getattr(args, "torch_was_loaded", False) and getattr(args, "own_process", False)
                and args.numerics == PORTABLE and not os.environ.get(_REEXEC_ENV)):
            os.environ[_REEXEC_ENV] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        raise


def _debug_traceback(args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc(file=sys.stderr)


def check_output_path(path: Path, flag: str = "--out") -> None:
    """An output file must be creatable: not a directory, not under a file, in a writable directory.
    Checked before any work, so a run is never lost to its output path."""
    if path.is_dir():
        raise KebenchError(f"{flag} {path} is a directory; name a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise KebenchError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise KebenchError(f"{flag} {path}: directory {parent} is not writable")
            break
    if path.exists() and not os.access(path, os.W_OK):
        raise KebenchError(f"{flag} {path} is not writable")


def _hparams(args: argparse.Namespace) -> int:
    """``kebench hparams``: the resolved hyperparameters as YAML, after a comment saying where they come from."""
    # torch (the method registry): off the command line's start-up path
    from kebench.core.models import check_model_name, model_revision
    from methods.base import get_method
    from methods.hparams import describe_hparams, hparams_dict

    if not is_scenario(args.scenario):
        raise KebenchError(f"--scenario: unknown scenario '{args.scenario}'; known: {', '.join(scenario_names())}")
    get_method(args.method)
    check_model_name(args.model)
    revision = model_revision(args.model)
    origin, hparams = describe_hparams(args.method, args.model, args.scenario, dict(args.overrides), args.hparams)
    print(f"# {args.method} on {args.model} ({revision}), scenario {args.scenario}")
    print(f"# {origin}")
    print(yaml.safe_dump(hparams_dict(hparams), sort_keys=False, default_flow_style=None).rstrip())
    return 0


def _stats(args: argparse.Namespace) -> int:
    """``kebench stats``: one pass over the corpus for every requested layer not yet cached."""
    # torch: off the command line's start-up path
    from methods.stats import canonical_corpus, check_dtype, ensure_stats
    from kebench.core.models import check_device, check_model_name, load_model, model_facts

    try:
        layers = sorted({int(item) for item in args.layers.split(",") if item.strip()})
    except ValueError:
        raise KebenchError(f"--layers: expected comma-separated integers, got {args.layers!r}") from None
    if not layers:
        raise KebenchError("--layers: name at least one layer")
    check_model_name(args.model)
    canonical_corpus(args.corpus)
    check_dtype(args.dtype)
    facts = model_facts(args.model)
    if facts is not None and any(not 0 <= layer < facts.num_layers for layer in layers):
        bad = next(layer for layer in layers if not 0 <= layer < facts.num_layers)
        raise KebenchError(f"--layers: layer {bad} out of range for {args.model} ({facts.num_layers} layers, 0-based)")
    lm = load_model(args.model, device=check_device(args.device))
    outcomes = ensure_stats(lm, layers, args.corpus, args.n, args.dtype, data_dir=args.data_dir, force=args.force)
    for outcome in outcomes:
        action = f"computed in {outcome.seconds:.1f} s" if outcome.computed else "cached"
        print(f"layer {outcome.layer}: {action}, {outcome.tokens:,} tokens -> {outcome.path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    # The sweep file and --export are checked before Ray Tune is imported (seconds): a bad value is one line at once.
    from orchestrator.exports import check_export_target
    from orchestrator.sweep_spec import load_sweep

    spec = load_sweep(args.sweep)
    if args.export is not None:
        check_export_target(args.export)
    from orchestrator.sweep import sweep_command  # Ray Tune: off the command line's start-up path

    return sweep_command(args, spec)


def _table(args: argparse.Namespace) -> int:
    # pyarrow and DuckDB: off the command line's start-up path
    from results.tables import FORMATS, get_table

    get_table(args.table)
    if args.fmt not in FORMATS:
        raise KebenchError(f"unknown format '{args.fmt}'; known: {', '.join(FORMATS)}")
    if args.store.exists() and not args.store.is_dir():
        raise KebenchError(f"store {args.store} is a file, not a store directory")
    if not args.store.is_dir():
        raise KebenchError(f"store {args.store} does not exist")
    print(_render_readable(args.store, args.table, args.fmt))
    return 0


def _render_readable(store: Path, table: str, fmt: str) -> str:
    """Render ``table``; unreadable Parquet files are named on stderr and left out (the rest renders)."""
    # pyarrow and DuckDB: off the command line's start-up path
    from results.store import scan_store
    from results.tables import render

    unreadable = scan_store(store).unreadable
    for path, reason in unreadable:
        print(f"kebench: warning: skipped unreadable {path} ({reason})", file=sys.stderr)
    return render(store, table, fmt, skip=[path for path, _ in unreadable])


def run_grid_command(args: argparse.Namespace) -> int:
    """``kebench grid`` and ``run_grid.py``: run the grid, then print its tables."""
    # Ray, torch, pyarrow and DuckDB: off the command line's start-up path
    from orchestrator.grid import load_grid
    from orchestrator.runner import run_grid
    from results.tables import render, table_names

    grid = load_grid(args.grid)
    store = args.store or Path(grid.store)
    wanted = [] if args.tables == "none" else [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in table_names()]
    if unknown:
        raise KebenchError(f"--tables: unknown table '{unknown[0]}'; known: {', '.join(table_names())}")
    console = Console(stderr=True)
    if args.data_dir is None and grid.data_dir is not None and not Path(grid.data_dir).expanduser().is_dir():
        raise KebenchError(f"{grid.source}: data_dir: {grid.data_dir} is not a directory")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=args.quiet)
    task = progress.add_task(grid.name, total=None, status="starting")

    def start(report, left: int) -> None:  # only once everything is validated: errors stay one line
        progress.start()
        progress.update(task, total=report.skipped + left, completed=report.skipped,
                        status=f"skipped {report.skipped} · left {left}")

    def update(report, left: int) -> None:
        progress.update(task, total=report.ok + report.failed + left, completed=report.ok + report.failed,
                        status=f"done {report.ok} · failed {report.failed} · left {left}")

    try:
        # Only the tables go to stdout: Ray prints task-retry notices to stdout from a background thread.
        with contextlib.redirect_stdout(sys.stderr):
            report = run_grid(grid, store, rerun_failed=args.rerun_failed, force=args.force, workers=args.workers,
                              ray_address=args.ray_address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                              data_dir=args.data_dir, on_update=update, on_start=start)
    finally:
        progress.stop()
    for path, reason in report.quarantined:
        print(f"kebench: warning: unreadable store file moved aside as {path} ({reason}); its cell re-ran",
              file=sys.stderr)
    if report.interrupted:
        signum = report.signal or signal.SIGINT
        print(f"kebench: interrupted by {signal.Signals(signum).name}: {report.finished} of {report.total} cells "
              f"stored ({report.ok + report.failed} this run, {report.failed} failed), workers stopped; run the same "
              "command again to resume", file=sys.stderr)
        return 128 + int(signum)
    retried = f" · {report.retried} run again after a lost worker" if report.retried else ""
    console.print(f"{grid.name}: {report.total} cells · ran {report.ok + report.failed} (ok {report.ok}, "
                  f"failed {report.failed}){retried} · skipped {report.skipped} already in {store} · "
                  f"{report.wall_seconds:.0f} s")
    for title, error in report.failures:
        console.print(f"  × {title}: {error}")
    for name in wanted:
        text = render(store, name, "md")
        if not text.startswith("no "):
            print(f"\n{text}")
    return 1 if report.failed else 0


def _leaderboard(args: argparse.Namespace) -> int:
    # pyarrow, DuckDB and matplotlib: off the command line's start-up path
    from results.leaderboard import write_leaderboard

    if not args.store.is_dir():
        raise KebenchError(f"store {args.store} does not exist")
    out = args.out or args.store / "leaderboard"
    written = write_leaderboard(args.store, out, resamples=args.resamples, seed=args.seed,
                                on_warning=lambda text: print(f"kebench: warning: {text}", file=sys.stderr))
    for path in written:
        print(path)
    return 0


def _list() -> int:
    # torch (the registries import every method): off the command line's start-up path
    from benchmarks.registry import benchmark_names, benchmark_source
    from kebench.core import plugins
    from kebench.core.metrics import metric_names
    from kebench.core.models import model_names
    from methods.base import method_names, method_source
    from results.tables import table_names

    def named(names: list[str], source) -> str:
        return ", ".join(name if source(name) == "kebench" else f"{name} ({source(name)})" for name in names)

    print("models:     " + ", ".join(model_names()))
    print("benchmarks: " + named(benchmark_names(), benchmark_source))
    print("methods:    " + named(method_names(), method_source))
    print("metrics:    " + ", ".join(metric_names()))
    print("tables:     " + ", ".join(table_names()))
    for failure in plugins.failures():
        print(f"failed:     {failure.describe()}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    """``kebench edit``: one cell (``orchestrator.cell.run_cell``, as a grid worker runs it), printed as a table."""
    # torch, pyarrow and DuckDB: off the command line's start-up path
    from benchmarks.protocols import check_protocols, protocol_tag
    from benchmarks.registry import get_benchmark, select_cases
    from kebench.core.metrics import metric_names
    from kebench.core.models import check_device, check_dtype_choice, check_model_name, model_revision
    from kebench.core.numerics import hardware_label
    from methods.base import get_method
    from methods.hparams import hparams_dict, load_hparams
    from orchestrator.cell import CellRequest, ModelCache, run_cell
    from orchestrator.grid import check_method_fits, precision_for
    from orchestrator.scenarios import Scenario, make_streams
    from results import rows as result_rows
    from results.summary import render_table, summarize

    # Validate everything cheap before loading a model.
    scenario = Scenario(args.scenario, T=args.T, B=args.B, downstream=args.downstream, downstream_n=args.downstream_n,
                        parallel_cases=args.parallel_cases, params=tuple(args.scenario_params))
    check_model_name(args.model)
    model_revision(args.model)  # an hf: snapshot that cannot be had fails here, before anything else
    if args.method is None:
        raise KebenchError("--method is required (kebench list shows the methods)")
    check_dtype_choice(args.dtype, "--dtype")
    get_method(args.method)
    if args.protocols:
        try:
            check_protocols(args.protocols)
        except KebenchError as exc:
            raise KebenchError(f"--protocol: {exc}") from None
    protocols = tuple(dict.fromkeys(protocol_tag(spec) for spec in args.protocols))  # canonical, as in a grid
    get_benchmark(args.benchmark)
    selection = select_cases(args.benchmark, args.split, args.n, args.offset, args.data_dir)
    make_streams(selection.cases, scenario)
    if args.hparams is not None and args.hparams.is_dir():
        raise KebenchError(f"--hparams {args.hparams} is a directory; name a hyperparameter YAML file")
    hparams = load_hparams(args.method, args.model, scenario.kind, dict(args.overrides), path=args.hparams)
    check_method_fits(args.method, args.model, hparams, selection)
    try:
        device = check_device(args.device)
    except KebenchError as exc:
        raise KebenchError(f"--device: {exc}") from None
    if args.out is not None:
        check_output_path(args.out)
    _enter_numerics(args)

    precision = precision_for(args.dtype, args.method, args.model, device.type != "cpu")
    request = CellRequest(args.model, args.benchmark, args.split, args.n, args.offset, scenario, args.method, hparams,
                          args.seed, precision, protocols=protocols, device=str(device), numerics=args.numerics)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=args.quiet, transient=False) as progress:
        task = progress.add_task(f"{args.method} {scenario.label}", total=len(selection.cases))
        cell = run_cell(request, ModelCache(), args.data_dir, on_edit=lambda n: progress.advance(task, n))
    result = cell.scenario

    timing = {(c.case_id, c.stream): (round(c.seconds, 4), c.steps) for c in result.cases}
    hardware = cell.fields["hardware"]  # what the numbers were computed on, in every row (issue 30)
    rows = [{**row, "seconds": timing[(row["case_id"], row["stream"])][0], "steps": timing[(row["case_id"], row["stream"])][1],
             "hardware": hardware}
            for row in result_rows.per_case(cell.case_rows)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    protocols_seen = sorted({row["protocol"] for row in rows})  # never pool protocols (GRACE reports two)
    summaries = [(args.method if len(protocols_seen) == 1 else escape(f"{args.method} [{protocol}]"),
                  summarize([row for row in rows if row["protocol"] == protocol], metric_names()))
                 for protocol in protocols_seen]
    title = (f"{args.model} · {args.benchmark}/{args.split} · {scenario.label} · n={cell.cases} · "
             f"seed={args.seed} · {precision.key}")
    extra = {"Params": [f"{result.trainable_parameters:,}"] * len(summaries),
             "s/edit": [f"{result.seconds_per_edit:.2f}"] * len(summaries)}
    Console().print(render_table(title, summaries, extra))
    if result.downstream is not None:
        check = result.downstream
        per_stream = ", ".join(f"{value:.3f}" for value in check.edited)
        Console().print(f"downstream {check.name} ({check.items} items): unedited {check.unedited:.3f} · "
                        f"edited {check.edited_mean:.3f} (per stream: {per_stream})")
    if cell.selection_note:
        Console().print(f"note: {cell.selection_note}")
    Console().print(f"note: computed on {escape(hardware_label(hardware))}")
    for note in result.notes:
        Console().print(f"note: {note}")
    print(json.dumps({"hparams": hparams_dict(hparams), "peak_rss_mb": round(result.peak_rss_mb, 1)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
