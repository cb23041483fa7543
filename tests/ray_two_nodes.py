"""A real two-node Ray cluster on one machine, on 127.0.0.1 only, for the ``ray_two_nodes`` fixture.

Head: ``ray start --head --node-ip-address=127.0.0.1 --port=<free> --num-cpus=1``; second node:
``ray start --address=127.0.0.1:<port> --num-cpus=1 --resources='{"worker_node": 1}'``, so work can be
forced onto it with ``resources={"worker_node": ...}``. Both get:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it Ray replaces ``--node-ip-address=127.0.0.1``
  by the machine's interface address and binds to 0.0.0.0; but with it a
  joining ``ray start`` refuses to run, so the joining node's CLI runs through ``_JOIN`` below.
  :meth:`TwoNodeCluster.listeners` checks with ``ss -ltnp`` that every socket listens on 127.0.0.1;
- ``RAY_AUTH_MODE=disabled``: a ``~/.ray/auth_token`` left by an earlier local ``ray.init`` would
  otherwise switch the cluster to token auth and a driver without the token is refused;
- ``--include-dashboard=false`` and distinct ``--dashboard-agent-listen-port``/``--metrics-export-port``
  (both default to fixed ports, so a second node on the same host would collide);
- ``--temp-dir`` only on the head: a node that joins puts its files in the head's session folder
  under the same root (one ``session_*`` folder for both nodes, measured), so both share it;
- extra environment (e.g. S3 credentials) on both nodes, as a cluster's nodes would have it;
- short GCS health checks (``RAY_health_check_*``), so that a killed node is declared dead in ~3 s.

The second node can be lost and brought back (:meth:`TwoNodeCluster.kill_second_node`, ``start_second_node``):
its daemons are the processes that its ``ray start`` added, and its workers run under its raylet.

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
    join_args: list[str] = field(default_factory=list)  # the second node's `ray start` arguments
    start_env: dict[str, str] = field(default_factory=dict)  # the environment both nodes were started with
    second_pids: list[int] = field(default_factory=list)  # the second node's own daemons (raylet, log monitor)

    def driver_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.env,
            "RAY_ADDRESS": self.address,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }

    def start_driver(self, code: str, log: Path) -> subprocess.Popen:
        """Start ``code`` as a driver attached to the cluster in its own process group, output to ``log``.

        The caller stops it (:func:`stop_process`) in a ``finally``.
        """
        with open(log, "w") as out:
            return subprocess.Popen(
                [sys.executable, "-c", code],
                env=self.driver_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def second_node_processes(self) -> list[psutil.Process]:
        """The second node's daemons and every process under them (its workers, agents)."""
        out: list[psutil.Process] = []
        for pid in self.second_pids:
            try:
                root = psutil.Process(pid)
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return out

    def kill_second_node(self) -> int:
        """SIGKILL the second node's raylet, workers and helpers, as if its machine were lost; returns how many."""
        procs = self.second_node_processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def start_second_node(self) -> None:
        """(Re)start the second node (same resources) and wait until the head sees it alive."""
        before = {p.pid for p in self.processes()}
        _ray_start(self.join_args, self.start_env)
        self.second_pids = [p.pid for p in self.processes() if p.pid not in before and _is_daemon(p)]
        self.wait_nodes(2)

    def wait_nodes(self, n: int, timeout: float = 90) -> list[dict]:
        """Wait until exactly ``n`` nodes are alive; returns their ``ray.nodes()`` records."""
        alive = self.run_driver(_WAIT_NODES.format(n=n, timeout=timeout), timeout=timeout + 60)
        if len(alive) != n:
            raise RuntimeError(f"expected {n} alive nodes in {self.address}, found {len(alive)}")
        return alive

    def run_driver(self, code: str, timeout: float = 240) -> dict:
        """Run ``code`` as a driver in a fresh Python attached to the cluster; returns the JSON it prints last."""
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=self.driver_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
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


# A driver that waits (inside one process: a driver takes seconds to start) until n nodes are alive.
_WAIT_NODES = """
import json, time, ray
ray.init(log_to_driver=False)
deadline = time.time() + {timeout}
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == {n} or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{{"NodeID": n["NodeID"], "Resources": n["Resources"]}} for n in alive]))
"""


def _is_daemon(p: psutil.Process) -> bool:
    """A node's own long-lived process (raylet, log monitor), not a `ray start` CLI that is about to exit."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False
    return "raylet" in cmd or "log_monitor" in cmd


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
        # a lost node is declared dead after ~3 s instead of ~15-30 s (defaults: every 3 s, 5 misses)
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
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
        cluster.join_args = [
            f"--address=127.0.0.1:{port}",
            '--resources={"worker_node": 1}',
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=300000000",
            *common,
        ]
        cluster.start_env = env
        cluster.start_second_node()
        cluster.pids = [p.pid for p in cluster.processes()]
        yield cluster
    finally:
        stop(cluster, env)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (the leader may have gone first)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def stop(cluster: TwoNodeCluster, env: dict[str, str]) -> None:
    """Stop this cluster's processes: SIGTERM by pid (raylets, GCS, workers), then SIGKILL what is left."""
    procs = cluster.processes()
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    # the GCS server and the autoscaler monitor were still up 10 s after SIGTERM (measured): don't wait for them
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
