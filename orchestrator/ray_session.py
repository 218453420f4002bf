"""One way to get a Ray session, for the grid and the sweep alike: join a cluster or start a local instance.

A local instance is bound to the loopback interface: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray
use 127.0.0.1 as the node address, which is what its GCS, raylet, workers and agents listen on
(``_node_ip_address`` alone is rewritten to the routable address).  ``ray_constants`` reads that
variable when ``ray`` is imported, so ``local_ray_loopback`` sets both the variable (for the processes
Ray starts) and the already-imported constant (for this driver).

Everything here that can fail does so before Ray starts, in one line: a ``--ray-address`` that accepts no
connection (``check_ray_address``), a cell or trial that asks for more CPUs than a local instance will
have (``check_local_resources``), and, once Ray is up, more than the cluster has (``pool_size``).

``ray`` and ``torch`` are imported inside the functions that need them: the command line imports this
module for its checks, and its start-up must not pay for either.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys

from kebench.core.errors import KebenchError

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: a task that Ray's memory monitor kills is retried without end by default ("infinite oom retries"): the
#: statistics tasks get one more try, then their cells compute (or fail) on their own.  Cell workers are actors
#: that Ray never restarts (``orchestrator.supervisor``); a cluster is configured where it starts
#: (``RAY_task_oom_retries=1`` in its environment, see docs/cluster.md).
LOCAL_SYSTEM_CONFIG = {"task_oom_retries": 1}


def local_ray_loopback() -> None:
    """Make a local Ray instance started from this process listen on 127.0.0.1 only.

    With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes the loopback address as the node address (its
    GCS, raylet, workers, dashboard agent and metrics exporters bind to it); the variable is read at
    ``import ray``, so the constant is set too when Ray is already imported.  A user who set the variable
    explicitly (to join or form a real cluster) is left alone.
    """
    if os.environ.get(LOOPBACK_ENV, "0") != "0":
        return
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that accepts no TCP connection is a one-line error within
    seconds, instead of ``ray.init`` waiting for a GCS that is not there."""
    if address in ("auto", "local"):
        return
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KebenchError(f"--ray-address {address!r}: expected host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise KebenchError(f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with "
                           "'ray start --head' or leave --ray-address out for a local instance") from None


def check_local_resources(source: str, wanted_cpus: float, num_cpus: int | None, num_gpus: float | None) -> None:
    """What one cell (or trial) asks for must fit a local instance, or none would ever be scheduled (Ray
    waits forever); ``source`` is the grid or sweep file the request comes from."""
    cpus = num_cpus or os.cpu_count() or 1
    if wanted_cpus > cpus:
        raise KebenchError(f"{source}: resources.num_cpus={wanted_cpus:g} but the local Ray instance has {cpus} CPUs; "
                           "lower it, or pass --num-cpus to give the instance more (logical) CPUs")
    if num_gpus is not None and (not math.isfinite(num_gpus) or num_gpus < 0):
        raise KebenchError(f"--num-gpus must be a number >= 0, got {num_gpus}")


def ray_initialized() -> bool:
    """Whether this process already holds a Ray session (without importing Ray when it is not loaded)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def start_ray(ray_address: str | None, num_cpus: int | None, num_gpus: float | None,
              env_vars: dict[str, str] | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local instance (and so must shut it down).

    ``env_vars``: the job's environment in every worker (the numerics of ``kebench.core.numerics``, which must be
    there before a worker imports torch).  Nothing happens when this process already holds a session (a test, or
    a caller that set one up)."""
    import ray  # seconds to import: off the command line's start-up path (see the module docstring)

    if ray.is_initialized():
        return False
    if ray_address:
        check_ray_address(ray_address)
        try:
            ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": dict(env_vars)} if env_vars else None)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise KebenchError(f"--ray-address {ray_address}: {' '.join(str(exc).split())[:300]}") from None
        return False
    if num_gpus is None:
        import torch  # off the command line's start-up path

        num_gpus = torch.cuda.device_count()
    local_ray_loopback()  # 127.0.0.1 only: the variable alone is read too late, at `import ray`
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus,
             include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1", _system_config=LOCAL_SYSTEM_CONFIG,
             runtime_env={"env_vars": dict(env_vars)} if env_vars else None)
    return True


def pool_size(source: str, num_cpus: float, num_gpus: float, tasks: int, workers: int | None) -> int:
    """How many workers of ``num_cpus``/``num_gpus`` each the connected cluster runs at once (at most ``tasks``
    and ``workers``); a cluster that cannot run even one is a one-line error naming ``source``."""
    import ray  # off the command line's start-up path

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    if cpus < num_cpus:
        raise KebenchError(f"{source}: resources.num_cpus={num_cpus:g} but the Ray cluster has "
                           f"{cpus:g} CPUs: no cell could ever be scheduled; lower it or add nodes")
    limits = [tasks, int(cpus // max(num_cpus, 1e-9))]
    if num_gpus > 0:
        gpus = resources.get("GPU", 0)
        if gpus < num_gpus:
            raise KebenchError(
                f"{source}: resources.num_gpus={num_gpus} but the Ray cluster has {gpus:g} GPUs "
                "(on a CPU machine start Ray with --num-gpus to schedule GPU cells as bookkeeping)"
            )
        limits.append(int(gpus // num_gpus))
    if workers:
        limits.append(workers)
    return max(1, min(limits))
