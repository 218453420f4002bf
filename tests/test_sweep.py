"""Ray Tune sweeps: validation errors; grid, random and Optuna (two objectives, constrained) search on the
tiny model; trials stored as cells beside grid cells; the sweep table, its Pareto front and plots; the
exported configuration in a grid, and the leakage check.  (Resume after a SIGKILL: test_sweep_resume.py.)"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kebench.core.errors import KebenchError
from orchestrator.exports import check_hparams_file_leakage, hparams_file_origin, read_export_identity
from orchestrator.sweep import best_yaml, export_best, load_sweep, make_search, parse_sweep, ranked_trials, run_sweep
from results.sweeps import dominates, pareto_front, pareto_layers
from results.tables import render
from results.views import connect, records

BASE = {
    "name": "t", "model": "tiny-random-llama", "method": "baft",
    "benchmark": {"name": "zsre", "split": "dev", "n": 2}, "scenario": {"kind": "continual", "T": 1},
    "metric": "avg", "samples": 1, "space": {"rank": {"grid": [2, 4]}},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"rnak": {"grid": [2]}}}, "space.rnak: not a hyperparameter of baft"),
        ({"space": {"rank": {"normal": [2]}}}, "space.rank must be one of"),
        ({"space": {"lr": {"loguniform": [0, 1]}}}, r"space.lr.loguniform needs low > 0"),
        ({"space": {"lr": {"uniform": [1]}}}, r"space.lr.uniform needs \[low, high\]"),
        ({"benchmark": {"name": "zsre", "split": "test", "n": 2}}, "benchmark.split must be 'dev'"),
        ({"benchmark": {"name": "zsre", "split": "dev", "n": 3}, "scenario": {"kind": "continual", "T": 2}},
         "n=3 does not split into streams of 2"),
        ({"metric": "speed"}, "metric 'speed' unknown"),
        ({"metric": None, "objectives": ["rel", "speed"]}, r"objectives\[1\] 'speed' unknown"),
        ({"objectives": ["rel", "loc"]}, "give one of metric, objectives or objective"),
        ({"metric": None, "objectives": ["rel"]}, "objectives must be a list of at least two"),
        ({"metric": None, "objectives": ["rel", "rel"]}, "objectives: duplicate"),
        ({"metric": None, "objective": {"maximize": "rel", "subject_to": {"loc": "> 0.9"}}},
         r"objective.subject_to.loc must be '>= X' or '<= X'"),
        ({"metric": None, "objective": {"maximise": "rel"}}, "objective must be"),
        ({"metric": None, "objectives": ["rel", "loc"], "search": "random"}, "search must be optuna for several"),
        ({"metric": None, "objectives": ["rel", "loc"], "scheduler": "asha"}, "asha prunes on one metric"),
        ({"search": "bayes"}, "search must be one of optuna, random, grid, got 'bayes'"),
        ({"search": "grid", "space": {"lr": {"uniform": [0.1, 0.2]}}}, "space.lr is continuous"),
        ({"max_concurrent": 0}, "max_concurrent must be a positive integer"),
        ({"scenario": {"kind": "continual", "T": 0}}, "T must be a positive integer"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"methd": "baft"}, "unknown key 'methd'"),
    ],
)
def test_bad_sweeps_name_the_key(change, message):
    raw = {**BASE, **change}
    raw = {key: value for key, value in raw.items() if value is not None}
    with pytest.raises(KebenchError, match=message) as info:
        parse_sweep(raw, "s.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("s.yaml: ")


def test_objective_forms_parse():
    multi = parse_sweep({**{k: v for k, v in BASE.items() if k != "metric"}, "objectives": ["rel", "loc"]}, "s")
    assert multi.goals == ("rel", "loc") and multi.goal_modes == ("max", "max") and multi.multi
    constrained = parse_sweep({**{k: v for k, v in BASE.items() if k != "metric"},
                               "objective": {"maximize": "rel", "subject_to": {"loc": ">= 0.9"}}}, "s")
    assert constrained.goals == ("rel",) and constrained.constraints == (("loc", ">=", 0.9),)
    assert parse_sweep(BASE, "s").goals == ("avg",) and parse_sweep(BASE, "s").search == "optuna"


def test_shipped_sweep_files_load():
    spec = load_sweep("sweeps/baft-margins.yaml")
    searched = {name for name, _, _ in spec.space}
    assert spec.method == "baft" and spec.split == "dev" and spec.n == 20
    assert spec.scenario_kind == "continual" and spec.T == 10
    assert spec.goals == ("rel", "loc") and spec.search == "optuna" and spec.total_trials >= 12
    assert searched >= {"alpha", "beta", "gamma", "rank", "lr", "balancing", "balance_form", "balance_single",
                        "early_stop_on"}


def test_pareto_layers_by_brute_force():
    points = [(0.9, 0.1), (0.5, 0.5), (0.1, 0.9), (0.4, 0.4), (0.5, 0.5), (0.05, 0.05), None]
    layers = pareto_layers(points, ["max", "max"])
    assert layers == [1, 1, 1, 2, 1, 3, None]
    assert pareto_front([(1.0, 2.0), (2.0, 1.0)], ["min", "min"]) == [True, True]
    assert pareto_front([(1.0, 2.0), (2.0, 3.0)], ["min", "min"]) == [True, False]
    assert not dominates((0.5, 0.5), (0.5, 0.5), ["max", "max"])


def test_constrained_optuna_search_hands_optuna_the_constraints():
    """Optuna's constrained TPE sees loc >= 0.9 as a constraint value (<= 0 is feasible) per trial."""
    from ray import tune

    spec = parse_sweep({**{k: v for k, v in BASE.items() if k != "metric"}, "samples": 4,
                        "objective": {"maximize": "rel", "subject_to": {"loc": ">= 0.9"}},
                        "space": {"lr": {"loguniform": [0.01, 0.1]}}}, "s")
    search = make_search(spec)
    assert search.set_search_properties("rel", "max", {"lr": tune.loguniform(0.01, 0.1)})
    for trial_id, loc in (("a", 0.95), ("b", 0.5)):
        assert 0.01 <= search.suggest(trial_id)["lr"] <= 0.1
        search.on_trial_complete(trial_id, {"rel": 0.7, "loc": loc})
    trials = search._ot_study.trials
    assert [t.constraints for t in trials] == [{"loc >= 0.9": pytest.approx(-0.05)}, {"loc >= 0.9": pytest.approx(0.4)}]


def _grid_row(cell_id: str, **extra) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {"cell_id": cell_id, "attempt": 1, "status": "ok", "model": "m", "benchmark": "zsre", "split": "test",
            "n": 1, "offset": 0, "scenario": "single", "T": 1, "B": 1, "method": "baft", "label": "baft", "seed": 0,
            "hparams": {}, "device": "cpu", "dtype": "float32", "code_version": "x", "data_sha256": "d",
            "provenance": "", "packages": {}, "started_at": now, "finished_at": now, **extra}


def test_views_keep_trials_out_of_grid_tables_and_read_old_stores(tmp_path):
    from results.store import CELLS_DIR, write_cell_attempt

    case = [{"stream": 0, "case_id": "c1", "metric": "rel", "value": 1.0, "protocol": "teacher_forced"}]
    write_cell_attempt(tmp_path, _grid_row("grid1"), case)
    write_cell_attempt(tmp_path, _grid_row("tune1", kind="tune", sweep="s", trial_id="x1"), case)
    with connect(tmp_path) as con:
        assert [r["cell_id"] for r in records(con, "SELECT cell_id FROM cells_latest")] == ["grid1"]
        assert [r["cell_id"] for r in records(con, "SELECT cell_id FROM cases_latest")] == ["grid1"]
        assert [r["trial_id"] for r in records(con, "SELECT trial_id FROM trials_latest")] == ["x1"]
        assert [r["cell_id"] for r in records(con, "SELECT cell_id FROM trial_cases")] == ["tune1"]
    assert "| baft |" in render(tmp_path, "single", "md")
    # A store written before the three columns existed: every cell is a grid cell.
    for path in (tmp_path / CELLS_DIR).rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["kind", "sweep", "trial_id"]), path)
    with connect(tmp_path) as con:
        assert sorted(r["cell_id"] for r in records(con, "SELECT cell_id FROM cells_latest")) == ["grid1", "tune1"]
        assert records(con, "SELECT count(*) AS n FROM trials_latest") == [{"n": 0}]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.ray_session import local_ray_loopback

    local_ray_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _trial_rows(store: Path) -> list[dict]:
    with connect(store) as con:
        return records(con, "SELECT * FROM trials_latest ORDER BY trial_id")


@pytest.mark.ray
def test_grid_search_trials_are_cells_and_the_sweep_table_ranks_them(tmp_path, ray_local):
    store = tmp_path / "sweep"
    spec = parse_sweep({**BASE, "search": "grid", "store": str(store), "samples": 1,
                        "space": {"rank": {"grid": [2, 4]}, "max_steps": {"choice": [3]}}}, "s.yaml")
    outcome = run_sweep(spec, num_cpus=2)
    assert len(outcome) == 2 and not outcome.errors and outcome.stored == 2 and not outcome.interrupted
    trials = _trial_rows(store)
    assert [row["kind"] for row in trials] == ["tune", "tune"] and {row["sweep"] for row in trials} == {"t"}
    assert len({row["trial_id"] for row in trials}) == 2
    assert sorted(json.loads(row["hparams"])["rank"] for row in trials) == [2, 4]
    assert all(json.loads(row["hparams"])["layers"] == [0, 1] for row in trials)  # the full resolved set
    with connect(store) as con:
        per_trial = records(con, "SELECT cell_id, count(DISTINCT case_id) AS cases, count(*) AS rows "
                                 "FROM trial_cases GROUP BY cell_id")
        assert len(per_trial) == 2 and all(r["cases"] == 2 and r["rows"] >= 2 * 3 for r in per_trial)
        assert records(con, "SELECT count(*) AS n FROM cells_latest") == [{"n": 0}]
    assert render(store, "continual", "md").startswith("no continual results")  # grid tables skip trials
    table = render(store, "sweep", "md")
    assert "sweep t" in table and "★" in table and table.count("| 1. ") == 1 and table.count("| 2. ") == 1
    plot = store / "plots" / "sweep-t.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot) in table
    frame = pq.read_table(store / "trials.parquet").to_pydict()
    assert sorted(frame["config/rank"]) == [2, 4] and all(0.0 <= value <= 1.0 for value in frame["avg"])
    assert "rank:" in best_yaml(outcome, spec)


@pytest.mark.needs_data("zsre")
@pytest.mark.ray
def test_optuna_pareto_front_export_and_leakage(tmp_path, ray_local):
    from methods.hparams import hparams_dict, load_hparams
    from orchestrator.grid import parse_grid

    store = tmp_path / "mo"
    raw = {**{k: v for k, v in BASE.items() if k != "metric"}, "name": "mo", "store": str(store),
           "benchmark": {"name": "zsre", "split": "dev", "n": 4}, "scenario": {"kind": "continual", "T": 2},
           "objectives": ["rel", "loc"], "search": "optuna", "samples": 4, "max_concurrent": 2,
           "space": {"lr": {"loguniform": [0.01, 0.2]}, "rank": {"grid": [2, 4]}, "max_steps": {"choice": [4]}}}
    spec = parse_sweep(raw, "mo.yaml")
    outcome = run_sweep(spec, num_cpus=2)
    assert outcome.stored == 4 and outcome.failed == 0 and not outcome.interrupted
    from results.sweeps import sweep_groups

    with connect(store) as con:
        (keys, ranked), = sweep_groups(con, "mo")
    points = [tuple(t["means"][m] for m in ("rel", "loc")) for t in ranked]
    brute = [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]
    assert [t["front"] for t in ranked] == brute and any(brute)
    assert all(ranked[i]["front"] or not ranked[i + 1]["front"] for i in range(len(ranked) - 1))  # front first
    table = render(store, "sweep", "md")
    rows = [line for line in table.splitlines() if line.startswith("| ") and ". " in line.split("|")[1]]
    assert len(rows) == 4 and sum("★" in row for row in rows) == sum(brute) and "optuna: rel vs loc" in table
    assert (store / "plots" / "sweep-mo-front.png").is_file()

    exported = tmp_path / "tuned.yaml"
    chosen = export_best(spec, exported, store)
    assert chosen["trial_id"] == ranked[0]["trial_id"] and chosen["front"]
    text = exported.read_text()
    assert "sweep 'mo'" in text and "zsre/dev n=4" in text and f"trial {chosen['trial_id']}" in text
    identity = read_export_identity(exported)
    assert identity["benchmark"] == "zsre" and identity["split"] == "dev" and len(identity["case_ids"]) == 4
    hparams = load_hparams("baft", "tiny-random-llama", "continual", path=exported)
    assert hparams_dict(hparams) == chosen["hparams"]  # the full configuration round-trips
    assert hparams_file_origin(exported).startswith(f"from sweep mo trial {chosen['trial_id']}")

    def grid(split: str, n: int | None) -> object:
        bench = {"name": "zsre", "split": split, **({"n": n} if n else {})}
        return parse_grid({"name": "g", "models": ["tiny-random-llama"], "benchmarks": [bench],
                           "scenarios": [{"kind": "continual", "T": 2}],
                           "methods": [{"name": "baft", "label": "tuned", "hparams_file": str(exported)}]}, "g.yaml")

    check_hparams_file_leakage(grid("test", 4))  # disjoint from the dev cases: fine
    check_hparams_file_leakage(grid("dev", 4))  # the dev split itself is not a report
    with pytest.raises(KebenchError, match=r"g.yaml: methods\[0\] \('tuned'\).hparams_file .* overlaps") as info:
        check_hparams_file_leakage(grid("all", None))
    assert "\n" not in str(info.value)


def test_cli_refuses_a_sweep_on_a_test_split(tmp_path, capsys):
    from orchestrator.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "benchmark": {"name": "zsre", "split": "test", "n": 2}}))
    assert main(["sweep", "--sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "benchmark.split must be 'dev'" in err and str(path) in err


@pytest.mark.needs_data("zsre")  # the `all` split reads the TriviaQA file
def test_cli_refuses_a_grid_on_cases_its_hparams_file_was_tuned_on(tmp_path, capsys):
    from orchestrator.cli import main

    identity = {"sweep": "s", "benchmark": "zsre", "split": "dev", "n": 2, "offset": 0,
                "case_ids": ["zsre-0", "zsre-1"]}
    from orchestrator.exports import case_ids_sha256
    from benchmarks.registry import select_cases

    dev = select_cases("zsre", "dev", 2, 0)
    identity.update(case_ids=[c.case_id for c in dev.cases], case_ids_sha256=case_ids_sha256([c.case_id for c in dev.cases]))
    hp = tmp_path / "tuned.yaml"
    hp.write_text("# kebench-sweep: " + json.dumps(identity) + "\n" + Path("methods/hparams/baft/tiny-random-llama.yaml").read_text())
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "store": str(tmp_path / "store"), "models": ["tiny-random-llama"],
                                    "benchmarks": [{"name": "zsre", "split": "all"}],
                                    "scenarios": [{"kind": "single"}],
                                    "methods": [{"name": "baft", "hparams_file": str(hp)}]}))
    assert main(["grid", "--grid", str(grid), "--tables", "none", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "overlaps" in err and str(hp) in err
    assert list(itertools.islice((tmp_path / "store").rglob("*.parquet"), 1)) == []


@pytest.mark.ray
def test_asha_stopped_trials_are_stored_with_the_cases_they_ran(tmp_path, ray_local):
    """Random search + ASHA: every trial is stored; one stopped early keeps the rows of its finished streams."""
    store = tmp_path / "asha"
    spec = parse_sweep({**BASE, "name": "asha", "store": str(store), "search": "random", "samples": 4,
                        "scheduler": "asha", "benchmark": {"name": "zsre", "split": "dev", "n": 4},
                        "space": {"lr": {"loguniform": [0.001, 0.3]}, "max_steps": {"choice": [2]}}}, "a.yaml")
    outcome = run_sweep(spec, num_cpus=2)
    assert outcome.stored == 4 and outcome.failed == 0 and not outcome.interrupted
    with connect(store) as con:
        rows = records(con, "SELECT t.n, t.provenance, count(DISTINCT c.case_id) AS cases FROM trials_latest t "
                            "JOIN trial_cases c USING (cell_id, attempt) GROUP BY ALL")
    assert len(rows) == 4
    for row in rows:
        assert row["cases"] == row["n"] and 1 <= row["n"] <= 4
        assert ("stopped early by asha" in row["provenance"]) == (row["n"] < 4)


@pytest.mark.ray
def test_a_trial_is_a_cell_with_the_grids_precision_and_provenance(tmp_path, ray_local):
    """A trial runs through the grid's cell body: the precision policy (here bfloat16, as a grid entry with
    ``dtype: bfloat16`` would run), the hyperparameter file and its hash, and the hardware record."""
    import torch

    store = tmp_path / "bf16"
    spec = parse_sweep({**BASE, "name": "bf16", "search": "grid", "store": str(store), "dtype": "bfloat16",
                        "space": {"rank": {"grid": [2]}, "max_steps": {"choice": [3]}}}, "s.yaml")
    assert spec.hparams_source.startswith("hparams: methods/hparams/baft/tiny-random-llama.yaml (sha256 ")
    outcome = run_sweep(spec, num_cpus=2)
    assert outcome.stored == 1 and outcome.failed == 0
    (row,) = _trial_rows(store)
    assert row["dtype"] == "bfloat16" and row["device"] == "cpu"
    assert spec.hparams_source in row["provenance"]
    hardware = json.loads(row["hardware"])  # the CPU, the ISA torch dispatched to and the libraries (issue 30)
    assert hardware["cpu"] and hardware["isa"] and hardware["torch"] == torch.__version__ and hardware["threads"] >= 1
    assert {"mkl", "onednn", "blas", "mkl_cnr"} <= set(hardware) and row["numerics"] == hardware["numerics"]
    assert "model seed=1234" in row["provenance"] and "kebench-sweep " in row["provenance"]
    assert json.loads(row["hparams"])["rank"] == 2 and row["trainable_params"] > 0
    assert torch.get_default_dtype() == torch.float32  # the driver itself is untouched


@pytest.mark.needs_data("convsent")
@pytest.mark.ray
def test_convsent_es_is_a_sweep_objective(tmp_path, ray_local):
    """ConvSent's ES is scored by the benchmark's own scorer under its own protocol; a sweep can maximise it."""
    store = tmp_path / "es"
    spec = parse_sweep({**{k: v for k, v in BASE.items() if k != "metric"}, "name": "es", "store": str(store),
                        "benchmark": {"name": "convsent", "split": "dev", "n": 2}, "scenario": {"kind": "single"},
                        "objective": {"maximize": "es", "subject_to": {"dd": "<= 100"}}, "samples": 2,
                        "space": {"lr": {"choice": [0.01, 0.05]}, "max_steps": {"choice": [2]}}}, "es.yaml")
    outcome = run_sweep(spec, num_cpus=2)
    assert outcome.stored == 2 and outcome.failed == 0
    frame = outcome.get_dataframe()
    assert "es" in frame.columns and frame["es"].notna().all()
    trials = ranked_trials(spec, store)
    assert all(t["objective_values"] is not None and 0.0 <= t["objective_values"][0] <= 1.0 for t in trials)
    assert [t["objective_values"][0] for t in trials] == sorted((t["means"]["es"] for t in trials), reverse=True)
    assert "ES" in render(store, "sweep", "md")
