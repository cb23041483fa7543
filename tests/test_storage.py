"""The storage layer on local folders and on a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msnoop.core import storage
from msnoop.core.storage import StorageConfig, StorageError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("out/run", ""),
        ("/abs/x", ""),
        ("file:///tmp/x", "file"),
        ("s3://b/k", "s3"),
        ("GS://b/k", "gs"),
        ("az://c/p", "az"),
        ("C:\\data\\x", ""),
    ],
)
def test_scheme(location, expected):
    assert storage.scheme(location) == expected
    assert storage.is_uri(location) == (expected not in ("", "file"))


def test_join_keeps_uris_and_paths(tmp_path):
    assert storage.join("s3://b/pre/", "embeddings", "part-1.parquet") == "s3://b/pre/embeddings/part-1.parquet"
    assert storage.join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert storage.join(f"file://{tmp_path}", "a") == tmp_path / "a"


def test_storage_config_reads_env_and_rejects_unknown_keys(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    cfg = StorageConfig.from_env()
    assert (cfg.endpoint_url, cfg.region, cfg.http) == ("http://127.0.0.1:9000", "eu-west-1", True)
    assert StorageConfig.from_env({"region": "us-west-2"}).region == "us-west-2"  # the section wins
    opts = storage.storage_options("s3://b/db", cfg)
    assert opts == {"aws_endpoint": "http://127.0.0.1:9000", "aws_region": "eu-west-1", "allow_http": "true"}
    assert storage.storage_options("/local/db", cfg) == {}
    with pytest.raises(ValueError, match="access_key"):
        StorageConfig.from_env({"access_key": "x"})  # credentials are not configuration


@pytest.mark.parametrize("where", ["local", "s3"])
def test_roundtrip_and_atomic_writes(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        base, cfg = s3.fresh(), s3.config
    else:
        base, cfg = str(tmp_path / "out"), None
    storage.check_writable(base, cfg)
    f = storage.join(base, "run.json")
    assert not storage.exists(f, cfg)
    storage.write_text(f, '{"a": 1}', cfg)
    assert storage.read_text(f, cfg) == '{"a": 1}'
    storage.write_text(f, '{"a": 2}', cfg)  # overwrite in place
    assert storage.read_text(f, cfg) == '{"a": 2}'

    # a writer that fails half-way leaves nothing behind (no partial object, no temporary file)
    def broken(out):
        out.write(b"PAR1 half a file")
        raise RuntimeError("disk full")

    bad = storage.join(base, "part-bad.parquet")
    with pytest.raises(RuntimeError, match="disk full"):
        storage.write_with(bad, broken, cfg)
    assert not storage.exists(bad, cfg)

    table = pa.table({"x": list(range(5))})
    for i in range(3):
        storage.write_with(storage.join(base, f"part-{i}.parquet"), lambda out: pq.write_table(table, out), cfg)
    storage.write_text(storage.join(base, "other.txt"), "x", cfg)
    files = storage.list_files(base, "part-*.parquet", cfg)
    assert [str(p).rsplit("/", 1)[-1] for p in files] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert all(str(p).startswith(str(base)) for p in files)  # full URIs / paths, same scheme
    with storage.open_input(files[0], cfg) as fh:
        assert pq.read_table(fh).column("x").to_pylist() == list(range(5))
    assert storage.is_dir(base, cfg)
    leftovers = [p for p in storage.list_files(base, "*", cfg) if ".tmp" in str(p) or "write-check" in str(p)]
    assert leftovers == []
    storage.remove(base, cfg)
    assert storage.list_files(base, "*", cfg) == []
    assert not storage.exists(f, cfg)


def test_preflight_unreachable_endpoint_names_uri_and_endpoint(s3):
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{_free_port()}", region="us-east-1")
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as err:
        storage.check_writable("s3://msnoop-test/out", cfg)
    msg = str(err.value)
    assert "s3://msnoop-test/out" in msg and cfg.endpoint_url in msg and "AWS_ENDPOINT_URL" in msg
    assert "endpoint is unreachable" in msg
    assert "\n" not in msg
    assert time.perf_counter() - t0 < 30  # fails fast, not after the SDK's retries with back-off
    with pytest.raises(StorageError, match="cannot read s3://msnoop-test/parts"):
        storage.check_readable("s3://msnoop-test/parts", cfg)


def test_preflight_missing_bucket_and_path(s3):
    with pytest.raises(
        StorageError,
        match=r"cannot write to s3://no-such-bucket/out \(endpoint http://127\.0\.0\.1:\d+\): the bucket does not exist",
    ):
        storage.check_writable("s3://no-such-bucket/out", s3.config)
    with pytest.raises(StorageError, match="s3://msnoop-test/nothing-here not found"):
        storage.check_readable(s3.uri("nothing-here"), s3.config)


def test_unknown_scheme_names_what_to_install():
    with pytest.raises(StorageError, match=r"nosuch://b/x: no filesystem for scheme 'nosuch'"):
        storage.resolve("nosuch://b/x")
    with pytest.raises(StorageError, match="no filesystem for scheme"):
        storage.check_writable("nosuch://b/x")


def test_fsspec_fallback_memory():
    loc = "memory://msnoop-test/a"
    storage.write_text(storage.join(loc, "run.json"), "{}")
    assert storage.read_text(storage.join(loc, "run.json")) == "{}"
    assert [str(p) for p in storage.list_files(loc, "*.json")] == ["memory://msnoop-test/a/run.json"]
    storage.remove(loc)


def test_credentials_never_in_config_dump(s3):
    dumped = s3.config.model_dump_json() + str(storage.storage_options(s3.uri("db"), s3.config))
    assert "testing" not in dumped  # the fixture's access key / secret


def test_s3_filesystem_pickles_without_credentials(monkeypatch):
    """Ray ships the filesystem to tasks by pickle: credentials stay in each worker's environment."""
    import pickle

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "KEYID-not-to-ship")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET-not-to-ship")
    fs, _ = storage.resolve("s3://b/x", StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    blob = pickle.dumps(fs)
    assert b"not-to-ship" not in blob
    assert pickle.loads(blob).get_file_info  # a usable filesystem comes back
