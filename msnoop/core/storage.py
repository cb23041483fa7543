"""One storage layer for every path: local folders and object storage URIs behind ``pyarrow.fs``.

A *location* is a plain path (``out/run1``), a ``file://`` URI, or an object storage URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix``; ``abfs://`` and other
schemes go through fsspec when its implementation is installed). :func:`resolve` turns it into a
``(pyarrow.fs.FileSystem, path)`` pair; the helpers below (exists, list, read, atomic write, remove,
join) take locations and work the same on all of them.

Atomicity: a local file is written to a hidden temporary name beside it and renamed with
``os.replace``; on object storage a single PUT or a completed multipart upload is atomic (the
object appears whole or not at all), so the final key is written directly, from a buffer that is
complete before the upload starts: a failure while serialising writes nothing.

Credentials are never part of a :class:`StorageConfig`: they come from the standard environment
variables or credential chains of each SDK (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``/``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``), so
they never end up in saved configs, run.json, logs or Ray task arguments. Only the endpoint, region
and ``allow_http``/``anonymous`` switches are configuration.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: schemes pyarrow serves natively (``FileSystem.from_uri``); everything else goes through fsspec
S3_SCHEMES = ("s3", "s3a")
GCS_SCHEMES = ("gs", "gcs")
AZURE_SCHEMES = ("az", "abfs", "abfss")
LOCAL_SCHEMES = ("", "file", "local")


class StorageError(ValueError):
    """A storage location cannot be used: one line naming the location and what to install or set."""


class StorageConfig(BaseModel):
    """Object storage settings (a ``storage:`` config section); credentials come from the environment.

    Every field left at ``None`` falls back to the usual environment variable (see :meth:`from_env`).
    """

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO); env AWS_ENDPOINT_URL"
    )
    region: str | None = Field(None, description="bucket region; env AWS_REGION / AWS_DEFAULT_REGION")
    anonymous: bool = Field(False, description="unsigned requests (public buckets); no credentials are looked up")
    allow_http: bool | None = Field(
        None, description="allow plain http endpoints (local MinIO/moto); default: true when endpoint_url is http://"
    )
    connect_timeout_s: float | None = Field(None, gt=0, description="TCP connect timeout (SDK default when unset)")

    @classmethod
    def from_env(cls, section: StorageConfig | dict[str, Any] | None = None) -> StorageConfig:
        """``section`` (a ``storage:`` config section) with unset fields filled from the environment.

        Reads ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
        ``AWS_ALLOW_HTTP``. Raises ``pydantic.ValidationError`` on unknown keys.
        """
        cfg = section if isinstance(section, StorageConfig) else cls.model_validate(section or {})
        env = os.environ
        updates: dict[str, Any] = {}
        if cfg.endpoint_url is None:
            updates["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if cfg.region is None:
            updates["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        if cfg.allow_http is None and env.get("AWS_ALLOW_HTTP"):
            updates["allow_http"] = env["AWS_ALLOW_HTTP"].lower() in ("1", "true", "yes")
        return cfg.model_copy(update=updates)

    @property
    def http(self) -> bool:
        """Whether requests may use plain http: ``allow_http``, else true for an ``http://`` endpoint."""
        if self.allow_http is not None:
            return self.allow_http
        return bool(self.endpoint_url and self.endpoint_url.startswith("http://"))


def scheme(location: str | Path) -> str:
    """The URI scheme of ``location`` (lower case), ``""`` for a plain local path.

    A Windows drive letter (``C:\\x``) is a local path, not a scheme.
    """
    if isinstance(location, Path):
        return ""
    parsed = urlparse(str(location))
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a remote URI (not a plain path or ``file://``)."""
    return scheme(location) not in LOCAL_SCHEMES


def local_path(location: str | Path) -> Path:
    """The local path of a plain path or ``file://`` URI. Raises StorageError for remote URIs."""
    s = scheme(location)
    if s not in LOCAL_SCHEMES:
        raise StorageError(f"{location} is not a local path")
    if s:
        parsed = urlparse(str(location))
        return Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
    return Path(location).expanduser()


def _as_location(value: Any) -> Any:
    if isinstance(value, str) and is_uri(value):
        return value
    if isinstance(value, str):
        return local_path(value)
    return value


#: a config field that may hold a local path or a URI: local values become ``Path`` (so
#: ``msnoop.core.config.absolutize`` makes them absolute), URIs stay ``str`` exactly as given
#: (pydantic's ``Path`` would turn ``s3://b/x`` into ``s3:/b/x``)
Location = Annotated[str | Path, BeforeValidator(_as_location)]


def join(base: str | Path, *names: str) -> str | Path:
    """``base`` / ``names``: a :class:`Path` for local paths, a ``/``-joined string for URIs."""
    if not is_uri(base):
        return local_path(base).joinpath(*names)
    return posixpath.join(str(base).rstrip("/"), *names)


def _s3_path(location: str) -> str:
    """``bucket/key`` of an object storage URI, the key taken literally: ``#``, ``?``, ``%`` and ``;`` are
    characters of the key (object stores allow them), not a URL's fragment, query or escapes."""
    return location.split("://", 1)[1].rstrip("/")


@functools.lru_cache(maxsize=32)
def _s3_filesystem(cfg_json: str, short_timeouts: bool) -> pafs.S3FileSystem:
    cfg = StorageConfig.model_validate_json(cfg_json)
    # allow_delayed_open: an object smaller than one upload part (parts, run.json) goes up as a single PutObject
    # when the stream closes; without it pyarrow opens a multipart upload for every object, 3 requests instead of
    # 1 (measured against moto on 127.0.0.1, pyarrow 26: 15 ms -> 4 ms per 100 kB object; tests/test_s3_requests.py).
    # Errors (a missing bucket, wrong keys) then come at close instead of at open: every write here writes and
    # closes in one call, so they still surface from the same call.
    kwargs: dict[str, Any] = {"anonymous": cfg.anonymous, "allow_delayed_open": True}
    if cfg.region:
        kwargs["region"] = cfg.region
    if cfg.endpoint_url:
        parsed = urlparse(cfg.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = "http" if cfg.http else "https"
    if short_timeouts:  # preflight: fail in seconds, not after the SDK's 10 retries with back-off
        kwargs.update(connect_timeout=cfg.connect_timeout_s or 3.0, request_timeout=10.0)
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    elif cfg.connect_timeout_s:
        kwargs["connect_timeout"] = cfg.connect_timeout_s
    # credentials: pyarrow's AWS SDK reads AWS_ACCESS_KEY_ID/... , AWS_PROFILE, instance roles itself
    return pafs.S3FileSystem(**kwargs)


def resolve(
    location: str | Path, config: StorageConfig | None = None, *, _preflight: bool = False
) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a location; ``path`` is what the filesystem's methods take.

    S3 (``s3://``, ``s3a://``) uses :class:`pyarrow.fs.S3FileSystem` configured from ``config``
    (default: :meth:`StorageConfig.from_env`); ``gs://`` and ``az://``/``abfs://`` use pyarrow's GCS
    and Azure filesystems; any other scheme is served by fsspec (``pyarrow.fs.PyFileSystem``).

    Raises:
        StorageError: the scheme has no filesystem here (names the package to install).
    """
    s = scheme(location)
    if s in LOCAL_SCHEMES:
        return pafs.LocalFileSystem(), str(local_path(location).absolute())
    location = str(location)
    if s in S3_SCHEMES:
        cfg = config or StorageConfig.from_env()
        return _s3_filesystem(cfg.model_dump_json(), _preflight), _s3_path(location)
    if s in GCS_SCHEMES and hasattr(pafs, "GcsFileSystem"):
        # from_uri's filesystem retries for 15 min when no credentials/network: bound it in preflight
        limit = {"retry_time_limit": datetime.timedelta(seconds=5)} if _preflight else {}
        return pafs.GcsFileSystem(anonymous=bool(config and config.anonymous), **limit), _s3_path(location)
    if s in AZURE_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(location)
            return fs, path.rstrip("/")
        except (NotImplementedError, ValueError, OSError):
            pass  # pyarrow built without this filesystem (ArrowNotImplementedError): try fsspec (gcsfs, adlfs)
    try:
        import fsspec
        from fsspec.registry import get_filesystem_class
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        get_filesystem_class(s)
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"{location}: no filesystem for scheme {s!r} ({exc}); use s3://, gs://, az:// or a local path, "
            f"or install the fsspec implementation for {s!r} (e.g. `pip install gcsfs`, `adlfs`, `s3fs`)"
        ) from None
    return PyFileSystem(FSSpecHandler(fs)), path.rstrip("/")


def storage_options(location: str | Path, config: StorageConfig | None = None) -> dict[str, str]:
    """Options for Lance/LanceDB (Rust ``object_store``) that point at the same storage as :func:`resolve`.

    Only endpoint/region/http switches: credentials are read by ``object_store`` from the same
    environment variables, so they are never passed around (nor pickled into Ray tasks).
    Empty for local paths.
    """
    if scheme(location) not in S3_SCHEMES:
        return {}
    cfg = config or StorageConfig.from_env()
    opts: dict[str, str] = {}
    if cfg.endpoint_url:
        opts["aws_endpoint"] = cfg.endpoint_url
    if cfg.region:
        opts["aws_region"] = cfg.region
    if cfg.http:
        opts["allow_http"] = "true"
    if cfg.anonymous:
        opts["aws_skip_signature"] = "true"
    return opts


def exists(location: str | Path, config: StorageConfig | None = None) -> bool:
    """Whether a file or folder (on object storage: an object or a prefix) exists at ``location``.

    Raises:
        StorageError: The location's scheme has no filesystem here.
    """
    fs, path = resolve(location, config)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | Path, config: StorageConfig | None = None) -> bool:
    """Whether ``location`` is a folder (on object storage: a prefix with at least one object below it)."""
    fs, path = resolve(location, config)
    info = fs.get_file_info(path)
    return info.type == pafs.FileType.Directory


def list_file_infos(
    location: str | Path, pattern: str = "*", config: StorageConfig | None = None
) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """``(filesystem, infos)``: the files directly under ``location`` matching ``pattern``, sorted by name.

    One listing (on S3: one LIST request per 1000 keys); every ``FileInfo`` carries the file's size, so
    readers can open it without asking for the size again (a HEAD request per file on object storage).
    ``[]`` when the folder does not exist. Hidden names (``.x``) never match.
    """
    fs, path = resolve(location, config)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    keep = [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and fnmatch.fnmatchcase(posixpath.basename(i.path), pattern)
        and not posixpath.basename(i.path).startswith(".")
    ]
    return fs, sorted(keep, key=lambda i: posixpath.basename(i.path))


def list_files(location: str | Path, pattern: str = "*", config: StorageConfig | None = None) -> list[str | Path]:
    """Files directly under folder/prefix ``location`` whose name matches ``pattern`` (fnmatch), sorted.

    Returns :class:`Path` objects for local folders and full URIs (same scheme as ``location``) for
    remote ones; ``[]`` when the folder does not exist. Hidden names (``.x``) never match.
    """
    _, infos = list_file_infos(location, pattern, config)
    return [join(location, posixpath.basename(i.path)) for i in infos]


def walk_files(location: str | Path, config: StorageConfig | None = None) -> list[str]:
    """Every file below folder/prefix ``location`` (recursively), as ``/``-separated paths relative to it, sorted.

    Hidden names are included (callers decide what to skip). ``[]`` when nothing is there.
    """
    fs, path = resolve(location, config)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def open_input(location: str | Path, config: StorageConfig | None = None) -> Any:
    """A seekable binary file (``pyarrow.NativeFile``) for reading ``location``."""
    fs, path = resolve(location, config)
    return fs.open_input_file(path)


def read_bytes(location: str | Path, config: StorageConfig | None = None) -> bytes:
    """Whole content of a file. Raises FileNotFoundError naming the location."""
    fs, path = resolve(location, config)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} not found") from None


def read_text(location: str | Path, config: StorageConfig | None = None) -> str:
    """Whole content of a UTF-8 text file. Raises FileNotFoundError naming the location."""
    return read_bytes(location, config).decode("utf-8")


def makedirs(location: str | Path, config: StorageConfig | None = None) -> None:
    """Create a local folder (parents included); object storage has no folders, so nothing is done there."""
    if not is_uri(location):
        local_path(location).mkdir(parents=True, exist_ok=True)


def write_bytes(location: str | Path, data: bytes | memoryview, config: StorageConfig | None = None) -> None:
    """Write ``data`` to ``location`` atomically: readers see the old content, or all of the new one.

    Local: a hidden temporary file in the same folder, then ``os.replace``. Object storage: one
    upload of the final key (a PUT, or a multipart upload completed on close), which the store
    makes visible atomically; there is no rename on object stores (a copy would double the traffic
    and is not atomic either).
    """
    if not is_uri(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = resolve(location, config)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_text(location: str | Path, text: str, config: StorageConfig | None = None) -> None:
    """Write ``text`` as UTF-8 to ``location`` atomically (see :func:`write_bytes`)."""
    write_bytes(location, text.encode("utf-8"), config)


def write_with(location: str | Path, writer: Any, config: StorageConfig | None = None) -> None:
    """Atomically write what ``writer(file_obj)`` writes (e.g. ``lambda f: pq.write_table(t, f)``).

    The content is serialised into memory first and only then uploaded/renamed, so an exception in
    ``writer`` leaves nothing behind. Memory use is the file's size (parts are bounded by the block size).
    """
    buf = io.BytesIO()
    writer(buf)
    write_bytes(location, buf.getbuffer(), config)


def _tmp_suffix(name: str) -> str:
    """The suffix a writer may read a format from (``.h5ad``, ``.png``, ``.csv.gz``): kept on temporary names."""
    suffixes = Path(name).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


@contextlib.contextmanager
def atomic_path(location: str | Path, config: StorageConfig | None = None) -> Iterator[Path]:
    """A local path to write ``location`` through, so that the file is complete or absent.

    Local: a hidden temporary file beside the final one (same suffix, so writers that read the format from the
    name still do), renamed over it with ``os.replace`` when the block ends without an exception, removed
    otherwise. Object storage: a temporary local file uploaded to the final key in one request when the block
    ends (an upload becomes visible whole or not at all); nothing is uploaded after an exception. Parent folders of
    a local ``location`` are created.

    Example::

        with atomic_path(out / "cells.h5ad") as tmp:
            adata.write_h5ad(tmp)
    """
    if not is_uri(location):
        final = local_path(location)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp{_tmp_suffix(final.name)}")
        try:
            yield tmp
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    import tempfile

    name = str(location).rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="msnoop-") as folder:
        tmp = Path(folder) / f"upload{_tmp_suffix(name)}"
        yield tmp
        write_bytes(location, tmp.read_bytes(), config)


def remove(location: str | Path, config: StorageConfig | None = None, *, missing_ok: bool = True) -> None:
    """Delete a file, or a folder/prefix with everything below it."""
    fs, path = resolve(location, config)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if not missing_ok:
            raise FileNotFoundError(f"{location} not found")
        return
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)


_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and storage.endpoint_url / "
    "AWS_ENDPOINT_URL for a non-AWS endpoint",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a managed identity)",
}


def _hint(location: str | Path) -> str:
    s = scheme(location)
    key = "s3" if s in S3_SCHEMES else "gs" if s in GCS_SCHEMES else "az" if s in AZURE_SCHEMES else ""
    return _HINTS.get(key, "check the path and permissions")


def _where(location: str | Path, config: StorageConfig | None) -> str:
    if scheme(location) in S3_SCHEMES:
        cfg = config or StorageConfig.from_env()
        return f" (endpoint {cfg.endpoint_url or 'AWS default'})"
    return ""


#: (substrings of the SDK's error text, what it means): pyarrow's AWS SDK and GCS client error codes
_CAUSES = (
    (
        ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist"),
        "the bucket does not exist (msnoop never creates buckets)",
    ),
    (
        ("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "UNAVAILABLE", "Connection refused"),
        "the endpoint is unreachable",
    ),
    (
        (
            "ACCESS_DENIED",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "403",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
            "No response body",
        ),
        "access denied (wrong or missing credentials)",
    ),
)


def _short(exc: BaseException) -> str:
    """The cause in a few words, then the SDK's own text cut to one short line."""
    text = " ".join(str(exc).split())
    cause = next((why for keys, why in _CAUSES if any(k in text for k in keys)), None)
    return f"{cause} ({text[:160]})" if cause else text[:240]


def check_readable(location: str | Path, config: StorageConfig | None = None) -> None:
    """Preflight before any work: ``location`` exists and can be listed/read.

    Raises:
        StorageError: one line naming the location, the endpoint and what to set or install
            (unknown scheme, unreachable endpoint, wrong credentials, missing bucket or path).
    """
    fs, path = resolve(location, config, _preflight=True)
    try:
        info = fs.get_file_info(path)
    except Exception as exc:  # noqa: BLE001 - the SDKs raise OSError subclasses with their own texts
        raise StorageError(
            f"cannot read {location}{_where(location, config)}: {_short(exc)}; {_hint(location)}"
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location} not found{_where(location, config)}")


def check_writable(location: str | Path, config: StorageConfig | None = None) -> None:
    """Preflight before any work: a small probe object can be written under ``location`` and deleted.

    Local folders are created. The probe is ``<location>/.msnoop-write-check-<uuid>`` and is removed.

    Raises:
        StorageError: as :func:`check_readable` (for S3 the bucket must exist; msnoop never creates buckets).
    """
    if not is_uri(location):
        path = local_path(location)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".msnoop-write-check-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write to {location}: {_short(exc)}") from None
        return
    fs, path = resolve(location, config, _preflight=True)
    probe = posixpath.join(path, f".msnoop-write-check-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(
            f"cannot write to {location}{_where(location, config)}: {_short(exc)}; {_hint(location)}"
        ) from None


__all__ = [
    "Location",
    "StorageConfig",
    "StorageError",
    "atomic_path",
    "check_readable",
    "check_writable",
    "exists",
    "is_dir",
    "is_uri",
    "join",
    "list_file_infos",
    "list_files",
    "local_path",
    "makedirs",
    "open_input",
    "read_bytes",
    "read_text",
    "remove",
    "resolve",
    "scheme",
    "storage_options",
    "walk_files",
    "write_bytes",
    "write_text",
    "write_with",
]
