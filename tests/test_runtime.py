"""The local Ray cluster msnoop starts must listen on loopback only."""

from __future__ import annotations

import ipaddress
import time

import psutil
import pytest

pytestmark = pytest.mark.ray


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_local_cluster_listens_on_loopback_only(ray_cluster):
    import ray

    ray.get(ray.remote(lambda: 1).remote())  # make sure workers are up
    time.sleep(1)
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no listening sockets of the local Ray cluster"
    exposed = [
        (c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening if not _is_loopback(c.laddr.ip)
    ]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
