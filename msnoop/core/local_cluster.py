"""A Ray cluster on this machine that listens on 127.0.0.1 only (``msnoop cluster start | status | stop``).

``ray start --head --node-ip-address=127.0.0.1`` alone is not enough: Ray rewrites the node address to the
machine's network interface and several of its processes (GCS, raylet, dashboard agent, metrics) listen on all
interfaces. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment of ``ray start`` every listener binds
to loopback (checked by :func:`start_local_cluster` after the start, with the sockets of the cluster's own
processes). Token authentication stays as Ray 2.60 sets it for a new cluster (on, with the token in
``~/.ray/auth_token``); msnoop's clients send the token.

The running cluster is recorded in ``$MSNOOP_HOME/cluster.json`` (default ``~/.msnoop``): ``msnoop submit``
sends jobs to its Jobs API, and every msnoop command that would start a Ray cluster of its own joins it instead
(:func:`msnoop.core.runtime.cluster_to_join`). :func:`stop_local_cluster` ends that cluster's processes only
(found by its own temporary folder), never another Ray cluster on the machine as ``ray stop`` would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ClusterError",
    "LocalCluster",
    "cluster_listeners",
    "recorded_cluster",
    "start_local_cluster",
    "state_file",
    "stop_local_cluster",
]

LOOPBACK = "127.0.0.1"
#: Environment variable naming msnoop's state folder (the running local cluster's record); default ``~/.msnoop``.
HOME_ENV = "MSNOOP_HOME"
#: The Jobs API port msnoop asks for first (Ray's default); a free port is taken when it is in use.
DASHBOARD_PORT = 8265
#: Environment under which ``ray start`` binds every listener to loopback (Ray reads it at import).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class ClusterError(RuntimeError):
    """The local cluster could not be started (``ray start`` failed, or a process listens beyond loopback)."""


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster, as recorded in :func:`state_file`.

    Attributes:
        address: The GCS address drivers join, ``127.0.0.1:<port>``.
        dashboard: The dashboard and Jobs API, ``http://127.0.0.1:<port>``.
        temp_dir: Ray's temporary folder for this cluster (its sessions and logs; names its processes).
        num_cpus: CPUs the cluster offers (None: all of the machine's).
        command: The ``ray start`` command that started it (environment included).
    """

    address: str
    dashboard: str
    temp_dir: str
    num_cpus: int | None
    command: str

    @property
    def gcs_port(self) -> int:
        """The GCS port of :attr:`address`."""
        return int(self.address.rsplit(":", 1)[1])


def state_dir() -> Path:
    """msnoop's state folder: ``$MSNOOP_HOME``, else ``~/.msnoop``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".msnoop").expanduser()


def state_file() -> Path:
    """The record of the running local cluster (``cluster.json`` in :func:`state_dir`)."""
    return state_dir() / "cluster.json"


def _temp_dir() -> str:
    # short (Ray's Unix sockets live under it) and one per state folder, so that the cluster's processes are ours
    tag = hashlib.sha256(str(state_dir().resolve()).encode()).hexdigest()[:8]
    return str(Path(tempfile.gettempdir()) / f"msnoop-ray-{tag}")


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _free_port(preferred: int | None = None) -> int:
    if preferred and not _port_open(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def recorded_cluster() -> LocalCluster | None:
    """The local cluster recorded by ``msnoop cluster start`` if it is running (its GCS port answers), else None.

    A record whose cluster is gone is removed.
    """
    path = state_file()
    if not path.is_file():
        return None
    try:
        cluster = LocalCluster(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        logger.debug("ignoring an unreadable cluster record %s", path)
        return None
    if _port_open(cluster.gcs_port):
        return cluster
    logger.debug("the cluster recorded in %s is gone; removing the record", path)
    path.unlink(missing_ok=True)
    return None


def _cluster_processes(temp_dir: str) -> list[Any]:
    """The processes of the cluster whose Ray temporary folder is ``temp_dir``, with all their descendants."""
    import psutil

    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def cluster_listeners(temp_dir: str) -> list[tuple[str, int, str]]:
    """``(address, port, process name)`` of every listening TCP socket of the cluster's processes.

    Raises:
        psutil.AccessDenied: The system does not let this user list sockets (macOS without root).
    """
    import psutil

    pids = {p.pid: p for p in _cluster_processes(temp_dir)}
    out = []
    for conn in psutil.net_connections("tcp"):
        if conn.pid in pids and conn.status == psutil.CONN_LISTEN:
            try:
                name = pids[conn.pid].name()
            except psutil.Error:
                name = "?"
            out.append((str(conn.laddr.ip), int(conn.laddr.port), name))
    return sorted(out)


def is_loopback(ip: str) -> bool:
    """Whether a listening address is loopback only (``127.x``, ``::1``, or IPv4-mapped ``::ffff:127.x``)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed beside this Python; reinstall msnoop")
    return found


def start_local_cluster(
    *, num_cpus: int | None = None, port: int | None = None, dashboard_port: int | None = None
) -> tuple[LocalCluster, bool]:
    """Start a head node on 127.0.0.1 (or return the running one) and record it in :func:`state_file`.

    Args:
        num_cpus: CPUs the cluster offers (default: all).
        port: GCS port (default: a free one).
        dashboard_port: Dashboard and Jobs API port (default: 8265, or a free one when 8265 is taken).

    Returns:
        ``(cluster, started)``: ``started`` is False when a recorded cluster was already running.

    Raises:
        ClusterError: ``ray start`` failed (its last lines are in the message), or a process of the new cluster
            listens on a non-loopback address (the cluster is stopped again).
    """
    running = recorded_cluster()
    if running is not None:
        return running, False
    temp_dir = _temp_dir()
    gcs, dash = port or _free_port(), _free_port(dashboard_port or DASHBOARD_PORT)
    # Ray's other listeners have fixed default ports (10001, 52365, ...): free ones instead, so that this cluster
    # starts beside another Ray cluster on the machine (a job's own, a colleague's)
    others = {
        name: _free_port()
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    }
    args = [
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dash}",
        *(f"--{name}={p}" for name, p in others.items()),
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *([f"--num-cpus={num_cpus}"] if num_cpus else []),
    ]
    env_text = " ".join(f"{k}={v}" for k, v in LOOPBACK_ENV.items())
    cluster = LocalCluster(
        address=f"{LOOPBACK}:{gcs}",
        dashboard=f"http://{LOOPBACK}:{dash}",
        temp_dir=temp_dir,
        num_cpus=num_cpus,
        command=f"{env_text} ray {' '.join(args)}",
    )
    res = subprocess.run(
        [_ray_executable(), *args],
        env={**os.environ, **LOOPBACK_ENV},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if res.returncode != 0:
        _terminate(_cluster_processes(temp_dir))
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise ClusterError(f"`{cluster.command}` failed (exit {res.returncode}):\n{tail}")
    exposed = [(ip, p, name) for ip, p, name in cluster_listeners(temp_dir) if not is_loopback(ip)]
    if exposed:
        _terminate(_cluster_processes(temp_dir))
        raise ClusterError(f"the new cluster listened beyond loopback ({exposed}); it was stopped again")
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(asdict(cluster), indent=2) + "\n")
    return cluster, True


def _terminate(procs: list[Any], timeout: float = 5.0) -> int:
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def stop_local_cluster() -> int:
    """Stop the recorded local cluster's processes (none other) and remove its record; returns how many ended.

    A record whose cluster is already gone is removed and 0 is returned.
    """
    path = state_file()
    temp_dir = _temp_dir()
    if path.is_file():
        try:
            temp_dir = json.loads(path.read_text()).get("temp_dir") or temp_dir
        except (OSError, ValueError):
            pass
    n = _terminate(_cluster_processes(temp_dir))
    deadline = time.monotonic() + 5
    while _cluster_processes(temp_dir) and time.monotonic() < deadline:  # workers started while stopping
        n += _terminate(_cluster_processes(temp_dir))
    path.unlink(missing_ok=True)
    return n
