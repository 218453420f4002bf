"""The driver's pool of cell workers: it starts them, hands them cells, and decides what a lost cell becomes.

Why the driver supervises and Ray does not restart anything (``max_restarts=0``, ``max_task_retries=0``):
a restarted actor asks for the resources its dead predecessor had, on whatever nodes are left.  When a node
goes, the other workers still hold their CPUs or GPUs for their whole life, idle or not, so the restarted
actor can stay pending for ever, and its retried cell with it: the driver then waits on a result that cannot
come (issue 31: 11 of 12 cells stored, then a hang).  Ray also retries a worker that its memory monitor
killed without end.  So every loss comes back to the driver as an exception, and the driver decides:

* **Worker or node died** (``ActorDiedError``, ``NodeDiedError``, ``WorkerCrashedError``, ...): the cell goes
  back to the front of the queue, up to ``max_retries`` times (counted in its row's ``retries``), then is
  stored as failed with the reason.  Its worker is not restarted in place.
* **Out of memory** (Ray's memory monitor killed the worker: ``OutOfMemoryError``): stored as failed,
  ``out of memory: ...``, at once; the same cell on a node of the same size would be killed again.
* **Time limit** (``timeout_s``): the driver kills the worker (an ``apply`` that never returns cannot be
  interrupted from inside the process) and stores the cell as failed, ``timed out after ...``.
* **The worker could not start** (its ``__init__`` raised, or it died before its first cell): after
  ``START_FAILURES`` such deaths in a row the cells still queued are stored as failed with that reason.

Workers are replaced only up to what the *live* nodes can host (``capacity``: per node, how many workers of
the grid's ``num_cpus``/``num_gpus`` fit, counting our own workers), so a replacement never waits for a CPU
that one of our own idle workers holds.  A worker gets a cell only once it is up (its ``ready`` call
returned): a worker that never gets scheduled (its node vanished between two looks at the cluster) holds no
cell, and is stopped when the grid ends.  The driver waits with ``ray.wait(timeout=TICK_S)``, so time limits
and the checks above run every second, and a grid whose cells all wait while no worker has been able to
start for ``STALL_S`` seconds stores them as failed instead of waiting for ever.

The alternative, one Ray task per cell (Ray retries tasks on the remaining nodes by itself), loses what the
actors are for: a worker keeps its model loaded between the cells of that model.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from orchestrator.grid import Cell

#: how often the driver looks at time limits and the cluster while it waits for results
TICK_S = 1.0
#: how stale the driver's view of the live nodes may be (``ray.nodes()`` asks the GCS)
CAPACITY_S = 2.0
#: cells that wait this long while no worker could be started (and none runs) are stored as failed
STALL_S = 300.0
#: workers in a row that die before their first cell: the cells still waiting are stored as failed
START_FAILURES = 3
#: seconds each node other than the driver's has to answer the data check
PROBE_S = 120.0


@dataclass
class Loss:
    """Why a cell did not come back, and whether running it again elsewhere can help."""

    reason: str
    retry: bool


def describe_loss(exc: BaseException) -> Loss:
    """A Ray exception from a cell's ``run`` (or a worker's ``ready``) as a one-line reason."""
    from ray import exceptions as rx  # the driver has Ray loaded when this is called

    text = _summary(exc)
    if isinstance(exc, rx.OutOfMemoryError):
        return Loss(f"out of memory: {text}", False)
    if isinstance(exc, rx.RayActorError) and exc.actor_init_failed:
        return Loss(f"worker could not start: {text}", False)
    if isinstance(exc, (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError,
                        rx.LocalRayletDiedError)):
        return Loss(f"worker died: {text}", True)
    if isinstance(exc, rx.RayTaskError):  # the call itself raised (e.g. a module the worker cannot import)
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        return Loss(f"{type(cause).__name__}: {_summary(cause)}", False)
    return Loss(f"{type(exc).__name__}: {text}", isinstance(exc, rx.RayError))


def _summary(exc: BaseException) -> str:
    """Ray's multi-line messages as one line: what happened and where (node address), not the ids and the
    memory tables (an OOM message lists every process on the node)."""
    kept = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.split(":", 1)[0] in ("class_name", "actor_id", "pid", "name", "namespace", "job ID") \
                or line == "The actor died unexpectedly before finishing this task.":
            continue
        if line.startswith(("Object store memory usage", "Top 10 memory users", "Ray killed", "Considered workers")):
            break
        kept.append(line)
    text = " ".join(" ".join(kept).split())
    for advice in (" Some common causes include", " To troubleshoot", " To see more information"):
        text = text.split(advice, 1)[0]  # Ray's general advice, not what happened
    return text[:400] or type(exc).__name__


def node_capacity(nodes: Iterable[dict[str, Any]], num_cpus: float, num_gpus: float) -> int | None:
    """How many workers of ``num_cpus``/``num_gpus`` the live ``nodes`` (``ray.nodes()``) host, one node each;
    None when a worker asks for nothing (no bound)."""
    if num_cpus <= 0 and num_gpus <= 0:
        return None
    total = 0
    for node in nodes:
        if not node.get("Alive", False):
            continue
        resources = node.get("Resources") or {}
        fits = [math.floor(resources.get(name, 0.0) / need + 1e-9)
                for name, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need > 0]
        total += min(fits)
    return total


@dataclass
class _Running:
    cell: Cell
    attempt: int
    retries: int
    ref: Any
    started: float


@dataclass
class _Worker:
    actor: Any
    ready: Any | None  # the pending ``ready()`` call; None once the worker is up
    created: float
    model: str | None = None
    running: _Running | None = None


@dataclass
class Supervisor:
    """Runs ``cells`` on a pool of at most ``size`` workers (see the module docstring).

    ``make_worker()`` creates a worker actor (``max_restarts=0``); ``attempt_for(cell)`` the attempt number
    its row is stored under; ``record(outcome_or_loss, cell, attempt, retries)`` stores a finished cell
    (``outcome`` from the worker, or a ``Loss``); ``notice(text)`` says a cell is being retried.
    """

    make_worker: Callable[[], Any]
    size: int
    num_cpus: float
    num_gpus: float
    max_retries: int
    timeout_for: Callable[[Cell], float | None]
    attempt_for: Callable[[Cell], int]
    record: Callable[[Any, Cell, int, int], None]
    notice: Callable[[str], None] = lambda text: None
    clock: Callable[[], float] = time.monotonic
    workers: list[_Worker] = field(default_factory=list)
    retried: int = 0
    _capacity: tuple[float, int | None] = (-math.inf, None)
    _start_failures: int = 0
    _start_error: str = ""
    _stalled_since: float | None = None

    # ------------------------------------------------------------------ the loop

    def run(self, cells: Sequence[Cell]) -> None:
        import ray

        queue: deque[tuple[Cell, int]] = deque((cell, 0) for cell in cells)
        while queue or self._busy():
            self._resize(len(queue))
            self._assign(queue)
            refs = [ref for worker in self.workers for ref in (worker.ready, worker.running and worker.running.ref)
                    if ref is not None]
            if refs:
                # A timeout so that time limits, lost nodes and signals are seen within a second.
                done, _ = ray.wait(refs, num_returns=1, timeout=TICK_S)
                for ref in done:
                    self._settle(ref, queue)
            else:
                time.sleep(TICK_S)
            self._expire()
            self._check_stall(queue)

    def stop(self) -> None:
        """Kill every worker (an interrupted or finished grid); running cells end with them."""
        import ray

        for worker in self.workers:
            _kill(ray, worker.actor)
        self.workers.clear()

    # ------------------------------------------------------------------ steps

    def _busy(self) -> bool:
        return any(worker.running is not None for worker in self.workers)

    def _resize(self, queued: int) -> None:
        """Start workers up to what the live nodes host (and the cells need); stop surplus idle ones."""
        import ray

        target = self.size
        capacity = self._live_capacity()
        if capacity is not None:
            target = min(target, capacity)
        running = sum(1 for worker in self.workers if worker.running is not None)
        while len(self.workers) > target:
            spare = ([w for w in self.workers if w.ready is not None]
                     or [w for w in self.workers if w.running is None])
            if not spare:
                break
            _kill(ray, spare[0].actor)
            self.workers.remove(spare[0])
        wanted = min(target, running + queued)
        while len(self.workers) < wanted:
            actor = self.make_worker()
            self.workers.append(_Worker(actor, actor.ready.remote(), self.clock()))

    def _live_capacity(self) -> int | None:
        import ray

        checked, value = self._capacity
        if self.clock() - checked >= CAPACITY_S:
            value = node_capacity(ray.nodes(), self.num_cpus, self.num_gpus)
            self._capacity = (self.clock(), value)
        return value

    def _assign(self, queue: deque[tuple[Cell, int]]) -> None:
        for worker in self.workers:
            if not queue or worker.ready is not None or worker.running is not None:
                continue
            # Prefer a cell of the model this worker already holds: one model load per worker, not per cell.
            pick = next((i for i, (cell, _) in enumerate(queue) if cell.model == worker.model), 0)
            cell, retries = queue[pick]
            del queue[pick]
            attempt = self.attempt_for(cell)
            worker.model = cell.model
            worker.running = _Running(cell, attempt, retries, worker.actor.run.remote(cell, attempt), self.clock())

    def _settle(self, ref: Any, queue: deque[tuple[Cell, int]]) -> None:
        import ray

        worker = next((w for w in self.workers if ref == w.ready or (w.running and ref == w.running.ref)), None)
        if worker is None:
            return
        if worker.ready is not None and ref == worker.ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any failure to start is the same to the pool
                self._lost_worker(worker)
                self._start_failures += 1
                self._start_error = describe_loss(exc).reason
                return
            worker.ready = None
            self._start_failures = 0
            self._stalled_since = None
            return
        running = worker.running
        assert running is not None
        worker.running = None
        try:
            outcome = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the cell is settled here
            loss = describe_loss(exc)
            from ray.exceptions import RayActorError, RayTaskError

            if not isinstance(exc, RayTaskError) or isinstance(exc, RayActorError):
                self._lost_worker(worker)  # dead, or not to be trusted with another cell
            if loss.retry and running.retries < self.max_retries:
                self.retried += 1
                self.notice(f"{running.cell.title}: {loss.reason}; running it again "
                            f"({running.retries + 1} of {self.max_retries} retries)")
                queue.appendleft((running.cell, running.retries + 1))
                return
            if loss.retry:
                loss = Loss(f"{loss.reason} (after {running.retries} retries)" if running.retries else loss.reason,
                            False)
            self.record(loss, running.cell, running.attempt, running.retries)
            return
        self.record(outcome, running.cell, running.attempt, running.retries)

    def _lost_worker(self, worker: _Worker) -> None:
        import ray

        _kill(ray, worker.actor)  # no restart: the pool replaces it where there is room
        if worker in self.workers:
            self.workers.remove(worker)
        self._capacity = (-math.inf, None)  # a node may have gone: look again before replacing

    def _expire(self) -> None:
        now = self.clock()
        for worker in list(self.workers):
            running = worker.running
            limit = self.timeout_for(running.cell) if running is not None else None
            if running is None or limit is None or now - running.started <= limit:
                continue
            worker.running = None
            self._lost_worker(worker)  # the only way to stop an apply() that does not return
            self.record(Loss(f"timed out after {limit:g} s (timeout_s); its worker was stopped", False),
                        running.cell, running.attempt, running.retries)

    def _check_stall(self, queue: deque[tuple[Cell, int]]) -> None:
        """Cells that no worker can take are stored as failed: when no worker is up and ``START_FAILURES``
        workers in a row died before their first cell, or none has been up (and none running) for ``STALL_S``."""
        healthy = self._busy() or any(worker.ready is None for worker in self.workers)
        if not queue or healthy:
            self._stalled_since = None
            return
        if self._start_failures >= START_FAILURES:
            reason = f"{self._start_error} ({self._start_failures} workers in a row)"
        else:
            now = self.clock()
            if self._stalled_since is None:
                self._stalled_since = now
            if now - self._stalled_since < STALL_S:
                return
            reason = (f"no worker could be started in {STALL_S:g} s (the live nodes cannot host one: "
                      f"num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g})")
            if self._start_error:
                reason += f"; last: {self._start_error}"
        while queue:
            cell, retries = queue.popleft()
            self.record(Loss(reason, False), cell, self.attempt_for(cell), retries)
        self._start_failures = 0
        self._stalled_since = None


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - an actor that is already gone
        pass


# --------------------------------------------------------------------------- every node reads the cells' data

def read_cells_data(data_dir: str | None, wanted: Sequence[tuple[str, str, int, int, str]]) -> list[str]:
    """On a node: the problems reading each (benchmark, split, n, offset, data hash) the cells use ([] when
    every file is there with the hash the grid was expanded with)."""
    from benchmarks.registry import select_cases

    problems = []
    for benchmark, split, n, offset, sha256 in wanted:
        try:
            got = select_cases(benchmark, split, n, offset, data_dir).data_sha256
        except Exception as exc:  # noqa: BLE001 - every problem is reported, in one line
            problems.append(f"{benchmark}/{split}: {' '.join(str(exc).split())[:300]}")
            continue
        if sha256 and got != sha256:
            problems.append(f"{benchmark}/{split}: its data differ from the driver's (sha256 {got[:12]}…, the grid "
                            f"was expanded with {sha256[:12]}…)")
    return problems


def check_nodes_read_data(cells: Sequence[Cell], data_dir: str | None) -> None:
    """Before any cell runs on a cluster: every live node other than the driver's reads the cells' benchmark
    files (from ``data_dir``, the path the driver resolved) with the hashes the grid was expanded with.  A node
    that cannot is a one-line ``KebenchError`` naming it, instead of every cell failing on it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kebench.core.errors import KebenchError

    wanted = sorted({(c.benchmark, c.split, c.n, c.offset, c.data_sha256) for c in cells})
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a Ray Client driver is on no node: check them all
        here = None
    nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("NodeID") != here]
    if not nodes:
        return
    probe = ray.remote(read_cells_data)
    refs = {probe.options(num_cpus=0, max_retries=0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(data_dir, wanted): node for node in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_S)
    where = f"(data directory {data_dir})" if data_dir else "(no data directory given: its own default)"
    for ref, node in refs.items():
        name = f"node {node.get('NodeManagerAddress', '?')} (id {node['NodeID'][:12]})"
        if ref not in ready:
            raise KebenchError(f"{name} did not answer the benchmark-data check within {PROBE_S:g} s")
        try:
            problems = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - e.g. kebench is not importable there
            raise KebenchError(f"{name} cannot run the benchmark-data check: {describe_loss(exc).reason}") from None
        if problems:
            raise KebenchError(f"{name} cannot read the cells' benchmark data {where}: {problems[0]}; put the same "
                               "files at that path on every node (or pass --data-dir naming a shared folder)")
