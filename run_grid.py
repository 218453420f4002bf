"""Run a kebench grid on a Ray cluster: ``ray submit cluster.yaml run_grid.py -- --grid grids/paper.yaml``.

``ray submit`` copies only this file to the head node (to ``~/run_grid.py``); the ``kebench`` package
itself is installed on every node by the cluster config's setup commands.  On a node that runs Ray (a
cluster head, or under ``ray job submit``) the script joins that cluster; elsewhere it starts a local Ray
instance, exactly like ``kebench grid``.

"The cluster on this node" is the one ``ray start`` recorded in Ray's temp dir (``$RAY_TMPDIR``, else
``$TMPDIR``, else ``/tmp``, then ``ray/ray_current_cluster``), or ``$RAY_ADDRESS``.  ``--ray-address auto``
is resolved the same way here, so the script never falls back to Ray's own "auto", which joins *any* Ray
instance it finds running on the machine -- on a shared machine, possibly somebody else's.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _drop_own_directory_from_path() -> None:
    """``python ~/run_grid.py`` puts ``~`` first on ``sys.path``, and ``~`` holds the synced checkout in
    ``~/kebench``: without a package of that name there, ``import kebench`` would find the checkout as a
    namespace package instead of the installed one.  Keep the directory only when it *is* the checkout
    (``python run_grid.py`` from the repository root, or a Ray job's uploaded working dir)."""
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
        if not os.path.isfile(os.path.join(_HERE, "kebench", "__init__.py")):
            del sys.path[0]


def _ray_address_file() -> str:
    """Where ``ray start`` on this node records its cluster's address (Ray's own lookup rule)."""
    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    else:
        root = "/tmp"
    return os.path.join(root, "ray", "ray_current_cluster")


def _running_cluster_address() -> str | None:
    """The address of the Ray cluster this node belongs to, or None when it belongs to none."""
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` for the entrypoint
        return os.environ["RAY_ADDRESS"]
    try:
        with open(_ray_address_file(), encoding="utf-8") as handle:  # written by `ray start` on this node
            return handle.read().strip() or None
    except OSError:
        return None


def _resolve_address(argv: list[str]) -> list[str]:
    """Fill in (or resolve ``auto`` in) ``--ray-address``; raise SystemExit when ``auto`` finds nothing."""
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--ray-address" or arg.startswith("--ray-address="):
            value = arg.partition("=")[2] if "=" in arg else (args[index + 1] if index + 1 < len(args) else None)
            if value != "auto":
                return args
            address = _running_cluster_address()
            if address is None:
                raise SystemExit(
                    f"run_grid.py: --ray-address auto: no Ray cluster on this node ({_ray_address_file()} does not "
                    "exist and RAY_ADDRESS is unset); start one with `ray start --head`, pass its address, or "
                    "drop --ray-address to run on a local Ray instance"
                )
            if "=" in arg:
                args[index] = f"--ray-address={address}"
            else:
                args[index + 1] = address
            return args
    address = _running_cluster_address()
    return [*args, "--ray-address", address] if address else args


def main(argv: list[str]) -> int:
    _drop_own_directory_from_path()
    argv = _resolve_address(argv)
    from orchestrator.cli import main as kebench  # only once this script's own folder is off sys.path

    return kebench(["grid", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
