"""A scenario kind declared by a plug-in (here: this test module) runs in a grid like a built-in one.

``reversed(T, rounds)`` is invented for the test: streams of T cases edited last-first, the stream applied
``rounds`` times over, scored after its last call and restored.  It is declared through the public API
only (``kebench.register_scenario`` with its own stream logic) and then goes everywhere a built-in kind
goes: a grid file's ``scenarios:``, the cell id (its parameter included), the Ray workers (the driver hands
them the declaration), the store, and a table of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import kebench
from kebench.core import scenarios as scenario_registry
from kebench.core.errors import KebenchError
from results import registry as table_registry

KIND = kebench.ScenarioKind(
    "reversed", "streams of T cases edited last-first, the whole stream `rounds` times over",
    sets=("T",), params=(kebench.ScenarioParam("rounds", 1, "passes over the stream"),),
    label="reversed(T={T},rounds={rounds})", shape="reversed T={T} rounds={rounds}",
    table=kebench.TableShape("Reversed editing", ("model", "benchmark", "split"), ("T",)),
    streams=lambda cases, scenario: reversed_streams(cases, scenario),
)


def reversed_streams(cases, scenario):
    """Streams of T cases, each edited alone, last case first, ``rounds`` passes."""
    streams = []
    for start in range(0, len(cases), scenario.T):
        order = tuple((case,) for case in reversed(cases[start : start + scenario.T]))
        streams.append(kebench.Stream(order * scenario.param("rounds")))
    return streams


@pytest.fixture
def reversed_kind(monkeypatch: pytest.MonkeyPatch):
    """The kind registered for one test and gone afterwards (with the table it brought)."""
    monkeypatch.setattr(scenario_registry, "_REGISTRY", dict(scenario_registry._REGISTRY))
    monkeypatch.setattr(table_registry, "_REGISTRY", dict(table_registry._REGISTRY))
    return kebench.register_scenario(KIND)


def _grid(tmp_path: Path, scenarios: list) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "new-kind", "store": str(tmp_path / "store"), "resources": {"num_cpus": 1, "num_gpus": 0},
        "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 4}],
        "scenarios": scenarios, "methods": ["unedited", "reft"], "seeds": [0],
    }), encoding="utf-8")
    return path


def test_an_undeclared_kind_is_refused(tmp_path: Path) -> None:
    from orchestrator.grid import load_grid

    with pytest.raises(KebenchError, match=r"scenarios\[0\].kind: unknown scenario 'reversed'"):
        load_grid(_grid(tmp_path, [{"kind": "reversed", "T": 2}]))


def test_its_parameters_enter_the_label_and_the_cell_id(tmp_path: Path, reversed_kind) -> None:
    from orchestrator.grid import expand, load_grid

    grid = load_grid(_grid(tmp_path, [{"kind": "reversed", "T": 2, "rounds": [1, 2]}]))
    assert [s.label for s in grid.scenarios] == ["reversed(T=2,rounds=1)", "reversed(T=2,rounds=2)"]
    cells = expand(grid)
    assert len({cell.cell_id for cell in cells}) == 4
    assert cells[0].scenario.identity() == {"kind": "reversed", "T": 2, "B": 1, "rounds": 1}
    with pytest.raises(KebenchError, match=r"scenarios\[0\]: scenario reversed sets T: B must be 1"):
        load_grid(_grid(tmp_path, [{"kind": "reversed", "T": 2, "B": 2}]))
    with pytest.raises(KebenchError, match=r"unknown key 'round' in scenarios\[0\] \(did you mean 'rounds'\?\)"):
        load_grid(_grid(tmp_path, [{"kind": "reversed", "T": 2, "round": 2}]))


@pytest.mark.ray
def test_a_grid_runs_the_new_kind_on_ray_workers(tmp_path: Path, reversed_kind) -> None:
    import ray

    from orchestrator.grid import load_grid
    from orchestrator.ray_session import local_ray_loopback
    from orchestrator.runner import run_grid
    from results.tables import render, table_names

    grid = load_grid(_grid(tmp_path, [{"kind": "reversed", "T": 2, "rounds": 2}, {"kind": "continual", "T": 2}]))
    local_ray_loopback()
    # the workers unpickle the declaration's stream logic by reference: this module must import there
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [tests, str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        report = run_grid(grid, tmp_path / "store", workers=2)
    finally:
        ray.shutdown()
    assert (report.ok, report.failed) == (4, 0), report.failures
    assert "reversed" in table_names()
    table = render(tmp_path / "store", "reversed", "md")
    assert table.startswith("## Reversed editing") and "| reft |" in table and "T=2 Rel." in table
    # the same cases edited in another order, twice over: not the continual numbers
    continual = render(tmp_path / "store", "continual", "md")
    reft_reversed = next(line for line in table.splitlines() if line.startswith("| reft |"))
    reft_continual = next(line for line in continual.splitlines() if line.startswith("| reft |"))
    assert reft_reversed != reft_continual
