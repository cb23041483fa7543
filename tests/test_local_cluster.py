"""`msnoop cluster`: a local Ray cluster on 127.0.0.1 only, found by msnoop's commands, stopped without touching
any other Ray cluster on the machine (the README's recipe runs it end to end with a submitted job)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core import local_cluster as lc

runner = CliRunner()


def test_loopback_addresses():
    assert lc.is_loopback("127.0.0.1") and lc.is_loopback("::1") and lc.is_loopback("::ffff:127.0.0.1")
    assert not lc.is_loopback("0.0.0.0") and not lc.is_loopback("::") and not lc.is_loopback("192.0.2.2")


def test_status_and_stop_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.HOME_ENV, str(tmp_path))
    res = runner.invoke(app, ["cluster", "status"])
    assert res.exit_code == 1 and "no local cluster is running" in res.output
    res = runner.invoke(app, ["cluster", "stop"])
    assert res.exit_code == 0 and "no local cluster was running" in res.output
    lc.state_file().parent.mkdir(parents=True, exist_ok=True)
    lc.state_file().write_text(
        '{"address": "127.0.0.1:9", "dashboard": "http://127.0.0.1:9", "temp_dir": "/nonexistent", '
        '"num_cpus": null, "command": "ray start"}'
    )
    assert lc.recorded_cluster() is None and not lc.state_file().exists()  # a stale record is dropped


@pytest.mark.slow
@pytest.mark.ray
def test_local_cluster_listens_on_loopback_is_joined_and_stops_alone(tmp_path, monkeypatch, ray_cluster):
    import ray

    from msnoop.core import runtime
    from msnoop.submit import dashboard_address

    monkeypatch.setenv(lc.HOME_ENV, str(tmp_path))
    res = runner.invoke(app, ["cluster", "start", "--num-cpus", "1"])
    assert res.exit_code == 0, res.output
    cluster = lc.recorded_cluster()
    try:
        assert cluster is not None and "listening on 127.0.0.1 only" in res.output and cluster.address in res.output
        listeners = lc.cluster_listeners(cluster.temp_dir)
        ports = {port for _, port, _ in listeners}
        dashboard_port = int(cluster.dashboard.rsplit(":", 1)[1])
        assert {cluster.gcs_port, dashboard_port} <= ports
        assert [(ip, port, name) for ip, port, name in listeners if not lc.is_loopback(ip)] == []
        again = runner.invoke(app, ["cluster", "start"])
        assert again.exit_code == 0 and "already running" in again.output  # one cluster, not two
        monkeypatch.setattr(runtime, "ray_session_here", lambda: False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        assert runtime.cluster_to_join(None) == cluster.address  # msnoop commands join it
        assert dashboard_address(None) == cluster.dashboard  # and submit sends there
    finally:
        res = runner.invoke(app, ["cluster", "stop"])
    assert res.exit_code == 0 and "stopped the local cluster" in res.output
    assert lc._cluster_processes(cluster.temp_dir) == [] and lc.recorded_cluster() is None
    assert ray.cluster_resources().get("CPU")  # the test session's own Ray cluster still answers
