"""The cluster-launcher path, end to end, on this machine: ``ray up`` / ``ray submit`` / ``ray rsync-down`` /
``ray down`` with Ray's ``local`` node provider (``cluster.local.yaml``) over a real SSH server.

What the test sets up, all inside one temp dir, and takes down again by PID:

- ``sshd`` on 127.0.0.1 on a free port, with a host key and an authorized key generated here.  Its
  sessions get ``HOME=<tmp>/home`` (``SetEnv``), so every ``~`` of the launcher (the synced checkout,
  ``~/.bashrc``, ``~/ray_bootstrap_config.yaml``, ``~/run_grid.py``, the store) lands in the temp dir, not
  in the real home.  Ray's launcher always dials port 22, so the rendered config reaches the port through
  ``ssh_proxy_command: nc %h <port>`` -- the on-prem recipe for a non-standard port.
- The head's Python environment: a venv in the temp dir that sees this checkout's ``.venv`` packages
  (through a view without kebench itself), so the setup commands' ``pip install -e ~/kebench`` installs the
  synced checkout into the temp venv, downloads nothing (``PIP_NO_INDEX``) and leaves ``.venv`` alone.
- Ray on the head runs with ``RAY_TMPDIR=<tmp>/r`` and free ports, so it neither meets nor records itself
  as another Ray instance on the machine, and ``run_grid.py --ray-address auto`` finds exactly it.
- ``ray down`` runs ``ray stop`` on the head, which would end every Ray process on this machine; the
  head's ``ray`` is a wrapper whose ``stop`` ends only the processes of this cluster's temp dir, by PID.

Missing ``openssh-server``/``rsync``/``nc`` are installed with apt-get when we are root on Debian and
services cannot start on install; otherwise the test is skipped, saying why.  Deselect it with
``-m "not integration"``; set ``KEBENCH_LAUNCHER_LOGS=<dir>`` to keep every ``ray`` command's output.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from orchestrator.cluster_config import render_local

pytestmark = [pytest.mark.integration, pytest.mark.launcher, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GRID = "grids/launcher-test.yaml"  # 1 cell: tiny-random-llama, 2 ZsRE dev cases, continual T=2, ReFT
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "rsync": "rsync", "nc": "netcat-openbsd"}


def _missing_packages() -> list[str]:
    return [package for tool, package in PACKAGES.items() if shutil.which(tool) is None]


def _ensure_packages() -> None:
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {', '.join(missing)}: not root on an apt-based system, cannot install them")
    policy = Path("/usr/sbin/policy-rc.d")
    if not (policy.exists() and subprocess.run([str(policy), "ssh", "start"], capture_output=True).returncode == 101):
        pytest.skip(f"needs {', '.join(missing)}: installing openssh-server here would start sshd on port 22 "
                    "(no /usr/sbin/policy-rc.d denying service starts); install it yourself")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"needs {', '.join(missing)}: `{' '.join(command)}` timed out")
        if done.returncode != 0:
            pytest.skip(f"needs {', '.join(missing)}: `{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")
    if _missing_packages():
        pytest.skip(f"apt-get installed {', '.join(missing)} but {', '.join(_missing_packages())} is still missing")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_naming(marker: str) -> list[psutil.Process]:
    """Processes whose command line names ``marker`` (our temp dir), with all their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and any(marker in part for part in process.info["cmdline"] or []):
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _stop(processes: list[psutil.Process]) -> None:
    """SIGTERM each, by PID; SIGKILL whatever is left after 15 s."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


# The head's `ray`: Ray's CLI, except that `ray stop` (which `ray down` runs on the head) ends only the
# processes of this cluster's Ray temp dir, by PID, instead of every Ray process on the machine.
RAY_WRAPPER = '''\
#!{python}
import sys
if sys.argv[1:2] == ["stop"]:
    import os, psutil
    marker = os.environ["RAY_TMPDIR"]
    ours = {{}}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in part for part in p.info["cmdline"] or []):
                ours[p.pid] = p
                ours.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = [p for pid, p in ours.items() if pid not in (os.getpid(), os.getppid())]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        p.kill()
    print(f"stopped {{len(procs)}} processes of the Ray instance in {{marker}}; killed after 5 s: "
          f"{{[' '.join(p.cmdline()[:2]) for p in alive if p.is_running()]}} {{[p.pid for p in alive]}}")
    sys.exit(0)
from ray.scripts.scripts import main
sys.exit(main())
'''

PIP_WRAPPER = '''\
#!{python}
import sys
from pip._internal.cli.main import main
sys.exit(main())
'''


def _head_environment(tmp: Path) -> Path:
    """A venv at ``<tmp>/venv`` whose packages are ``.venv``'s minus kebench; returns its bin dir."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    view = tmp / "site-view"
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith("kebench") or "kebench" in name and name.startswith("__editable__") or name.endswith(".pth"):
            continue
        (view / entry.name).symlink_to(entry)
    [venv_site] = venv.glob("lib/python*/site-packages")
    (venv_site / "_kebench_launcher_test.pth").write_text(f"{view}\n")
    python = venv / "bin" / "python"
    for name, text in (("ray", RAY_WRAPPER), ("pip", PIP_WRAPPER)):
        path = venv / "bin" / name
        path.write_text(text.format(python=python))
        path.chmod(0o755)
    return venv / "bin"


def _start_sshd(tmp: Path, port: int) -> tuple[subprocess.Popen, Path]:
    keys = tmp / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kebench-launcher-test", "-f",
                        str(keys / name)], check=True, timeout=60)
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    config = keys / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {keys / 'host_ed25519'}
        PidFile {keys / 'sshd.pid'}
        AuthorizedKeysFile {keys / 'authorized_keys'}
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        UsePAM no
        StrictModes no
        PrintMotd no
        MaxSessions 50
        MaxStartups 50
        SetEnv HOME={tmp / 'home'}
        LogLevel ERROR
        """))
    with (tmp / "sshd.log").open("w") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not _listening(port):
        if sshd.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sshd did not come up: {(tmp / 'sshd.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return sshd, keys / "id_ed25519"


def test_ray_up_submit_rsync_down_down(capsys):
    if os.geteuid() != 0:
        pytest.skip("runs a second sshd (and apt-get when tools are missing): needs root")
    _ensure_packages()
    from benchmarks.data import resolve_data_dir
    from kebench.core.errors import KebenchError

    try:
        data_dir = resolve_data_dir()
    except KebenchError as exc:
        pytest.skip(f"no benchmark data: {exc}")
    if not (data_dir / "zsre").is_dir():  # the fetch cache, empty or without the zsre file (it is embedded)
        pytest.skip(f"no benchmark data directory to mount ({data_dir})")

    clock = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="kbl-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    marker = str(tmp)
    cluster_name = f"kebench_test_{uuid.uuid4().hex[:8]}"
    control_dir = Path("/tmp") / ("ray_ssh_" + hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]) / \
        hashlib.sha256(cluster_name.encode()).hexdigest()[:10]  # Ray's SSH ControlPath for this cluster
    ssh_port, gcs, client_server, agent, metrics = _free_ports(5)
    home = tmp / "home"
    home.mkdir()
    sshd: subprocess.Popen | None = None
    privsep = Path("/run/sshd")  # sshd's privilege-separation directory; the package's service would make it
    made_privsep = not privsep.exists()
    timings: list[tuple[str, float]] = []
    leftovers: list[str] = []
    try:
        privsep.mkdir(mode=0o755, exist_ok=True)
        sshd, key = _start_sshd(tmp, ssh_port)
        bin_dir = _head_environment(tmp)
        (home / ".bashrc").write_text(textwrap.dedent(f"""\
            # the head's login environment (see the module docstring)
            source {bin_dir / 'activate'}
            export RAY_TMPDIR={tmp / 'r'}
            export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
            export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
            """))
        (tmp / "r").mkdir()
        config = tmp / "cluster.local.yaml"
        config.write_text(render_local(
            cluster_name=cluster_name, ssh_user=getpass.getuser(), ssh_private_key=str(key),
            ssh_proxy_command=f"nc %h {ssh_port}", data=str(data_dir), port=gcs,
            ray_start_options=(f"--num-cpus=2 --object-store-memory=200000000 --include-dashboard=false "
                               f"--ray-client-server-port={client_server} --dashboard-agent-listen-port={agent} "
                               f"--metrics-export-port={metrics} --disable-usage-stats"),
        ))
        (tmp / "client").mkdir()
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TMPDIR": str(tmp / "client"),
               "RAY_TMPDIR": str(tmp / "client"), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)

        def ray(*args: str, timeout: int = 600) -> str:
            command = ["ray", *args]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
            shown = shlex.join(command).replace(str(config), "cluster.local.yaml").replace(str(tmp), "<tmp>")
            timings.append((shown, time.perf_counter() - started))
            output = done.stdout + done.stderr
            if os.environ.get("KEBENCH_LAUNCHER_LOGS"):  # keep every command's output for a look afterwards
                logs = Path(os.environ["KEBENCH_LAUNCHER_LOGS"])
                logs.mkdir(parents=True, exist_ok=True)
                (logs / f"{len(timings):02d}-{args[0]}.log").write_text(f"$ {shown}\n{output}")
            assert done.returncode == 0, f"{shown} failed ({done.returncode}):\n{output[-6000:]}"
            return output

        ray("up", "-y", str(config))
        assert (home / "kebench" / "run_grid.py").is_file()  # file_mounts: the checkout ...
        assert (home / "kebench-data" / "zsre").is_dir()  # ... and the data
        assert ".venv" not in os.listdir(home / "kebench") and "runs" not in os.listdir(home / "kebench")
        installed = list((bin_dir.parent).glob("lib/python*/site-packages/__editable__*kebench*"))
        assert installed, "setup_commands did not install kebench into the head's environment"
        assert "KEBENCH_DATA" in (home / ".bashrc").read_text()
        assert _listening(gcs) and (tmp / "r" / "ray" / "ray_current_cluster").is_file()

        store = "~/kebench-runs/launcher-test"
        output = ray("submit", str(config), "run_grid.py", "--", "--grid", f"~/kebench/{GRID}", "--store", store,
                     "--ray-address", "auto", "--quiet", "--tables", "continual")
        assert "T=2 Rel." in output, output[-3000:]

        # The store on the head: one cell, ok; one row per case and metric.
        import pyarrow.dataset as ds

        from results.store import latest_attempts

        head_store = home / "kebench-runs" / "launcher-test"
        attempts = latest_attempts(head_store)
        assert len(attempts) == 1 and [status for _, status in attempts.values()] == ["ok"], attempts
        cases = ds.dataset(head_store / "cases", format="parquet", partitioning="hive").to_table().to_pylist()
        pairs = [(row["case_id"], row["metric"]) for row in cases]
        case_ids, metrics_seen = {c for c, _ in pairs}, {m for _, m in pairs}
        assert len(case_ids) == 2 and {"rel", "gen", "loc", "por"} <= metrics_seen, metrics_seen
        assert sorted(pairs) == sorted((c, m) for c in case_ids for m in metrics_seen)  # each exactly once

        down = tmp / "down"
        ray("rsync-down", str(config), f"{store}/", f"{down}/")
        head_files = sorted(p.relative_to(head_store) for p in head_store.rglob("*.parquet"))
        assert head_files and sorted(p.relative_to(down) for p in down.rglob("*.parquet")) == head_files
        assert latest_attempts(down) == attempts

        ray("down", "-y", str(config))
        assert not _listening(gcs), "ray down left the head's GCS listening"
        ray_left = _processes_naming(str(tmp / "r"))
        assert not ray_left, f"ray down left Ray processes: {[p.pid for p in ray_left]}"
    finally:
        if sshd is not None:
            sshd_tree = [psutil.Process(sshd.pid)] if sshd.poll() is None else []
            try:
                sshd_tree += psutil.Process(sshd.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            _stop(sshd_tree)
            sshd.wait(timeout=10)
        _stop(_processes_naming(marker))  # Ray's daemons, the SSH control masters (their -i names our key)
        leftovers = [f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in _processes_naming(marker)]
        leftovers += [f"port {port} still listening" for port in (ssh_port, gcs, client_server, agent, metrics)
                      if _listening(port)]
        shutil.rmtree(control_dir, ignore_errors=True)
        if made_privsep:
            try:
                privsep.rmdir()
            except OSError:  # not empty, or another sshd created it meanwhile: not ours to remove
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        with capsys.disabled():
            print(f"\ncluster-launcher test ({time.perf_counter() - clock:.0f} s in all):")
            for command, seconds in timings:
                print(f"  {seconds:6.1f} s  {command}")
    assert not leftovers, f"left behind: {leftovers}"
