"""Run a kebench grid on a Ray cluster: ``ray submit cluster.yaml run_grid.py -- --grid grids/paper.yaml``.

``ray submit`` copies only this file to the head node; the ``kebench`` package itself is installed on
every node by ``cluster.yaml``'s setup commands.  On a node that runs Ray (a cluster head, or under
``ray job submit``) the script joins that cluster; elsewhere it starts a local Ray instance, exactly
like ``kebench grid``.
"""

from __future__ import annotations

import os
import sys


def _running_cluster_address() -> str | None:
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` for the entrypoint
        return os.environ["RAY_ADDRESS"]
    if os.path.exists("/tmp/ray/ray_current_cluster"):  # written by `ray start` on this node
        return "auto"
    return None


def main(argv: list[str]) -> int:
    from orchestrator.cli import main as kebench

    if "--ray-address" not in argv:
        address = _running_cluster_address()
        if address:
            argv = [*argv, "--ray-address", address]
    return kebench(["grid", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
