"""Grid parsing, validation and cell expansion (no model is loaded; the ZsRE file is read for hashes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.registry import select_cases
from kebench.core.errors import KebenchError
from orchestrator.grid import (
    BenchmarkSpec,
    Cell,
    GridSpec,
    MethodSpec,
    Resources,
    code_version,
    expand,
    load_grid,
    parse_grid,
)
from orchestrator.scenarios import Scenario

BASE: dict[str, Any] = {
    "name": "unit",
    "store": "runs/unit",
    "resources": {"num_cpus": 1, "num_gpus": 0},
    "models": ["tiny-random-llama", "smollm2-135m"],
    "benchmarks": [{"name": "zsre", "split": "test", "n": 20}],
    "scenarios": [
        {"kind": "single"},
        {"kind": "continual", "T": [1, 10]},
        {"kind": "batched", "B": 10, "T": [1]},
    ],
    "methods": ["baft", "reft", {"name": "baft", "label": "baft-r8", "hparams": {"rank": 8}}],
    "seeds": [0],
}


def grid_dict(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def write(tmp_path: Path, data: Any, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def cells_of(tmp_path: Path, data: dict[str, Any], name: str = "grid.yaml") -> list[Cell]:
    return expand(load_grid(write(tmp_path, data, name)))


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEBENCH_CODE_VERSION", "test-version")


# --------------------------------------------------------------------------- valid grids

def test_load_grid_parses_fields(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, BASE))
    assert isinstance(grid, GridSpec)
    assert grid.name == "unit" and grid.store == "runs/unit"
    assert grid.resources == Resources(num_cpus=1.0, num_gpus=0.0)
    assert grid.models == ("tiny-random-llama", "smollm2-135m")
    assert grid.benchmarks == (BenchmarkSpec("zsre", "test", 20, 0),)
    assert grid.scenarios == (Scenario("single"), Scenario("continual", T=1), Scenario("continual", T=10),
                              Scenario("batched", T=1, B=10))
    assert [m.label for m in grid.methods] == ["baft", "reft", "baft-r8"]
    assert grid.methods[2] == MethodSpec("baft", "baft-r8", (("rank", 8),))
    assert grid.seeds == (0,) and grid.max_retries == 2 and grid.data_dir is None
    assert grid.source == str(tmp_path / "grid.yaml")
    assert hash(grid)  # frozen all the way down


def test_defaults(tmp_path: Path) -> None:
    data = grid_dict()
    for key in ("store", "resources", "seeds"):
        del data[key]
    data["benchmarks"] = [{"name": "zsre", "n": 10}]
    grid = load_grid(write(tmp_path, data))
    assert grid.store == "runs/unit"
    assert grid.resources == Resources(1.0, 0.0)
    assert grid.seeds == (0,)
    assert grid.benchmarks[0] == BenchmarkSpec("zsre", "test", 10, 0)


def test_expand_count_and_order(tmp_path: Path) -> None:
    data = grid_dict(seeds=[0, 1])
    cells = cells_of(tmp_path, data)
    # 2 models × 1 benchmark × 4 scenarios × 3 methods × 2 seeds
    assert len(cells) == 2 * 1 * 4 * 3 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    first = cells[0]
    assert (first.model, first.scenario, first.label, first.seed) == ("tiny-random-llama", Scenario("single"), "baft", 0)
    assert [c.seed for c in cells[:2]] == [0, 1]  # seeds vary fastest
    assert [c.label for c in cells[:6:2]] == ["baft", "reft", "baft-r8"]  # then methods
    assert cells[6].scenario == Scenario("continual", T=1)  # then scenarios
    assert cells[24].model == "smollm2-135m"  # models outermost
    again = cells_of(tmp_path, data, "again.yaml")
    assert [c.cell_id for c in again] == [c.cell_id for c in cells]


def test_cell_contents(tmp_path: Path) -> None:
    cells = cells_of(tmp_path, BASE)
    cell = next(c for c in cells if c.label == "baft-r8" and c.scenario.kind == "batched" and c.model == "tiny-random-llama")
    assert cell.hparams_dict["rank"] == 8
    assert cell.hparams_dict["max_steps"] == 70  # the YAML's batched block is resolved in
    assert cell.hparams_dict["layers"] == [0, 1]
    assert cell.hparams_object().layers == (0, 1)
    assert cell.n == 20 and cell.offset == 0 and cell.split == "test"
    assert cell.data_sha256 == select_cases("zsre", "test", 20).data_sha256
    assert cell.code_version == "test-version"
    assert len(cell.cell_id) == 16 and int(cell.cell_id, 16) >= 0
    assert cell.key_dict() == {
        "model": "tiny-random-llama", "benchmark": "zsre", "split": "test", "n": 20, "offset": 0,
        "scenario": "batched", "T": 1, "B": 10, "method": "baft", "label": "baft-r8", "seed": 0,
    }
    assert hash(cell)


def test_whole_split_resolves_n(tmp_path: Path) -> None:
    data = grid_dict(benchmarks=[{"name": "zsre", "split": "dev"}], scenarios=[{"kind": "single"}],
                     models=["tiny-random-llama"], methods=["reft"])
    cells = cells_of(tmp_path, data)
    assert len(cells) == 1
    assert cells[0].n == select_cases("zsre", "dev").n


def _id(tmp_path: Path, data: dict[str, Any], label: str = "baft-x") -> str:
    cells = cells_of(tmp_path, data)
    return next(c.cell_id for c in cells if c.label == label)


def _one_cell_grid(**method: Any) -> dict[str, Any]:
    entry = {"name": "baft", "label": "baft-x", **method}
    return grid_dict(models=["tiny-random-llama"], scenarios=[{"kind": "continual", "T": 2}], methods=[entry])


def test_cell_id_stability_and_sensitivity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _one_cell_grid(hparams={"rank": 4})
    reference = _id(tmp_path, base)
    assert _id(tmp_path, base) == reference  # stable across loads

    relabelled = copy.deepcopy(base)
    relabelled["methods"][0]["label"] = "other-name"
    assert _id(tmp_path, relabelled, "other-name") == reference  # label is display only

    assert _id(tmp_path, grid_dict(**{**base, "seeds": [1]})) != reference
    assert _id(tmp_path, _one_cell_grid(hparams={"rank": 6})) != reference
    assert _id(tmp_path, grid_dict(**{**base, "benchmarks": [{"name": "zsre", "n": 10}]})) != reference
    assert _id(tmp_path, grid_dict(**{**base, "scenarios": [{"kind": "continual", "T": 4}]})) != reference
    assert _id(tmp_path, grid_dict(**{**base, "benchmarks": [{"name": "zsre", "n": 20, "offset": 2}]})) != reference
    # An override equal to the YAML default is the same computation as no override.
    assert _id(tmp_path, _one_cell_grid()) == reference
    monkeypatch.setenv("KEBENCH_CODE_VERSION", "other-version")
    assert _id(tmp_path, base) != reference


def test_downstream_scenario_is_its_own_cell(tmp_path: Path) -> None:
    plain = _one_cell_grid(hparams={"rank": 4})
    checked = copy.deepcopy(plain)
    checked["scenarios"] = [{"kind": "continual", "T": 2, "downstream": "piqa", "downstream_n": 50}]
    (cell,) = cells_of(tmp_path, checked)
    assert cell.scenario == Scenario("continual", T=2, downstream="piqa", downstream_n=50)
    assert cell.scenario.label == "continual(T=2)+piqa(n=50)"
    assert _id(tmp_path, checked) != _id(tmp_path, plain)
    # Scenarios without a downstream check hash exactly as before the option existed: stored ids stay valid.
    assert Scenario("continual", T=2).identity() == {"kind": "continual", "T": 2, "B": 1}


def test_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    assert code_version() == "test-version"
    monkeypatch.delenv("KEBENCH_CODE_VERSION")
    assert code_version().startswith("kebench-")


def test_parse_grid_names_source() -> None:
    grid = parse_grid(grid_dict(), "inline")
    assert grid.source == "inline"
    with pytest.raises(KebenchError, match=r"^inline: methods must be a non-empty list"):
        parse_grid(grid_dict(methods=[]), "inline")


def test_to_dict_round_trips(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, BASE))
    again = parse_grid({k: v for k, v in grid.to_dict().items() if k != "source"}, grid.source)
    assert again == grid


# --------------------------------------------------------------------------- errors

def _error(tmp_path: Path, data: Any, *fragments: str) -> str:
    path = write(tmp_path, data, "bad.yaml")
    with pytest.raises(KebenchError) as info:
        expand(load_grid(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(KebenchError, match="nope.yaml: grid file not found"):
        load_grid(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    _error(tmp_path, "name: [unclosed\nmodels: x\n", "invalid YAML", "line")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False) + "seeds: [1]\n"
    _error(tmp_path, text, "invalid YAML", "duplicate key 'seeds'")


def test_not_a_mapping(tmp_path: Path) -> None:
    _error(tmp_path, "- a\n- b\n", "must be a mapping")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"modles": ["x"]}, ("unknown key 'modles' at top level", "did you mean 'models'", "known: name")),
        ({"resources": {"num_gpu": 1}}, ("unknown key 'num_gpu' in resources",)),
        ({"benchmarks": [{"name": "zsre", "nn": 20}]}, ("unknown key 'nn' in benchmarks[0]",)),
        ({"scenarios": [{"kind": "single", "t": 2}]}, ("unknown key 't' in scenarios[0]",)),
        ({"methods": [{"name": "baft", "hparam": {}}]}, ("unknown key 'hparam' in methods[0]",)),
    ],
)
def test_unknown_keys(tmp_path: Path, change: dict[str, Any], fragments: tuple[str, ...]) -> None:
    _error(tmp_path, grid_dict(**change), *fragments)


def test_missing_required_key(tmp_path: Path) -> None:
    data = grid_dict()
    del data["models"]
    _error(tmp_path, data, "missing required key 'models'")
    _error(tmp_path, grid_dict(benchmarks=[{"split": "dev"}]), "benchmarks[0]: missing required key 'name'")
    _error(tmp_path, grid_dict(scenarios=[{"T": 2}]), "scenarios[0]: missing required key 'kind'")


@pytest.mark.parametrize("key", ["models", "benchmarks", "scenarios", "methods", "seeds"])
def test_empty_lists(tmp_path: Path, key: str) -> None:
    _error(tmp_path, grid_dict(**{key: []}), f"{key} must be a non-empty list")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"name": 3}, ("name must be a non-empty string, got 3",)),
        ({"name": "a/b"}, ("name must be letters",)),
        ({"models": "smollm2-135m"}, ("models must be a non-empty list",)),
        ({"models": [7]}, ("models[0] must be a non-empty string",)),
        ({"benchmarks": ["zsre"]}, ("benchmarks[0] must be a mapping",)),
        ({"benchmarks": [{"name": "zsre", "n": "20"}]}, ("benchmarks[0].n must be an integer",)),
        ({"benchmarks": [{"name": "zsre", "n": 20, "offset": -1}]}, ("benchmarks[0].offset must be an integer >= 0",)),
        ({"scenarios": ["single"]}, ("scenarios[0] must be a mapping",)),
        ({"scenarios": [{"kind": "continual", "T": 2.5}]}, ("scenarios[0].T must be a positive integer, got 2.5",)),
        ({"scenarios": [{"kind": "continual", "T": []}]}, ("scenarios[0].T must be a positive integer or a non-empty list",)),
        ({"methods": [3]}, ("methods[0] must be a method name or a mapping",)),
        ({"methods": [{"name": "baft", "hparams": [1]}]}, ("methods[0].hparams must be a mapping",)),
        ({"methods": [{"name": "baft", "hparams": {"layers": {"a": 1}}}]}, ("methods[0].hparams.layers must be a scalar or a list",)),
        ({"resources": {"num_gpus": "one"}}, ("resources.num_gpus must be a number >= 0",)),
        ({"resources": {"num_cpus": -1}}, ("resources.num_cpus must be a number >= 0, got -1",)),
        ({"resources": [1]}, ("resources must be a mapping",)),
        ({"seeds": 0}, ("seeds must be a non-empty list",)),
        ({"seeds": [-1]}, ("seeds[0] must be an integer >= 0, got -1",)),
        ({"max_retries": -1}, ("max_retries must be an integer >= 0",)),
        ({"data_dir": 5}, ("data_dir must be a non-empty string",)),
        ({"store": ""}, ("store must be a non-empty string",)),
    ],
)
def test_wrong_types(tmp_path: Path, change: dict[str, Any], fragments: tuple[str, ...]) -> None:
    _error(tmp_path, grid_dict(**change), *fragments)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"seeds": [True]}, "seeds[0] must be an integer >= 0, got true (a boolean)"),
        ({"max_retries": False}, "max_retries must be an integer >= 0, got false (a boolean)"),
        ({"benchmarks": [{"name": "zsre", "n": True}]}, "benchmarks[0].n must be an integer >= 1, got true (a boolean)"),
        ({"benchmarks": [{"name": "zsre", "n": 20, "offset": False}]}, "benchmarks[0].offset must be an integer >= 0, got false"),
        ({"scenarios": [{"kind": "continual", "T": True}]}, "scenarios[0].T must be a positive integer, got true (a boolean)"),
        ({"scenarios": [{"kind": "batched", "B": [2, True], "T": 1}]}, "scenarios[0].B[1] must be a positive integer, got true"),
        ({"resources": {"num_gpus": True}}, "resources.num_gpus must be a number >= 0, got true (a boolean)"),
    ],
)
def test_bool_is_not_an_int(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    _error(tmp_path, grid_dict(**change), fragment)


@pytest.mark.parametrize(
    ("scenario", "fragment"),
    [
        ({"kind": "continual", "T": 0}, "scenarios[0].T must be a positive integer, got 0"),
        ({"kind": "continual", "T": [1, -2]}, "scenarios[0].T[1] must be a positive integer, got -2"),
        ({"kind": "batched", "B": 0, "T": 1}, "scenarios[0].B must be a positive integer, got 0"),
        ({"kind": "sequential"}, "scenarios[0].kind: unknown scenario 'sequential'"),
        ({"kind": "single", "T": 2}, "scenarios[0]: scenario single edits one case at a time"),
        ({"kind": "continual", "T": 2, "B": 2}, "scenarios[0]: scenario continual edits one case per call"),
        ({"kind": "continual", "T": [2, 2]}, "scenarios[0].T[1]: duplicate value 2"),
        ({"kind": "continual", "T": 2, "downstream": "hellaswag"}, "scenarios[0]: unknown downstream check 'hellaswag'"),
        ({"kind": "single", "downstream": "piqa"}, "scenarios[0]: downstream 'piqa' is scored after a stream"),
        ({"kind": "continual", "T": 2, "downstream": "piqa", "downstream_n": 0},
         "scenarios[0].downstream_n must be a positive integer, got 0"),
        ({"kind": "continual", "T": 2, "downstream_n": 5}, "scenarios[0]: downstream_n must be a positive integer and needs"),
    ],
)
def test_bad_scenarios(tmp_path: Path, scenario: dict[str, Any], fragment: str) -> None:
    _error(tmp_path, grid_dict(scenarios=[scenario]), fragment)


def test_duplicate_scenario_across_entries(tmp_path: Path) -> None:
    scenarios = [{"kind": "continual", "T": [1, 2]}, {"kind": "continual", "T": 2}]
    _error(tmp_path, grid_dict(scenarios=scenarios), "scenarios[1]: duplicate scenario continual(T=2)")


def test_unknown_names(tmp_path: Path) -> None:
    _error(tmp_path, grid_dict(models=["smollm2-135m", "gpt5"]), "models[1]: unknown model 'gpt5'; known:")
    _error(tmp_path, grid_dict(methods=["baft", "rome2"]), "methods[1]: unknown method 'rome2'; known:")
    _error(tmp_path, grid_dict(benchmarks=[{"name": "zsre2"}]), "benchmarks[0].name: unknown benchmark 'zsre2'")
    _error(tmp_path, grid_dict(benchmarks=[{"name": "zsre", "split": "train"}]),
           "benchmarks[0].split: unknown split 'train'; known: dev, test, all")


def test_duplicates(tmp_path: Path) -> None:
    _error(tmp_path, grid_dict(methods=["baft", {"name": "reft", "label": "baft"}]),
           "methods[1].label: duplicate method label 'baft'")
    _error(tmp_path, grid_dict(methods=["baft", "baft"]), "methods[1].label: duplicate method label 'baft'")
    _error(tmp_path, grid_dict(models=["smollm2-135m", "smollm2-135m"]), "models[1]: duplicate model")
    _error(tmp_path, grid_dict(seeds=[0, 0]), "seeds[1]: duplicate seed 0")
    _error(tmp_path, grid_dict(benchmarks=[{"name": "zsre", "n": 20}, {"name": "zsre", "split": "test", "n": 20}]),
           "benchmarks[1]: duplicate benchmark zsre/test")


def test_same_computation_under_two_labels(tmp_path: Path) -> None:
    methods = [{"name": "baft", "label": "a", "hparams": {"rank": 4}}, {"name": "baft", "label": "b"}]
    _error(tmp_path, grid_dict(models=["tiny-random-llama"], methods=methods),
           "methods[1] ('b') resolves to the same hyperparameters as methods[0] ('a')")


def test_bad_hparams_overrides(tmp_path: Path) -> None:
    _error(tmp_path, grid_dict(methods=[{"name": "baft", "hparams": {"rnak": 4}}]),
           "methods[0].hparams: unknown hyperparameter 'rnak' for method 'baft'", "did you mean 'rank'")
    _error(tmp_path, grid_dict(methods=[{"name": "baft", "hparams": {"rank": 1}}]),
           "methods[0] ('baft', model 'tiny-random-llama', scenario single):", "rank must be >= 2")
    _error(tmp_path, grid_dict(methods=[{"name": "reft", "label": "r", "hparams": {"lr": "fast"}}]),
           "methods[0] ('r', model 'tiny-random-llama', scenario single):", "lr should be a number")
    _error(tmp_path, grid_dict(methods=[{"name": "reft", "hparams": {"max_steps": True}}]),
           "methods[0]", "max_steps should be an integer")


def test_missing_hparams_yaml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("methods.hparams.HPARAMS_DIR", tmp_path / "none")
    _error(tmp_path, grid_dict(models=["llama2-7b"]),
           "methods[0] ('baft', model 'llama2-7b', scenario single):", "no hyperparameters for method 'baft'")


def test_n_not_a_multiple_of_stream(tmp_path: Path) -> None:
    scenarios = [{"kind": "continual", "T": 3}]
    _error(tmp_path, grid_dict(scenarios=scenarios), "benchmarks[0] (zsre/test, n=20)",
           "streams of 3 for scenario continual(T=3)")
    scenarios = [{"kind": "batched", "B": 4, "T": 2}]
    _error(tmp_path, grid_dict(scenarios=scenarios, benchmarks=[{"name": "zsre", "n": 20}]),
           "streams of 8 for scenario batched(B=4,T=2)")


def test_whole_split_not_a_multiple_of_stream(tmp_path: Path) -> None:
    size = select_cases("zsre", "dev").n + 1  # never divides the split
    data = grid_dict(benchmarks=[{"name": "zsre", "split": "dev"}], scenarios=[{"kind": "continual", "T": size}])
    _error(tmp_path, data, f"benchmarks[0] (zsre/dev, n={size - 1})", f"streams of {size}")


def test_n_exceeds_split(tmp_path: Path) -> None:
    data = grid_dict(benchmarks=[{"name": "zsre", "split": "dev", "n": 100000}], scenarios=[{"kind": "single"}])
    _error(tmp_path, data, "benchmarks[0]:", "exceeds the")


def test_bad_data_dir(tmp_path: Path) -> None:
    _error(tmp_path, grid_dict(data_dir=str(tmp_path / "nowhere")), "benchmarks[0]:", "is not a directory")


def test_hyperparameters_are_resolved_and_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse resolves each (method entry, model, scenario kind) once and reads each YAML's hash once per
    (entry, model); expansion resolves nothing again."""
    import orchestrator.grid as grid_module

    resolved: list[tuple] = []
    described: list[tuple] = []
    load = grid_module.load_hparams
    describe = MethodSpec.hparams_source
    monkeypatch.setattr(grid_module, "load_hparams", lambda *a, **k: resolved.append((a, str(k))) or load(*a, **k))
    monkeypatch.setattr(MethodSpec, "hparams_source", lambda self, model: described.append((self.label, model))
                        or describe(self, model))
    cells = cells_of(tmp_path, BASE)
    assert len(cells) == 2 * 4 * 3  # models x scenarios x methods
    assert len(resolved) == len({repr(call) for call in resolved}) == 3 * 2 * 3  # entries x models x kinds
    assert len(described) == len(set(described)) == 3 * 2  # entries x models
