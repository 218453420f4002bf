"""Issue 31, part B: what becomes of a cell whose work goes wrong in the Ray runner, and the grid around it.

What the README promises (``When things go wrong``): a lost worker's cell runs again on what is left, up to
``max_retries`` times, counted in its row, or is stored as failed with the reason; a worker that runs out of
memory, a cell past ``timeout_s`` and an edit that leaves NaN in the model are failed cells with a one-line
reason, and the grid goes on to the end; a bad ``timeout_s`` is one line and exit 2 before any work.

The supervisor's decisions are tested against a scripted stand-in for Ray (no processes, a fake clock); the
cell body in-process with editors registered here; the whole path with real Ray workers in two ``kebench
grid`` runs: test plug-ins installed as dist-info (an ``apply`` that never returns, one that kills its worker),
and every worker killed by Ray's own memory monitor (a threshold of 0.1% of the machine's memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from methods.base import Editor, EditStats, register_method
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
KEBENCH = [sys.executable, "-m", "orchestrator.cli"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code: int, out: str, err: str, expected: int) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, err
    return lines[0]


def _grid(tmp: Path, **changes: Any) -> str:
    spec = {"name": "faults", "store": str(tmp / "store"), "resources": {"num_cpus": 1},
            "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 1}],
            "scenarios": [{"kind": "single"}], "methods": [{"name": "reft", "hparams": {"max_steps": 5}}]}
    spec.update(changes)
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


# --------------------------------------------------------------------------- timeout_s is checked up front

TIMEOUT_CASES = [
    ("zero", {"timeout_s": 0}, "timeout_s must be a number of seconds > 0, got 0"),
    ("negative", {"timeout_s": -5}, "timeout_s must be a number >= 0, got -5"),
    ("text", {"timeout_s": "10m"}, "timeout_s must be a number >= 0, got '10m'"),
    ("nan", {"timeout_s": float("nan")}, "timeout_s must be a number >= 0, got nan"),
    ("method-inf", {"methods": [{"name": "reft", "timeout_s": float("inf")}]}, "methods[0].timeout_s must be a number"),
    ("method-bool", {"methods": [{"name": "reft", "timeout_s": True}]}, "methods[0].timeout_s must be a number >= 0, "
                                                                        "got true (a boolean)"),
]


@pytest.mark.parametrize("changes, fragment", [case[1:] for case in TIMEOUT_CASES], ids=[c[0] for c in TIMEOUT_CASES])
def test_a_bad_time_limit_is_one_line_exit_2(tmp_path, capsys, changes, fragment):
    line = _one_line(*_run(["grid", "--grid", _grid(tmp_path, **changes)], capsys), expected=2)
    assert "faults.yaml: " in line and fragment in line, line
    assert not (tmp_path / "store").exists()


def test_time_limits_resolve_per_method_entry():
    from orchestrator.grid import parse_grid

    grid = parse_grid({"name": "t", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "n": 1}],
                       "scenarios": [{"kind": "single"}], "timeout_s": 600,
                       "methods": ["reft", {"name": "baft", "timeout_s": 30}]}, "t.yaml")
    assert (grid.timeout_for("reft"), grid.timeout_for("baft")) == (600.0, 30.0)
    assert grid.to_dict()["timeout_s"] == 600 and grid.to_dict()["methods"][1]["timeout_s"] == 30


# --------------------------------------------------------------------------- a record long enough to exhaust memory

def _long_prompt_dir(tmp: Path) -> str:
    """A data directory whose ZsRE file holds three real records, the second with a 22,000-character prompt."""
    import json

    from benchmarks.data import resolve_data_dir

    source = resolve_data_dir() / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    if not source.is_file():
        from benchmarks.data import EMBEDDED_DIR

        source = EMBEDDED_DIR / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    records = json.loads(source.read_text(encoding="utf-8"))[:3]
    records[1]["src"] = "What is the answer? " * 1100
    (tmp / "data" / "zsre").mkdir(parents=True)
    (tmp / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json").write_text(json.dumps(records), encoding="utf-8")
    return str(tmp / "data")


@pytest.mark.parametrize("command", ["edit", "grid"])
def test_a_record_long_enough_to_exhaust_memory_is_refused_at_load(tmp_path, capsys, command):
    data = _long_prompt_dir(tmp_path)
    argv = (["edit", "--model", "tiny-random-llama", "--method", "reft", "--n", "1", "--quiet"] if command == "edit"
            else ["grid", "--grid", _grid(tmp_path)])
    line = _one_line(*_run([*argv, "--data-dir", data], capsys), expected=2)
    assert "zsre_mend_eval_portability_gpt4.json" in line and "record 1: field 'src' has 22,000 characters, more " \
        "than 4,000" in line, line
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- the supervisor against a scripted Ray

@dataclass
class _Ref:
    result: Any = None
    error: BaseException | None = None
    hang: bool = False


class _Method:
    def __init__(self, call):
        self.call = call

    def remote(self, *args):
        return self.call(*args)


class _Actor:
    def __init__(self, ray: "_FakeRay") -> None:
        self.killed = False
        self.ready = _Method(lambda: ray.on_ready(self))
        self.run = _Method(lambda cell, attempt: ray.on_run(self, cell))


class _FakeRay(types.ModuleType):
    """Just what ``orchestrator.supervisor`` asks of Ray: ``wait``/``get``/``kill``/``nodes``; each cell's calls
    follow ``script[label]`` (one entry per try: "ok", "hang", or an exception to raise)."""

    def __init__(self, script: dict[str, list], nodes: int = 2, ready: Any = "ok") -> None:
        super().__init__("ray")
        import ray.exceptions

        self.exceptions = ray.exceptions
        self.script = {label: list(steps) for label, steps in script.items()}
        self.node_list = [{"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": 1.0}} for i in range(nodes)]
        self.ready_outcome = ready
        self.now = 0.0
        self.created = 0

    def clock(self) -> float:
        self.now += 0.1  # every look at the clock takes a moment, so a loop without results still moves on
        return self.now

    def make_worker(self) -> _Actor:
        self.created += 1
        return _Actor(self)

    def on_ready(self, actor: _Actor) -> _Ref:
        return _Ref(error=self.ready_outcome) if isinstance(self.ready_outcome, BaseException) else _Ref(result=1)

    def on_run(self, actor: _Actor, cell: Any) -> _Ref:
        step = self.script[cell.label].pop(0)
        if callable(step) and not isinstance(step, BaseException):
            step = step(self)
        if step == "hang":
            return _Ref(hang=True)
        if isinstance(step, BaseException):
            return _Ref(error=step)
        return _Ref(result=f"outcome of {cell.label}")

    def wait(self, refs, num_returns=1, timeout=None):
        self.now += 0.01
        done = [ref for ref in refs if not ref.hang][:num_returns]
        if not done:
            self.now += timeout or 0.0
        return done, [ref for ref in refs if ref not in done]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.result

    def kill(self, actor, no_restart=True):
        actor.killed = True

    def nodes(self):
        return [dict(node) for node in self.node_list]


def _supervise(monkeypatch, script: dict[str, list], *, max_retries: int = 2, timeout: float | None = None,
               size: int = 2, **fake: Any) -> tuple[_FakeRay, list[tuple[str, str, int]], Any]:
    from orchestrator import supervisor

    ray = _FakeRay(script, **fake)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(supervisor, "TICK_S", 0.0)  # no real sleeping: the fake clock moves instead
    stored: list[tuple[str, str, int]] = []

    def record(result, cell, attempt, retries):
        reason = result.reason if isinstance(result, supervisor.Loss) else result
        stored.append((cell.label, reason, retries))

    pool = supervisor.Supervisor(make_worker=ray.make_worker, size=size, num_cpus=1, num_gpus=0,
                                 max_retries=max_retries, timeout_for=lambda cell: timeout,
                                 attempt_for=lambda cell: 1, record=record, clock=ray.clock)
    cells = [types.SimpleNamespace(label=label, title=label, model="m") for label in script]
    pool.run(cells)
    return ray, stored, pool


def _died(ray: _FakeRay) -> BaseException:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_a_worker_that_keeps_dying_is_retried_a_bounded_number_of_times(monkeypatch):
    ray, stored, pool = _supervise(monkeypatch, {"crash": [_died] * 5, "fine": ["ok"]}, max_retries=2)
    outcome = dict((label, (reason, retries)) for label, reason, retries in stored)
    assert outcome["fine"] == ("outcome of fine", 0)
    reason, retries = outcome["crash"]
    assert retries == 2 and reason.startswith("worker died: ") and reason.endswith("(after 2 retries)")
    assert len(ray.script["crash"]) == 2 and pool.retried == 2  # three tries, then stored as failed
    assert not pool.workers or all(worker.running is None for worker in pool.workers)


def test_a_worker_killed_for_memory_fails_its_cell_at_once_with_the_reason(monkeypatch):
    from ray.exceptions import OutOfMemoryError

    message = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.2, ID: "
               "abc) was 23.1GB used / 23.5GB limit (0.98)\nOOM kill reason: Memory usage exceeded threshold\n"
               "Object store memory usage: [- objects spillable: 0\n- bytes spillable: 0]\nRay killed 1 worker(s)")
    _, stored, pool = _supervise(monkeypatch, {"big": [OutOfMemoryError(message), "ok"], "small": ["ok"]})
    outcome = {label: (reason, retries) for label, reason, retries in stored}
    assert outcome["big"] == ("out of memory: 1 worker(s) were killed due to the node running low on memory. Memory "
                              "on the node (IP: 10.0.0.2, ID: abc) was 23.1GB used / 23.5GB limit (0.98) OOM kill "
                              "reason: Memory usage exceeded threshold", 0)
    assert outcome["small"] == ("outcome of small", 0) and pool.retried == 0


def test_a_cell_past_its_time_limit_is_failed_and_its_worker_stopped(monkeypatch):
    ray, stored, pool = _supervise(monkeypatch, {"stuck": ["hang"], "a": ["ok"], "b": ["ok"]}, timeout=30.0)
    outcome = {label: reason for label, reason, _ in stored}
    assert outcome == {"stuck": "timed out after 30 s (timeout_s); its worker was stopped",
                       "a": "outcome of a", "b": "outcome of b"}
    assert 30.0 <= ray.now < 40.0  # within a tick of the limit


def test_after_a_node_is_lost_no_worker_waits_for_resources_that_are_gone(monkeypatch):
    def lose_node(ray: _FakeRay) -> BaseException:
        ray.node_list[1]["Alive"] = False  # its resources leave the cluster with it
        return _died(ray)

    ray, stored, pool = _supervise(monkeypatch, {"on-lost-node": [lose_node, "ok"], **{f"c{i}": ["ok"] for i in range(4)}})
    assert sorted(reason for _, reason, _ in stored) == sorted(
        ["outcome of on-lost-node", *(f"outcome of c{i}" for i in range(4))])
    assert ray.created == 2  # the lost worker was not replaced: the one live node holds the other one
    assert dict((label, retries) for label, _, retries in stored)["on-lost-node"] == 1


def test_workers_that_cannot_start_fail_the_waiting_cells_instead_of_a_hang(monkeypatch):
    from ray.exceptions import ActorDiedError, RayTaskError

    init_error = ActorDiedError(RayTaskError("CellWorker.__init__", "Traceback ...", ImportError("no module x")))
    ray, stored, _ = _supervise(monkeypatch, {"a": ["ok"], "b": ["ok"], "c": ["ok"]}, ready=init_error)
    assert len(stored) == 3 and all(reason.startswith("worker could not start: ") and "(3 workers in a row)" in reason
                                    for _, reason, _ in stored), stored


def test_cells_no_live_node_can_host_fail_after_the_stall_bound(monkeypatch):
    from orchestrator.supervisor import STALL_S

    ray, stored, _ = _supervise(monkeypatch, {"a": ["ok"]}, nodes=0)
    assert stored == [("a", "no worker could be started in 300 s (the live nodes cannot host one: num_cpus=1, "
                            "num_gpus=0)", 0)]
    assert ray.created == 0 and ray.now >= STALL_S


def test_node_capacity_counts_whole_workers_per_live_node():
    from orchestrator.supervisor import node_capacity

    nodes = [{"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert node_capacity(nodes, 1, 0) == 4
    assert node_capacity(nodes, 2, 0) == 1  # 1 + 0: a worker lives on one node
    assert node_capacity(nodes, 1, 1) == 1 and node_capacity(nodes, 0.5, 0.5) == 2
    assert node_capacity(nodes, 0, 0) is None


# --------------------------------------------------------------------------- the cell body: NaN, out of memory

@dataclass(frozen=True)
class _NoHparams:
    scale: float = 1.0


class _Fault(Editor):
    hparams_class = _NoHparams
    needs_hparams_file = False

    def restore(self) -> None:
        saved = getattr(self, "saved", None)
        if saved is not None:
            with torch.no_grad():
                self.lm.lm_head.weight.copy_(saved)

    def trainable_parameters(self) -> int:
        return 0


@register_method("test-leaves-nan")
class _LeavesNaN(_Fault):
    """An ``apply`` that leaves NaN in the output head (scored, it would be 0.00 everywhere and ``ok``)."""

    def apply(self, cases):
        self.saved = self.lm.lm_head.weight.detach().clone()
        with torch.no_grad():
            self.lm.lm_head.weight.fill_(float("nan"))
        return EditStats(1, 0.5)


@register_method("test-out-of-memory")
class _OutOfMemory(_Fault):
    def apply(self, cases):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)")


@pytest.fixture(scope="module")
def fault_cells():
    from orchestrator.grid import expand, parse_grid

    grid = parse_grid({"name": "cells", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "n": 1}],
                       "scenarios": [{"kind": "single"}],
                       "methods": ["test-leaves-nan", "test-out-of-memory"]}, "cells.yaml")
    return {(cell.method, cell.scenario.kind): cell for cell in expand(grid)}


CELL_CASES = [
    ("nan-single", ("test-leaves-nan", "single"),
     "non-finite: test-leaves-nan: after edit call 1 of stream 0: the edited model's outputs are not finite "
     "(NaN or inf) on the probe texts"),
    ("oom", ("test-out-of-memory", "single"),
     "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"),
]


@pytest.mark.parametrize("key, error", [case[1:] for case in CELL_CASES], ids=[case[0] for case in CELL_CASES])
def test_a_cell_whose_edit_leaves_nan_or_runs_out_of_memory_is_failed_with_the_reason(fault_cells, tiny_lm, key,
                                                                                     error):
    from orchestrator.cell import ModelCache, execute_cell

    outcome = execute_cell(fault_cells[key], 1, ModelCache())
    assert outcome.cell_row["status"] == "failed" and outcome.case_rows == []
    assert outcome.cell_row["error"].startswith(error), outcome.cell_row["error"]


def test_the_model_is_whole_again_after_a_nan_edit_fails(tiny_lm):
    from orchestrator.scenarios import Scenario, run_scenario
    from methods.base import NonFiniteError
    from helpers import TOY_CASES

    before = tiny_lm.lm_head.weight.detach().clone()
    with pytest.raises(NonFiniteError, match="after edit call 1 of stream 0"):
        run_scenario(tiny_lm, "test-leaves-nan", _NoHparams(), list(TOY_CASES), Scenario("continual", T=2), 0)
    assert torch.equal(tiny_lm.lm_head.weight, before)  # restored: the next cell of this worker is unaffected


EDIT_CASES = [
    ("nan", "test-leaves-nan", "kebench: error: non-finite: test-leaves-nan: after edit call 1 of stream 0"),
    ("oom", "test-out-of-memory", "kebench: error: out of memory: OutOfMemoryError: CUDA out of memory."),
]


@pytest.mark.parametrize("method, fragment", [case[1:] for case in EDIT_CASES], ids=[case[0] for case in EDIT_CASES])
def test_kebench_edit_names_a_nan_or_out_of_memory_edit_in_one_line(capsys, tiny_lm, method, fragment):
    line = _one_line(*_run(["edit", "--model", "tiny-random-llama", "--split", "dev", "--n", "1", "--quiet",
                            "--method", method], capsys), expected=1)
    assert line.startswith(fragment), line


# --------------------------------------------------------------------------- with real Ray workers

PLUGIN = textwrap.dedent('''
    """Plug-in methods that misbehave on purpose (tests/test_bad_inputs_runner.py)."""
    import os
    import signal
    import time
    from dataclasses import dataclass

    from kebench import Editor, EditStats, register_method


    @dataclass(frozen=True)
    class H:
        seconds: float = 3600.0


    class _Fault(Editor):
        hparams_class = H
        needs_hparams_file = False
        def restore(self): pass
        def trainable_parameters(self): return 0


    @register_method("fault-hang")
    class NeverReturns(_Fault):
        def apply(self, cases):
            time.sleep(self.hparams.seconds)
            return EditStats(1, 0.0)


    @register_method("fault-crash")
    class KillsItsWorker(_Fault):
        def apply(self, cases):
            os.kill(os.getpid(), signal.SIGKILL)
''')


def _plugin_site(tmp: Path) -> Path:
    site = tmp / "site"
    (site / "kebench_test_faults-1.0.dist-info").mkdir(parents=True)
    (site / "kebench_test_faults.py").write_text(PLUGIN)
    (site / "kebench_test_faults-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kebench-test-faults\nVersion: 1.0\n")
    (site / "kebench_test_faults-1.0.dist-info" / "entry_points.txt").write_text(
        "[kebench.methods]\nfaults = kebench_test_faults\n")
    return site


def _cells(store: Path) -> dict[str, tuple]:
    import duckdb

    rows = duckdb.connect().execute(
        f"SELECT label, status, error, retries, attempt FROM read_parquet('{store}/cells/**/*.parquet', "
        "hive_partitioning=true, union_by_name=true)").fetchall()
    assert len(rows) == len({row[0] for row in rows}), rows  # each cell stored once
    return {row[0]: row[1:] for row in rows}


@pytest.mark.ray
def test_a_hung_and_a_crashing_cell_are_failed_and_the_grid_finishes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(_plugin_site(tmp_path))]),
           "TOKENIZERS_PARALLELISM": "false"}
    grid = _grid(tmp_path, max_retries=1, methods=[{"name": "reft", "hparams": {"max_steps": 5}},
                                                   {"name": "fault-hang", "timeout_s": 3}, "fault-crash"])
    started = time.perf_counter()
    done = subprocess.run([*KEBENCH, "grid", "--grid", grid, "--quiet", "--num-cpus", "2", "--tables", "single"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    elapsed = time.perf_counter() - started
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    cells = _cells(tmp_path / "store")
    assert cells["reft"][:3] == ("ok", None, 0)
    assert cells["fault-hang"][:3] == ("failed", "timed out after 3 s (timeout_s); its worker was stopped", 0)
    status, error, retries, _ = cells["fault-crash"]
    assert status == "failed" and error.startswith("worker died: ") and error.endswith("(after 1 retries)")
    assert retries == 1 and "Some common causes" not in error
    assert "fault-crash seed=0: worker died: " in done.stderr and "running it again (1 of 1 retries)" in done.stderr
    assert "ran 3 (ok 1, failed 2) · 1 run again after a lost worker" in done.stderr.replace("\n", " ")
    assert done.stdout.lstrip().startswith("## Single editing")  # stdout holds the table only
    assert elapsed < 300


@pytest.mark.ray
def test_workers_killed_by_rays_memory_monitor_are_failed_cells_and_the_grid_finishes(tmp_path):
    """The issue's OOM: Ray retried OOM-killed workers without end and the driver died with OutOfMemoryError.
    Here Ray's memory monitor kills every worker (its threshold is 0.1% of the machine's memory)."""
    env = {**os.environ, "RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "100",
           "TOKENIZERS_PARALLELISM": "false"}
    grid = _grid(tmp_path, methods=[{"name": "reft", "hparams": {"max_steps": 5}},
                                    {"name": "baft", "hparams": {"max_steps": 5}}])
    done = subprocess.run([*KEBENCH, "grid", "--grid", grid, "--quiet", "--num-cpus", "2", "--tables", "none"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "OutOfMemoryError" not in done.stderr
    cells = _cells(tmp_path / "store")
    assert set(cells) == {"reft", "baft"}
    for status, error, _, _ in cells.values():
        assert status == "failed" and error.startswith("out of memory: ") and "running low on memory" in error
        assert "Object store memory usage" not in error
    assert "ran 2 (ok 0, failed 2)" in done.stderr.replace("\n", " ")
