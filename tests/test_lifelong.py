"""lifelong(N, B, checkpoints) (issue 28, AlphaEdit's protocol): one never-restored stream scored at checkpoints.

The scenario on the tiny model (rows per checkpoint, exact restore, scores untouched by the scoring in between,
downstream at every checkpoint), its one-line grid errors, the store's ``checkpoint`` column (old stores read
NULL), the table shape, the leaderboard at the last checkpoint with its curve figure, ``kebench plan``'s
pricing, the shipped grids, and resume after a lifelong cell is interrupted (a local Ray instance).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import NOW, changed_keys, state_snapshot
from kebench.core.errors import KebenchError
from methods.base import Editor, EditStats, register_method
from orchestrator.grid import expand, load_grid, parse_grid
from orchestrator.scenarios import Scenario, make_streams, run_scenario
from results import rows
from results.store import latest_attempts, write_cell_attempt
from results.tables import render
from results.views import connect, records

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-random-llama"


def _lifelong(N: int, B: int, checkpoints: list[int]) -> Scenario:
    return Scenario("lifelong", B=B, params=(("N", N), ("checkpoints", checkpoints)))


# --------------------------------------------------------------------------- the declaration and the streams

def test_streams_checkpoints_and_canonical_values(zsre_dev):
    scenario = _lifelong(4, 2, [2])
    # N is always the last checkpoint, so the grid may leave it out and both spellings are one cell
    assert scenario.param("checkpoints") == (2, 4) and scenario == _lifelong(4, 2, [2, 4])
    assert scenario.identity() == {"kind": "lifelong", "T": 1, "B": 2, "N": 4, "checkpoints": [2, 4]}
    assert scenario.label == "lifelong(N=4,B=2,checkpoints=[2, 4])"
    streams = make_streams(zsre_dev, scenario)  # 8 cases: two streams of N = 4, each restored at its end
    assert [[[c.case_id for c in call] for call in s.calls] for s in streams] == [
        [[c.case_id for c in zsre_dev[0:2]], [c.case_id for c in zsre_dev[2:4]]],
        [[c.case_id for c in zsre_dev[4:6]], [c.case_id for c in zsre_dev[6:8]]]]
    assert [s.checkpoints for s in streams] == [(1, 2), (1, 2)]  # in calls of B
    assert scenario.scorings(8) == 2 * (2 + 4) and Scenario("continual", T=2).scorings(8) == 8


@pytest.mark.parametrize("B, params, message", [
    (10, {"N": 205, "checkpoints": [10]}, "N=205 is not a multiple of B=10"),
    (10, {"N": 200, "checkpoints": [50, 10]}, "checkpoints must be strictly ascending, got [50, 10]"),
    (10, {"N": 200, "checkpoints": [10, 300]}, "checkpoints: 300 exceeds N=200"),
    (10, {"N": 200, "checkpoints": [10, 15]}, "checkpoints: 15 is not a multiple of B=10"),
    (1, {"checkpoints": [10]}, "missing required parameter 'N'"),
    (1, {"N": 10, "checkpoints": 5}, "checkpoints must be a list of positive integers"),
])
def test_bad_parameters(B, params, message):
    with pytest.raises(KebenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Scenario("lifelong", B=B, params=tuple(params.items()))


# --------------------------------------------------------------------------- grid errors: one line, file and key

GRID = {"name": "ll", "models": [MODEL], "benchmarks": [{"name": "zsre", "split": "dev", "n": 8}],
        "scenarios": [{"kind": "lifelong", "N": 8, "B": 2, "checkpoints": [2, 4]}], "methods": ["ft-l"]}


@pytest.mark.parametrize("changes, fragments", [
    ({"scenarios": [{"kind": "lifelong", "N": 8, "B": 2, "checkpoints": [2, 10]}]},
     ("scenarios[0]:", "checkpoints: 10 exceeds N=8")),
    ({"scenarios": [{"kind": "lifelong", "N": 8, "B": 2, "checkpoints": [3]}]},
     ("scenarios[0]:", "checkpoints: 3 is not a multiple of B=2")),
    ({"scenarios": [{"kind": "lifelong", "N": 8, "B": 2, "checkpoints": [4, 2]}]},
     ("scenarios[0]:", "strictly ascending")),
    ({"scenarios": [{"kind": "lifelong", "N": 8, "B": 3, "checkpoints": [3]}]},
     ("scenarios[0]:", "N=8 is not a multiple of B=3")),
    ({"scenarios": [{"kind": "lifelong", "B": 2, "checkpoints": [2]}]}, ("scenarios[0]:", "missing required parameter 'N'")),
    ({"scenarios": [{"kind": "lifelong", "N": 8, "T": 2, "checkpoints": [2]}]}, ("scenarios[0]:", "T must be 1")),
    ({"scenarios": [{"kind": "lifelong", "N": 8, "checkpoints": [2], "every": 2}]}, ("unknown key 'every'",)),
    ({"benchmarks": [{"name": "zsre", "split": "dev", "n": 4}]},
     ("benchmarks[0] (zsre/dev, n=4)", "streams of 8", "fewer cases than one stream")),
    ({"benchmarks": [{"name": "zsre", "split": "dev", "n": 12}]}, ("benchmarks[0] (zsre/dev, n=12)", "streams of 8")),
    ({"methods": ["ft-l", "rome"]}, ("methods[1] ('rome')", "rome cannot take B=2", "use B: 1")),
    ({"methods": ["memit", {"name": "grace", "label": "g"}]}, ("methods[1] ('g')", "grace cannot take B=2")),
])
def test_a_bad_lifelong_grid_is_one_line_naming_file_and_key(tmp_path, changes, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GRID, **changes}), encoding="utf-8")
    with pytest.raises(KebenchError) as info:
        expand(load_grid(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_methods_that_edit_a_call_in_turn_run_b1(tmp_path):
    ok = {**GRID, "scenarios": [{"kind": "lifelong", "N": 8, "B": 1, "checkpoints": [2]}],
          "methods": ["rome", "grace", "melo", "memit"]}
    assert len(expand(parse_grid(ok, "ok.yaml"))) == 4
    with pytest.raises(KebenchError, match="rome cannot take B=2"):  # kebench edit and sweeps reach run_scenario
        run_scenario(None, "rome", None, [], _lifelong(2, 2, [2]), seed=0)


# --------------------------------------------------------------------------- running it on the tiny model

def _tiny_hparams(method: str, **overrides):
    from methods.hparams import load_hparams

    return load_hparams(method, MODEL, "lifelong", overrides)


def test_checkpoint_rows_and_an_exact_restore(tiny_lm, zsre_dev):
    """At checkpoint c the first c cases of the stream are scored, each once per protocol; the weights are the
    original ones bit for bit after the stream; the last checkpoint's scores are batched(B, N/B)'s: scoring in
    between does not move the stream."""
    before = state_snapshot(tiny_lm)
    hparams = _tiny_hparams("memit", v_num_grad_steps=5)  # MEMIT's batch update; few δ steps: seconds
    cases = zsre_dev[:6]
    result = run_scenario(tiny_lm, "memit", hparams, cases, _lifelong(6, 2, [2, 4]), seed=0)
    assert not changed_keys(tiny_lm, before)
    assert len(result.edit_seconds) == 3  # N / B calls
    at = {c: [r.case_id for r in result.cases if r.checkpoint == c] for c in (2, 4, 6)}
    assert {c: len(ids) for c, ids in at.items()} == {2: 2, 4: 4, 6: 6}
    assert all(ids == [case.case_id for case in cases[:c]] for c, ids in at.items())
    assert {r.checkpoint for r in result.cases} == {2, 4, 6} and {r.stream for r in result.cases} == {0}

    stored = rows.case_rows(result.cases)
    assert Counter(row["checkpoint"] for row in stored if row["metric"] == "rel") == {2: 2, 4: 4, 6: 6}
    batched = run_scenario(tiny_lm, "memit", hparams, cases, Scenario("batched", B=2, T=3), seed=0)
    last = {r.case_id: r.scores.as_dict() for r in result.cases if r.checkpoint == 6}
    assert last == {r.case_id: r.scores.as_dict() for r in batched.cases}


@dataclass(frozen=True)
class _NoHParams:
    scale: float = 1.5


@register_method("test-lifelong-leaky")
class _Leaky(Editor):
    """Scales a weight on every call and never puts it back: the guard must stop the stream's end."""

    hparams_class = _NoHParams

    def apply(self, cases):
        with torch.no_grad():
            self.lm.model.lm_head.weight.mul_(self.hparams.scale)
        return EditStats(steps=0, loss=0.0)

    def restore(self):
        pass

    def trainable_parameters(self):
        return 0


def test_a_restore_that_is_not_exact_stops_the_stream(tiny_lm, zsre_dev):
    original = tiny_lm.model.lm_head.weight.detach().clone()
    try:
        with pytest.raises(RuntimeError, match="did not return the model to its original outputs"):
            run_scenario(tiny_lm, "test-lifelong-leaky", _NoHParams(), zsre_dev[:4], _lifelong(4, 2, [2]), seed=0, metrics=("rel",))
    finally:
        with torch.no_grad():
            tiny_lm.model.lm_head.weight.copy_(original)


def test_downstream_is_scored_at_every_checkpoint(tiny_lm, zsre_dev):
    from benchmarks.metrics import encode
    from benchmarks.registry import _DOWNSTREAM, register_downstream

    seen: list[float] = []

    @register_downstream("test-ll-logit", "the mean logit of a fixed prompt (moves with any edit)")
    def mean_logit(logits_fn, lm, n, data_dir=None):
        batch = encode(lm.tokenizer, [("The capital of France is", "Paris")], lm.pad_token_id)
        with torch.no_grad():
            seen.append(float(logits_fn(batch.to(lm.device)).float().mean()))
        return seen[-1], 1

    try:
        scenario = Scenario("lifelong", B=1, downstream="test-ll-logit",
                            params=(("N", 4), ("checkpoints", [1, 2])))
        result = run_scenario(tiny_lm, "ft-l", _tiny_hparams("ft-l", max_steps=3), zsre_dev[:4], scenario, seed=0,
                              metrics=("rel",))
    finally:
        _DOWNSTREAM.pop("test-ll-logit")
    check = result.downstream
    assert len(seen) == 4 and seen[0] == check.unedited  # unedited, then after 1, 2 and 4 edits
    assert check.checkpoints == ((1, seen[1]), (2, seen[2]), (4, seen[3])) and check.edited == (seen[3],)
    assert result.artifacts[0]["downstream_checkpoints"] == {"1": seen[1], "2": seen[2], "4": seen[3]}


# --------------------------------------------------------------------------- the store, the table, the leaderboard

def _put(store: Path, label: str, by_checkpoint: dict[int, list[float]], *, status: str = "ok", B: int = 1,
         method: str | None = None, seconds: float = 1.0, wall: float = 0.0, attempt: int = 1) -> str:
    """A lifelong cell whose case q<i> scores ``by_checkpoint[c][i]`` (rel) at checkpoint c."""
    cell_id = f"ll-{label}-B{B}"
    n = max(by_checkpoint) if by_checkpoint else 4
    cell = dict(cell_id=cell_id, attempt=attempt, status=status, error=None if status == "ok" else "OOM", model=MODEL,
                benchmark="zsre", split="dev", n=n, offset=0, scenario="lifelong", T=1, B=B,
                method=method or label, label=label, seed=0, hparams="{}", seconds_per_edit=seconds,
                trainable_params=0, device="cpu", dtype="float32", code_version="v", data_sha256="x",
                provenance="", packages="{}", started_at=NOW, finished_at=NOW + dt.timedelta(seconds=wall))
    cases = [dict(stream=0, case_id=f"q{index}", metric="rel", value=value, protocol="teacher_forced", checkpoint=c)
             for c, values in by_checkpoint.items() for index, value in enumerate(values)] if status == "ok" else []
    write_cell_attempt(store, cell, cases)
    return cell_id


def test_a_case_may_repeat_across_checkpoints_but_not_within_one(tmp_path):
    _put(tmp_path, "a", {2: [1.0, 1.0], 4: [0.5] * 4})
    with connect(tmp_path) as con:
        found = records(con, "SELECT checkpoint, count(*) AS n FROM cases_latest GROUP BY ALL ORDER BY 1")
    assert found == [{"checkpoint": 2, "n": 2}, {"checkpoint": 4, "n": 4}]
    cell = dict(cell_id="dup", attempt=1, status="ok", model=MODEL, benchmark="zsre", split="dev", n=1, offset=0,
                scenario="lifelong", T=1, B=1, method="a", label="a", seed=0, hparams="{}", device="cpu",
                dtype="float32", code_version="v", data_sha256="x", provenance="", packages="{}", started_at=NOW,
                finished_at=NOW)
    twice = [dict(stream=0, case_id="q0", metric="rel", value=1.0, protocol="teacher_forced", checkpoint=1)] * 2
    with pytest.raises(ValueError, match="duplicate"):
        write_cell_attempt(tmp_path, cell, twice)


def test_an_old_store_without_the_column_reads_null(tmp_path):
    from helpers import put_cell

    put_cell(tmp_path, "reft", 2, {"rel": [1.0, 0.5]}, model=MODEL)
    for path in (tmp_path / "cases").rglob("*.parquet"):  # as written before the column existed
        table = pq.read_table(path)
        pq.write_table(table.drop(["checkpoint"]), path)
        assert "checkpoint" not in pq.read_schema(path).names
    with connect(tmp_path) as con:
        assert records(con, "SELECT DISTINCT checkpoint FROM cases_latest") == [{"checkpoint": None}]
    assert "| reft | 0.75 |" in render(tmp_path, "continual", "md")


def test_table_shape_and_the_leaderboard_ranks_at_the_last_checkpoint(tmp_path):
    from results.leaderboard import leaderboard_groups, write_leaderboard

    # a is better on average over the checkpoints (2.8 / 6 against 1.6 / 6), b after the last one (0.4 > 0.2)
    _put(tmp_path, "a", {2: [1.0, 1.0], 4: [0.2] * 4})
    _put(tmp_path, "b", {2: [0.0, 0.0], 4: [0.4] * 4})
    _put(tmp_path, "c", {}, status="failed")
    _put(tmp_path, "d", {2: [1.0, 0.0]})  # a shorter stream (N = 2): ranked in a group of its own
    table = render(tmp_path, "lifelong", "md")
    assert "### tiny-random-llama · zsre · B=1" in table
    assert "| Method | 2 edits Rel. | 2 edits Avg. | 4 edits Rel. | 4 edits Avg. |" in table
    assert "| a | 1.00 | **1.00** | 0.20 | <u>0.20</u> |" in table
    assert "| b | 0.00 | 0.00 | 0.40 | **0.40** |" in table
    assert "| c | × | × | × | × |" in table
    assert "| d | 0.50 | <u>0.50</u> | – | – |" in table

    with connect(tmp_path) as con:
        groups = leaderboard_groups(con, resamples=50)
        curves = leaderboard_groups(con, resamples=50, every_checkpoint=True)
    short, group = groups
    assert short.key["checkpoint"] == 2 and [e.label for e in short.entries] == ["d"]
    assert group.key["checkpoint"] == 4 and "lifelong B=1 after 4 edits" in group.title
    assert [(e.label, e.status, e.cases) for e in group.entries] == [("b", "leader", 4), ("a", "", 4)]
    assert group.entries[0].estimates["rel"].mean == pytest.approx(0.4) and "c" in group.failed
    assert sorted(g.key["checkpoint"] for g in curves) == [2, 4]

    out = tmp_path / "board"
    write_leaderboard(tmp_path, out, resamples=50)
    assert [p.name for p in (out / "plots").glob("lifelong-curves-*.png")]
    assert "metrics against edits made" in (out / "leaderboard.md").read_text()


# --------------------------------------------------------------------------- kebench plan

def test_plan_prices_the_edits_and_every_checkpoints_scoring(tmp_path):
    from orchestrator.plan import make_plan, render_plan

    spec = {**GRID, "scenarios": [{"kind": "lifelong", "N": 4, "B": 2, "checkpoints": [2]}], "methods": ["reft"]}
    grid = parse_grid(spec, "plan.yaml")
    cells = expand(grid)
    store = tmp_path / "store"
    # a measured lifelong cell of the same method: 2 s per call of 2 cases = 1 s per edit; 8 edits, then
    # 2 streams x (2 + 4) = 12 scorings in the remaining 6 s of its 14 s: 0.5 s per scoring
    cell = dict(cells[0].key_dict(), label="reft-measured", cell_id="measured", attempt=1, status="ok",
                hparams="{}", seconds_per_edit=2.0, device="cpu", dtype="float32", code_version="v",
                data_sha256="x", provenance="", packages="{}", started_at=NOW,
                finished_at=NOW + dt.timedelta(seconds=14))
    scored = [dict(stream=s, case_id=f"q{s * 4 + i}", metric="rel", value=1.0, protocol="teacher_forced", checkpoint=c)
              for s in (0, 1) for c in (2, 4) for i in range(c)]
    write_cell_attempt(store, cell, scored)
    plan = make_plan(grid, cells, store, workers=1)
    (row,) = plan.rows
    assert (row.edits, row.scorings) == (8, 12) and cells[0].scenario.scorings(8) == 12
    assert row.seconds_per_edit == pytest.approx(1.0) and row.eval_seconds_per_case == pytest.approx(0.5)
    assert row.device_hours == pytest.approx((8 * 1.0 + 12 * 0.5) * grid.resources.num_cpus / 3600)
    assert "| 8 | 12 |" in render_plan(plan) and "8 edits, 12 case scorings" in render_plan(plan)


# --------------------------------------------------------------------------- the shipped grids

@pytest.mark.parametrize("name", ["lifelong", "lifelong-b1", "lifelong-b1-slow", "lifelong-tiny"])
def test_the_shipped_lifelong_grids_parse(name):
    """alphaedit is issue 28's method on another branch: where it is not registered yet its entries are dropped."""
    from methods.base import method_names

    spec = yaml.safe_load((ROOT / "grids" / f"{name}.yaml").read_text(encoding="utf-8"))
    spec["methods"] = [m for m in spec["methods"] if m in method_names()]
    grid = parse_grid(spec, f"grids/{name}.yaml")
    (scenario,) = grid.scenarios
    assert scenario.kind == "lifelong" and scenario.param("checkpoints")[-1] == scenario.param("N")
    assert all(bench.n == scenario.param("N") for bench in grid.benchmarks)  # one stream per cell


# --------------------------------------------------------------------------- resume (a local Ray instance)

def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cell_files(store: Path) -> list[Path]:
    return sorted((store / "cells").rglob("*.parquet")) if (store / "cells").exists() else []


@pytest.mark.ray
@pytest.mark.slow  # 50 s; the generic resume is test_runner.py's: `make test-slow`
def test_an_interrupted_lifelong_cell_is_recomputed_and_only_it(tmp_path, monkeypatch):
    """Two lifelong cells on two workers: the unedited one is stored within a second, the ReFT stream (4 edits
    of 150 steps) is still running when the driver is killed (SIGKILL, nothing cleaned up); the rerun skips the
    stored cell and recomputes the interrupted one, which then equals an uninterrupted computation of it."""
    from orchestrator.runner import ModelCache, execute_cell

    spec = {**GRID, "store": str(tmp_path / "store"), "resources": {"num_cpus": 1, "num_gpus": 0},
            "benchmarks": [{"name": "zsre", "split": "dev", "n": 4}],
            "scenarios": [{"kind": "lifelong", "N": 4, "B": 1, "checkpoints": [1, 2]}],
            "methods": ["unedited", {"name": "reft", "hparams": {"max_steps": 150, "early_stop_loss": 0.0}}]}
    path = tmp_path / "ll.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    store = tmp_path / "store"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "orchestrator.cli", "grid", "--grid", str(path), "--quiet", "--num-cpus", "2",
               "--tables", "none"]
    quick, slow = expand(load_grid(path))

    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while quick.cell_id not in latest_attempts(store):
            assert driver.poll() is None, driver.communicate()[1]
            assert time.time() < deadline, "grid made no progress"
            time.sleep(0.1)
        started = _children(driver.pid)
        driver.kill()
        driver.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=20)
        for process in alive:  # by PID, never `ray stop`
            process.kill()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert slow.cell_id not in latest_attempts(store), "the ReFT stream finished before the kill: nothing interrupted"
    before = {p.name for p in _cell_files(store)}

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "ran 1 (ok 1, failed 0) · skipped 1" in " ".join(again.stderr.split()), again.stderr
    assert before < {p.name for p in _cell_files(store)} and len(_cell_files(store)) == 2  # one attempt each
    assert latest_attempts(store) == {quick.cell_id: (1, "ok"), slow.cell_id: (1, "ok")}

    # the recomputed cell equals the cell computed without interruption (one torch thread, as a 1-CPU worker)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        reference = execute_cell(slow, 1, ModelCache())
    finally:
        torch.set_num_threads(threads)
    assert reference.cell_row["status"] == "ok", reference.cell_row["error"]
    with connect(store) as con:
        stored = records(con, "SELECT case_id, metric, protocol, checkpoint, value FROM cases_latest "
                              "WHERE cell_id = $id ORDER BY ALL", {"id": slow.cell_id})
    expected = sorted((r["case_id"], r["metric"], r["protocol"], r["checkpoint"], r["value"])
                      for r in reference.case_rows)
    assert [tuple(r.values()) for r in stored] == expected
    assert Counter(r["checkpoint"] for r in stored if r["metric"] == "rel") == {1: 1, 2: 2, 4: 4}
