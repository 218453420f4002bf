"""Run a grid: one Ray task per cell on a pool of workers that keep their model loaded.

Data flows one way: grid → cells → Ray tasks → rows → Parquet.  Workers (``CellWorker`` actors) load a
model once and reuse it for every cell of that model they are given; they compute rows and return
them.  Only the driver writes the store, one file per finished cell attempt, so an interrupted run
(Ctrl-C, or the driver killed outright) keeps every cell that finished and the next run skips them.

An exception inside a cell makes that cell ``failed`` with its error text; the rest of the grid goes
on.  A worker process or node that dies, a worker that runs out of memory and a cell past its ``timeout_s``
are handled by the driver, never by Ray's restarts (``orchestrator.supervisor``: why, and what each becomes):
a lost worker's cell runs again on the nodes left, up to ``max_retries`` times (its row's ``retries``),
else it is stored as failed with the reason; the grid always finishes.  With ``--ray-address`` the driver
passes the data directory it resolved to the workers and checks first that every other node reads the
cells' files (``check_nodes_read_data``: one line naming the node).

Ctrl-C (SIGINT) and SIGTERM stop the workers (``ray.kill``), shut down the local Ray instance this run
started, and return a report with ``interrupted`` set to the signal; the command exits 128 + signal.
Everything that can be checked before Ray starts is: the grid (``expand``), the store (writable, not a
file, locked against a second driver, unreadable files moved aside), the resources a cell asks for
against what a local instance will have, and whether a ``--ray-address`` answers at all
(``orchestrator.ray_session``, which the sweep starts Ray through as well).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.data import resolve_data_dir
from benchmarks.protocols import cell_protocols, get_protocol, register_protocol
from kebench.core.models import configure_threads
from kebench.core.numerics import numerics_env
from kebench.core.scenarios import ScenarioKind, get_scenario_kind, register_scenario
from methods.stats import missing_jobs, run_job
from orchestrator.cell import FAILED, OK, CellOutcome, ModelCache, execute_cell
from orchestrator.grid import Cell, GridSpec, expand
from orchestrator.ray_session import check_local_resources, check_ray_address, pool_size, ray_initialized, start_ray
from orchestrator.supervisor import Loss, Supervisor, check_nodes_read_data
from results import rows
from results.store import (StoreLock, check_store_writable, next_attempt, package_versions, quarantine, scan_store,
                           write_cell_attempt)

class CellWorker:
    """A Ray actor body: keeps its model between cells.

    ``plugins``: the scenario kinds and scoring protocols the cells use that are not kebench's own
    (``plugin_declarations``).  A worker registers them before its first cell, so a kind a plug-in or a test
    module declared in the driver is known where the cell runs (its stream logic travels by reference: its
    module must be importable on the worker)."""

    def __init__(self, data_dir: str | None = None, plugins: tuple[Any, ...] = ()) -> None:
        register_plugins(plugins)
        self.cache = ModelCache()
        self.data_dir = data_dir
        configure_threads()

    def ready(self) -> int:
        """Returns once the worker is up (the pool hands it a cell only then, so a worker that never gets
        scheduled holds none); its PID."""
        return os.getpid()

    def run(self, cell: Cell, attempt: int) -> CellOutcome:
        return execute_cell(cell, attempt, self.cache, self.data_dir)


def plugin_declarations(cells: Sequence[Cell]) -> tuple[Any, ...]:
    """The declarations of the scenario kinds (with stream logic of their own) and the scoring protocols
    (defined outside ``benchmarks``) that ``cells`` use."""
    kinds = {cell.scenario.kind: get_scenario_kind(cell.scenario.kind) for cell in cells}
    protocols = {name: get_protocol(name) for cell in cells for name in cell_protocols(cell.protocols or None)}
    return (*(kind for kind in kinds.values() if kind.streams is not None),
            *(protocol for protocol in protocols.values() if not protocol.module.startswith("benchmarks.")))


def register_plugins(declarations: Sequence[Any]) -> None:
    """Register, in this process, what ``plugin_declarations`` collected in the driver (identical ones are no-ops)."""
    for declaration in declarations:
        if isinstance(declaration, ScenarioKind):
            register_scenario(declaration)
        else:
            register_protocol(declaration.name)(type(declaration))


# --------------------------------------------------------------------------- the driver

@dataclass
class GridReport:
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    interrupted: bool = False
    signal: int | None = None  # SIGINT or SIGTERM when interrupted by a signal
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    loads_per_worker: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (cell title, error)
    #: cells run again because their worker process or node died (each time counted)
    retried: int = 0
    #: unreadable store files moved aside as ``*.corrupt`` before the run (their cells re-run)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (new path, reason)
    #: where the driver's wall time went, in order (seconds): Ray start, statistics tasks, worker start-up
    #: up to the first cell's result (worker process, imports, model load, the first cell), the remaining
    #: cells, store writes (inside the cells phases), shutdown; ``bench/grid_overhead.py`` prints them
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        """Cells of the grid stored after this run: skipped ones plus those this run finished."""
        return self.skipped + self.ok + self.failed

    @property
    def overhead_fraction(self) -> float:
        """Orchestration overhead: wall time not spent inside cells, per worker-second of wall time."""
        return 0.0 if self.wall_seconds == 0 else max(0.0, 1.0 - self.compute_seconds / self.wall_seconds)


def select_cells(cells: list[Cell], latest: dict[str, tuple[int, str]], rerun_failed: bool, force: bool) -> list[Cell]:
    """The cells to run: never-finished ones, plus failed ones with ``rerun_failed``, plus all with ``force``."""
    chosen = []
    for cell in cells:
        status = latest.get(cell.cell_id, (0, None))[1]
        if force or status is None or (status == FAILED and rerun_failed):
            chosen.append(cell)
    return chosen


class GridInterrupted(BaseException):
    """Raised in the driver's main thread by SIGINT or SIGTERM while a grid runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM become ``GridInterrupted`` (once); later ones are remembered, not raised, so
    that clean-up (killing workers, shutting Ray down) runs to the end.  Ray's own SIGTERM handler
    (``sys.exit`` from inside a C++ wait, which aborts with a stack dump) is replaced while the grid runs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._raised = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if not self.deferred and not self._raised:
            self._raised = True
            raise GridInterrupted(self.signum)

    def quiet(self) -> None:
        """From now on only remember signals (clean-up must not be interrupted)."""
        self._raised = True

    @contextmanager
    def defer(self):
        """Hold a signal until the block ends (a store write is never cut in half)."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
        if self.signum is not None and not self._raised:
            self._raised = True
            raise GridInterrupted(self.signum)


def run_grid(
    grid: GridSpec,
    store: Path,
    *,
    rerun_failed: bool = False,
    force: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: float | None = None,
    data_dir: str | None = None,
    on_update: Callable[[GridReport, int], None] | None = None,
    on_start: Callable[[GridReport, int], None] | None = None,
) -> GridReport:
    """Run every cell of ``grid`` not yet in ``store``; ``on_start(report, cells to run)`` once everything is
    validated (before Ray starts), ``on_update(report, left)`` after each cell.

    Raises ``KebenchError`` (before Ray starts, before any cell runs) for a bad grid, a store that is a
    file, unwritable or held by another driver, resources a local instance cannot provide, or a
    ``ray_address`` that does not answer.
    """
    store = Path(store)
    data_dir = data_dir or grid.data_dir
    cells = expand(grid, data_dir)  # validates everything before anything is written
    data_dir = _workers_data_dir(data_dir)
    check_store_writable(store)
    local = ray_address is None and not ray_initialized()
    if local:
        check_local_resources(grid.source, grid.resources.num_cpus, num_cpus, num_gpus)
    elif ray_address:
        check_ray_address(ray_address)
    with StoreLock(store):
        scan = scan_store(store)
        report = GridReport(total=len(cells))
        for path, reason in scan.unreadable:
            report.quarantined.append((str(quarantine(path)), reason))
        if scan.unreadable:
            scan = scan_store(store)
        todo = select_cells(cells, scan.usable(), rerun_failed, force)
        report.skipped = len(cells) - len(todo)
        if todo:
            if on_start is not None:
                on_start(report, len(todo))
            _run_cells(grid, store, todo, report, workers=workers, ray_address=ray_address, num_cpus=num_cpus,
                       num_gpus=num_gpus, data_dir=data_dir, on_update=on_update)
    return report


def _run_cells(grid: GridSpec, store: Path, todo: list[Cell], report: GridReport, *, workers: int | None,
               ray_address: str | None, num_cpus: int | None, num_gpus: float | None, data_dir: str | None,
               on_update: Callable[[GridReport, int], None] | None) -> None:
    import ray  # Ray only where cells run: `kebench plan` imports this module and starts nothing

    signals = _Signals()
    signals.install()  # before Ray starts: a Ctrl-C during start-up is an interrupt too
    clock = time.perf_counter()
    started_here = False
    pool: Supervisor | None = None
    try:
        started_here = start_ray(ray_address, num_cpus, num_gpus)
        signals.install()  # ray.init installs its own SIGTERM handler: take it back
        mark = _phase_clock(report.phases, clock)
        mark("ray start")
        size = pool_size(grid.source, grid.resources.num_cpus, grid.resources.num_gpus, len(todo), workers)
        if not started_here:  # a cluster: its other nodes must read the files the driver validated
            check_nodes_read_data(todo, data_dir)
        _precompute_statistics(grid, todo, data_dir, report)
        mark("statistics")
        # No restarts and no retries by Ray: the supervisor decides what a lost worker's cell becomes
        # (orchestrator.supervisor explains why).
        worker_class = ray.remote(CellWorker).options(
            num_cpus=grid.resources.num_cpus, num_gpus=grid.resources.num_gpus, max_restarts=0, max_task_retries=0,
            runtime_env=numerics_runtime_env(grid))
        plugins = plugin_declarations(todo)
        left = [len(todo)]

        def record(result: CellOutcome | Loss, cell: Cell, attempt: int, retries: int) -> None:
            outcome = result if isinstance(result, CellOutcome) else _lost_outcome(cell, attempt, result)
            outcome.cell_row["retries"] = retries
            with signals.defer():  # a cell attempt is stored whole or not at all
                writing = time.perf_counter()
                write_cell_attempt(store, outcome.cell_row, outcome.case_rows, outcome.artifact)
                report.phases["store writes"] = report.phases.get("store writes", 0.0) + time.perf_counter() - writing
                report.compute_seconds += outcome.compute_seconds
                if outcome.worker_pid >= 0:
                    report.loads_per_worker[outcome.worker_pid] = outcome.model_loads
                if outcome.cell_row["status"] == OK:
                    report.ok += 1
                else:
                    report.failed += 1
                    report.failures.append((cell.title, outcome.cell_row["error"]))
            if "first cell result" not in report.phases:
                mark("first cell result")
            left[0] -= 1
            if on_update is not None:
                on_update(report, left[0])

        pool = Supervisor(
            make_worker=lambda: worker_class.remote(data_dir, plugins), size=size,
            num_cpus=grid.resources.num_cpus, num_gpus=grid.resources.num_gpus, max_retries=grid.max_retries,
            timeout_for=lambda cell: grid.timeout_for(cell.label), attempt_for=lambda cell: next_attempt(store, cell.cell_id),
            record=record, notice=lambda text: print(f"kebench: {text}", file=sys.stderr, flush=True))
        pool.run(todo)
        report.retried = pool.retried
        mark("other cells")
    except (GridInterrupted, KeyboardInterrupt) as exc:
        report.interrupted = True
        report.signal = exc.signum if isinstance(exc, GridInterrupted) else signal.SIGINT
    except SystemError as exc:
        # A signal that lands inside Ray's C++ wait surfaces as "SystemError: <cyfunction CoreWorker.wait>
        # returned a result with an exception set", with our GridInterrupted as its cause.
        interrupt = _interrupt_cause(exc)
        if interrupt is None:
            raise
        report.interrupted = True
        report.signal = interrupt.signum if isinstance(interrupt, GridInterrupted) else signal.SIGINT
    finally:
        signals.quiet()
        try:
            if pool is not None:
                report.retried = pool.retried
            if started_here:
                ray.shutdown()  # stops the workers with the instance
            elif pool is not None:
                pool.stop()  # ends the running cells too (actor tasks cannot be force-cancelled)
        finally:
            signals.restore()
            report.wall_seconds = time.perf_counter() - clock
            report.phases["shutdown"] = report.wall_seconds - sum(
                value for key, value in report.phases.items() if key not in ("store writes", "shutdown"))
    if signals.signum is not None and not report.interrupted:  # a signal during the final clean-up
        report.interrupted, report.signal = True, signals.signum


def numerics_runtime_env(grid: GridSpec) -> dict[str, Any]:
    """The Ray runtime environment of the grid's workers: its numerics (``kebench.core.numerics``) as environment
    variables, which ATen, MKL and oneDNN read when they first run, so they must be in the worker process
    from its start (a worker imports torch when it unpickles its task); each cell checks they took effect."""
    return {"env_vars": numerics_env(grid.numerics)}


def _interrupt_cause(exc: BaseException) -> BaseException | None:
    """The GridInterrupted or KeyboardInterrupt in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (GridInterrupted, KeyboardInterrupt)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _phase_clock(phases: dict[str, float], start: float) -> Callable[[str], None]:
    """``mark(name)`` records the time since the previous mark (or ``start``) as phase ``name``."""
    last = [start]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now

    return mark


def _precompute_statistics(grid: GridSpec, cells: list[Cell], data_dir: str | None, report: GridReport) -> None:
    """Compute the second-moment statistics the cells need and the cache lacks (ROME/MEMIT), as Ray tasks,
    before any cell starts: one task per (model, corpus, n, dtype), covering all of its missing layers.

    A failed task is reported and the grid goes on; a cell that still misses its statistics computes them.
    """
    import ray  # Ray only where cells run: `kebench plan` imports this module and starts nothing

    jobs = missing_jobs(cells)
    if not jobs:
        return
    task = ray.remote(run_job).options(num_cpus=grid.resources.num_cpus, num_gpus=grid.resources.num_gpus,
                                       max_retries=grid.max_retries, runtime_env=numerics_runtime_env(grid))
    refs = {task.remote(job, data_dir): job for job in jobs}
    for ref, job in refs.items():
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, never fatal for the grid
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            report.failures.append((job.title, f"statistics not precomputed: {message}"[:500]))


def _workers_data_dir(data_dir: str | None) -> str | None:
    """The data directory the driver read, as an absolute path for the workers: on a cluster a ``KEBENCH_DATA``
    set only in the driver's environment (or its default beside the checkout) would otherwise not reach the
    nodes.  None where it is not a directory (the files then come from the fetch cache or the package)."""
    resolved = resolve_data_dir(data_dir)
    return str(resolved.resolve()) if resolved.is_dir() else None


def _lost_outcome(cell: Cell, attempt: int, loss: Loss) -> CellOutcome:
    """The row of a cell that never returned (its worker died past its retries, ran out of memory or out of
    time): failed, with the reason."""
    now = dt.datetime.now(dt.timezone.utc)
    row = rows.cell_row(cell.row_key(), attempt=attempt, status=FAILED, error=loss.reason[:500],
                        fields={"packages": package_versions(), "started_at": now, "finished_at": now})
    return CellOutcome(row, [], -1, 0, 0.0)
