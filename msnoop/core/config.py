"""Typed job configs: the shared base, YAML loading and validation, overrides, hashing.

Every job config is a pydantic model with ``extra="forbid"``: an unknown or missing key fails at load
time with a message naming the key and the file. Any field can be overridden from the command line
with ``--set section.key=value`` (values are parsed as YAML), and the resolved config is saved beside
the job's outputs. Each stage keeps its own config sections beside its code (``msnoop.io.config``,
``msnoop.embed.config``, ...); which ``job:`` kind maps to which config class is declared once, in
:mod:`msnoop.job_kinds`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A job config is invalid; the message names the file and the offending key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T", bound=BaseModel)


def _format_errors(err: ValidationError, source: str) -> str:
    from msnoop.core.runtime_env import is_secret_name, redact_value

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key {loc!r}")
        elif e["type"] == "missing":
            lines.append(f"  missing key {loc!r}")
        elif not e["loc"] and e["type"] == "value_error":  # a whole-job check: the message says it all
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            # never echo a secret: values under secret-looking keys and credentials in URLs are masked
            secret = any(is_secret_name(str(p)) for p in e["loc"])
            found = "'***'" if secret else repr(redact_value(e.get("input")))
            found = found if len(found) <= 120 else found[:117] + "..."
            lines.append(f"  {loc}: {e['msg']} (found {found})")
    return f"invalid config {source}:\n" + "\n".join(lines)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last one silently).

    Keys brought in by a merge (``<<: *defaults``) may be overridden, as YAML intends; keys written out twice
    in one mapping may not.
    """

    source = "<string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            seen[key] = line
            if first is not None:
                raise ConfigError(
                    f"config {self.source}: key {key!r} is written twice in one section (lines {first} and {line}); "
                    "YAML would keep only the last one: remove or merge one of them"
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, source: str = "<string>") -> Any:
    """Parse YAML ``text`` like ``yaml.safe_load``, but refuse duplicate keys.

    Raises:
        ConfigError: A key is written twice in one mapping (the message names the key, both lines and ``source``).
        yaml.YAMLError: The text is not YAML.
    """
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings (value as YAML) into pairs.

    Raises:
        ConfigError: An item has no ``=``, or its value is not YAML (or names a key twice).
    """
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. runtime.batch_size=32")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml_text(raw, f"--set {item}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not YAML ({' '.join(str(exc).split())})") from None
        out.append((key.strip(), value))
    return out


def validate_config(model: type[T], data: dict[str, Any], *, source: str = "<command line>") -> T:
    """Validate ``data`` into ``model``; a failure raises :class:`ConfigError` naming ``source`` and each key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file (a local path or an object storage URI) as a mapping of sections.

    Raises:
        ConfigError: The file is missing, is not YAML, names a key twice in one section, or is not a mapping.
    """
    from msnoop.core import storage as st

    if st.is_uri(path):
        try:
            text = st.read_text(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    else:
        path = st.local_path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    try:
        loaded = load_yaml_text(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, found {type(loaded).__name__}")
    return loaded


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """A deep copy of ``data`` (paths as strings) with ``overrides`` (``[(dotted key, value)]``) set."""
    data = json.loads(json.dumps(data, default=str))
    for key, value in overrides or []:
        set_path(data, key, value)
    return data


def absolutize(cfg: T) -> T:
    """A copy of ``cfg`` with every relative path (and a model given as an existing file) made absolute.

    Used before sending a config to a cluster, where the job runs in another working directory.
    """

    def fix(node: Any) -> Any:
        if isinstance(node, BaseModel):
            updates = {name: fix(getattr(node, name)) for name in type(node).model_fields}
            return node.model_copy(update=updates)
        if isinstance(node, Path):
            return node.expanduser().resolve()
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        return node

    out = fix(cfg)
    model = getattr(out, "model", None)
    if isinstance(model, str) and Path(model).expanduser().is_file():
        out = out.model_copy(update={"model": str(Path(model).expanduser().resolve())})
    return out


def config_to_yaml(cfg: BaseModel) -> str:
    """``cfg`` as YAML text, sections in declaration order, paths as strings (what ``resolved_config.yaml`` holds)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def config_hash(cfg: BaseModel) -> str:
    """Short stable hash of a resolved config (runtime settings excluded: they do not change results)."""
    data = json.loads(cfg.model_dump_json())
    data.pop("runtime", None)
    data.pop("storage", None)  # where the bytes go (endpoint, region) does not change results
    data.pop("runtime_env", None)  # how `msnoop submit` sets up the job's processes does not either
    if data.get("job") == "embed" and data.get("cells") is None:
        data.pop("cells", None)  # hashes of whole-image jobs stay as they were before cells mode existed
    if data.get("job") == "embed":  # input options added later change no hash while at their defaults
        new_input = {"dtypes": None, "channel_index": None, "channel_names": False, "z": "refuse", "ome_zarr": None}
        for key, default in new_input.items():
            if data.get("input", {}).get(key, default) == default:
                data.get("input", {}).pop(key, None)
        # the LanceDB vectors' post-processing, at the default it had when this key was added, leaves the hash alone
        if data.get("output", {}).get("postprocess") == "standardize":
            data["output"].pop("postprocess")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def save_resolved(cfg: BaseModel, out_dir: str | Path, *, storage: Any = None) -> Path | str:
    """Write ``cfg`` as YAML beside a job's outputs in ``out_dir`` (a folder or a URI, atomically); returns where.

    The file's name and place are :class:`msnoop.core.rundir.RunDir`'s; ``storage`` is a
    :class:`msnoop.core.storage.StorageConfig` for URIs (default: the environment).
    """
    from msnoop.core.rundir import RunDir

    return RunDir(out_dir, storage).save_config(cfg)
