"""Shared fixtures: a small session-wide local Ray cluster, paths to the shared real data, scripts under jobs/."""

from __future__ import annotations

import importlib.util
import sys
import os
from pathlib import Path
from types import ModuleType

import pytest

SHARED_DATA = Path(os.environ.get("MSNOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data)")
    return path


@pytest.fixture
def shared_data():
    """``shared_data("yeast")`` -> path under ../shared/data, or skip the test when it is absent."""
    return _shared_data


def _load_job_script(name: str) -> ModuleType:
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    if str(jobs) not in sys.path:  # as when run as `python jobs/<name>.py`: the scripts import their harness
        sys.path.insert(0, str(jobs))
    spec = importlib.util.spec_from_file_location(name, jobs / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def job_script():
    """``job_script("bench_embed")`` -> ``jobs/bench_embed.py`` imported as a module (jobs/ is not a package)."""
    return _load_job_script


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint (moto's server on 127.0.0.1) with one bucket; see tests/s3_server.py."""
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    from s3_server import start_s3

    yield from start_s3()


@pytest.fixture(scope="module")
def ray_two_nodes(s3):
    """A real two-node Ray cluster (head + a node with resource ``worker_node``) on 127.0.0.1; see tests/ray_two_nodes.py.

    Its nodes have the S3 endpoint's credentials in their environment; drivers run in subprocesses
    (``cluster.run_driver(code)``) so the in-process ``ray_cluster`` session is not disturbed.
    """
    from ray_two_nodes import start_two_nodes

    yield from start_two_nodes(extra_env=s3.env)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a small shared CPU, two threads contend and run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU local Ray cluster for the whole session, on loopback, small object store."""
    from msnoop.core.runtime import init_ray, shutdown_ray

    init_ray(address=None, num_cpus=2, object_store_memory=600 * 1024**2, quiet=True)
    yield
    shutdown_ray()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
