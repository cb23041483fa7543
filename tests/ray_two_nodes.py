"""A real two-node Ray cluster on one machine, on 127.0.0.1 only, for the ``ray_two_nodes`` fixture.

Head: ``ray start --head --node-ip-address=127.0.0.1 --port=<free> --num-cpus=1``; second node:
``ray start --address=127.0.0.1:<port> --num-cpus=1 --resources='{"worker_node": 1}'``, so work can be
forced onto it with ``resources={"worker_node": ...}``. Both get:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it Ray replaces ``--node-ip-address=127.0.0.1``
  by the machine's interface address and binds to 0.0.0.0 (see ENVIRONMENT.md); but with it a
  joining ``ray start`` refuses to run, so the joining node's CLI runs through ``_JOIN`` below.
  :meth:`TwoNodeCluster.listeners` checks with ``ss -ltnp`` that every socket listens on 127.0.0.1;
- ``RAY_AUTH_MODE=disabled``: a ``~/.ray/auth_token`` left by an earlier local ``ray.init`` would
  otherwise switch the cluster to token auth and a driver without the token is refused;
- ``--include-dashboard=false`` and distinct ``--dashboard-agent-listen-port``/``--metrics-export-port``
  (both default to fixed ports, so a second node on the same host would collide);
- ``--temp-dir`` only on the head: a node that joins puts its files in the head's session folder
  under the same root (one ``session_*`` folder for both nodes, measured), so both share it;
- extra environment (e.g. S3 credentials) on both nodes, as a cluster's nodes would have it.

Drivers run in a subprocess (``run_driver``): the session-wide ``ray_cluster`` fixture's in-process
``ray.init`` cannot be attached to another cluster at the same time. Stopped at the end by pid, not
with ``ray stop``: ``ray stop`` kills every Ray process of this user on the machine, including other
clusters (another test session's, a user's); the fixture finds its own processes by the GCS address
and temp dir in their command lines and terminates those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TwoNodeCluster:
    address: str
    temp_dir: str
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)

    def run_driver(self, code: str, timeout: float = 240) -> dict:
        """Run ``code`` as a driver in a fresh Python attached to the cluster; returns the JSON it prints last."""
        env = {
            **os.environ,
            **self.env,
            "RAY_ADDRESS": self.address,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def processes(self) -> list[psutil.Process]:
        """The Ray processes of this cluster: every process whose command line names its temp dir or GCS port."""
        port = self.address.rsplit(":", 1)[1]
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.temp_dir in cmd or f"--gcs-address=127.0.0.1:{port}" in cmd or f"127.0.0.1:{port}" in cmd:
                out.append(p)
        return out

    def listeners(self) -> list[str]:
        """``local address:port`` of every TCP socket the cluster's processes listen on (``ss -ltnp``)."""
        pids = {p.pid for p in self.processes()}
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in ss.splitlines():
            users = {int(m) for m in re.findall(r"pid=(\d+)", line)}
            if users & pids:
                found.append(line.split()[3])
        return found


# `ray start --address=...` (a node joining a cluster) with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 aborts
# ("Multi-node Ray clusters are not supported on Windows and OSX"); with =1 it replaces
# --node-ip-address=127.0.0.1 by the machine's interface address (services.resolve_ip_for_localhost)
# (also the GCS address it joins) and every listener binds to 0.0.0.0 - both measured with Ray 2.60.
# So the joining node's `ray start` runs with the variable at 0 (its raylet and workers resolve to
# loopback); in that one CLI process the multi-node check is switched off and loopback is kept.
_JOIN = """
import sys
from ray._private import ray_constants, services
from ray.scripts.scripts import main
ray_constants.ENABLE_RAY_CLUSTER = True  # passes the multi-node check; the env stays 0 for the node's processes
services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 for the node and the GCS address
sys.argv = ["ray", "start", *sys.argv[1:]]
sys.exit(main())
"""


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    head = "--head" in args
    cmd = [RAY, "start", *args] if head else [sys.executable, "-c", _JOIN, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def start_two_nodes(extra_env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Start head + one worker node on 127.0.0.1; yield a :class:`TwoNodeCluster`; stop both."""
    temp_dir = tempfile.mkdtemp(prefix="r2n_", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),  # workers import this checkout's msnoop
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    cluster = TwoNodeCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=dict(extra_env or {}))
    cluster.env.update({k: env[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")})
    try:
        _ray_start(
            [
                "--head",
                f"--port={port}",
                f"--temp-dir={temp_dir}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--object-store-memory=300000000",
                "--include-dashboard=false",
                *common,
            ],
            env,
        )
        _ray_start(
            [
                f"--address=127.0.0.1:{port}",
                '--resources={"worker_node": 1}',
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                "--object-store-memory=300000000",
                *common,
            ],
            env,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            alive = cluster.run_driver(
                "import ray, json; ray.init(log_to_driver=False); "
                "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
            )
            if len(alive) == 2:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"second Ray node did not join {cluster.address}")
        cluster.pids = [p.pid for p in cluster.processes()]
        yield cluster
    finally:
        stop(cluster, env)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(cluster: TwoNodeCluster, env: dict[str, str]) -> None:
    """Stop this cluster's processes: SIGTERM by pid (raylets, GCS, workers), then SIGKILL what is left."""
    procs = cluster.processes()
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
