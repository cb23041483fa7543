"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, one bucket, stopped afterwards.

Used through the ``s3`` fixture in conftest.py. moto accepts any credentials; the fixture sets the
dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in this process's environment (restored at
teardown) because pyarrow's AWS SDK and Lance's ``object_store`` read credentials from there, as
they do in production. The endpoint itself is *not* put into the environment: tests pass it with a
:class:`msnoop.core.storage.StorageConfig`, as a ``storage:`` config section would.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # the SDKs otherwise probe 169.254.169.254 for a region/role
}


@dataclass
class S3Endpoint:
    endpoint_url: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self):  # type: ignore[no-untyped-def]
        from msnoop.core.storage import StorageConfig

        return StorageConfig(endpoint_url=self.endpoint_url, region="us-east-1")

    def uri(self, *names: str) -> str:
        """``s3://<bucket>/<names...>``."""
        return "/".join([f"s3://{self.bucket}", *names])

    def fresh(self) -> str:
        """A new empty prefix in the bucket (tests share one server and bucket)."""
        return self.uri(f"t-{uuid.uuid4().hex[:10]}")


def start_s3() -> Iterator[S3Endpoint]:
    """Start moto's server on a free loopback port, create a bucket, yield, stop and restore the env."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1", host
        endpoint = f"http://{host}:{port}"
        os.environ.update(CREDENTIALS)
        bucket = "msnoop-test"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield S3Endpoint(endpoint_url=endpoint, bucket=bucket, env={**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def request_log(prefix: str) -> Iterator[list[str]]:
    """``METHOD path?query`` of every request the in-process moto server serves under ``/<prefix>``."""
    logger = logging.getLogger("werkzeug")  # moto's server logs one line per request at INFO
    level, handler = logger.level, _Lines()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    got: list[str] = []
    try:
        yield got
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for line in handler.lines:
            if '"' not in line:
                continue
            method, path = line.split('"')[1].split()[:2]
            method = method.rsplit("m", 1)[-1] if "\x1b" in method else method  # coloured DELETE/GET lines
            if path.startswith(f"/{prefix}"):
                got.append(f"{method} {path}")
