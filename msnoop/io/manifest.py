"""Build the image table of a job: one row per image, one path column per channel, ``Metadata_*``.

The result always has ``Metadata_ImageID`` (unique), one ``Metadata_Path_<channel>`` column per channel
(absolute paths, in config channel order) and every other manifest column as ``Metadata_<name>``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from msnoop.core.config import ConfigError
from msnoop.io.config import InputConfig

logger = logging.getLogger(__name__)

ID_COLUMN = "Metadata_ImageID"
PATH_PREFIX = "Metadata_Path_"


def path_column(channel: str) -> str:
    return f"{PATH_PREFIX}{channel}"


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith(".parquet"):
        return pd.read_parquet(path)
    if suffixes.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    raise ConfigError(f"manifest {path}: expected a .csv, .csv.gz or .parquet file, found {path.suffix!r}")


def _metadata_name(col: str) -> str:
    return col if col.startswith("Metadata_") else f"Metadata_{col}"


def _absolute(paths: pd.Series, root: Path) -> pd.Series:
    def fix(p: object) -> str:
        if not isinstance(p, str) or not p:
            return ""
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (root / q))

    return paths.map(fix)


def _from_manifest(cfg: InputConfig) -> pd.DataFrame:
    assert cfg.manifest is not None
    df = _read_table(cfg.manifest)
    root = cfg.root or cfg.manifest.parent
    mapping = dict(cfg.channel_columns or {})
    for ch in cfg.channels:
        if ch in mapping:
            if mapping[ch] not in df.columns:
                raise ConfigError(
                    f"manifest {cfg.manifest}: column {mapping[ch]!r} for channel {ch!r} not found; columns: {list(df.columns)}"
                )
            continue
        candidates = [ch, f"{ch}_path", f"path_{ch}", f"Path_{ch}", path_column(ch), f"FileName_{ch}"]
        found = next((c for c in candidates if c in df.columns), None)
        if found is None:
            raise ConfigError(
                f"manifest {cfg.manifest}: no path column for channel {ch!r}; expected one of {candidates} "
                f"(or set input.channel_columns); found columns {list(df.columns)}"
            )
        mapping[ch] = found
    out = pd.DataFrame(index=df.index)
    used = set(mapping.values())
    for col in df.columns:
        if col not in used:
            out[_metadata_name(col)] = df[col].to_numpy()
    for ch in cfg.channels:
        out[path_column(ch)] = _absolute(df[mapping[ch]], root).to_numpy()
    return out


def _from_loaddata(cfg: InputConfig) -> pd.DataFrame:
    assert cfg.loaddata is not None
    df = _read_table(cfg.loaddata)
    root = cfg.root or cfg.loaddata.parent
    out = pd.DataFrame(index=df.index)
    used: set[str] = set()
    paths = {}
    for ch in cfg.channels:
        key = next((k for k in (ch, f"Orig{ch}") if f"FileName_{k}" in df.columns), None)
        if key is None:
            have = sorted(c[len("FileName_") :] for c in df.columns if c.startswith("FileName_"))
            raise ConfigError(f"LoadData file {cfg.loaddata}: no FileName_{ch} column; channels present: {have}")
        fname, pname = f"FileName_{key}", f"PathName_{key}"
        used.update({fname, pname})
        if pname in df.columns:
            joined = [
                str(Path(str(d)) / str(f)) if isinstance(f, str) else ""
                for d, f in zip(df[pname], df[fname], strict=True)
            ]
        else:
            joined = [f if isinstance(f, str) else "" for f in df[fname]]
        paths[ch] = _absolute(pd.Series(joined, index=df.index), root)
    for col in df.columns:
        if col not in used and not col.startswith(("FileName_", "PathName_", "URL_")):
            out[_metadata_name(col)] = df[col].to_numpy()
    for ch in cfg.channels:
        out[path_column(ch)] = paths[ch].to_numpy()
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Turn ``"{Metadata_Well}_{channel}.tif"`` into a regex with named groups (repeats must agree)."""
    seen: set[str] = set()
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", pattern)
    rx = ""
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            rx += f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)"
            seen.add(name)
        else:
            rx += re.escape(part)
    if "channel" not in seen:
        raise ConfigError(f"input.pattern {pattern!r} must contain a {{channel}} field")
    return re.compile(rx + r"\Z")


def _from_folder(cfg: InputConfig) -> pd.DataFrame:
    assert cfg.folder is not None and cfg.pattern is not None
    folder = cfg.folder
    if not folder.is_dir():
        raise ConfigError(f"input.folder {folder} is not a folder")
    rx = pattern_regex(cfg.pattern)
    values = {ch: (cfg.channel_values or {}).get(ch, ch) for ch in cfg.channels}
    by_value = {v: ch for ch, v in values.items()}
    groups: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        m = rx.match(path.relative_to(folder).as_posix())
        if not m or m.group("channel") not in by_value:
            continue
        fields = tuple(sorted((k, v) for k, v in m.groupdict().items() if k != "channel"))
        groups.setdefault(fields, {})[by_value[m.group("channel")]] = str(path.resolve())
    if not groups:
        raise ConfigError(
            f"input.folder {folder}: no file matches pattern {cfg.pattern!r} with channel values {sorted(by_value)}"
        )
    rows = []
    for fields, chans in groups.items():
        row = {_metadata_name(k): v for k, v in fields}
        for ch in cfg.channels:
            row[path_column(ch)] = chans.get(ch, "")
        rows.append(row)
    return pd.DataFrame(rows)


def load_image_table(cfg: InputConfig) -> pd.DataFrame:
    """Read the job's inputs into the image table (see module docstring).

    Raises:
        ConfigError: The source is missing or malformed, a channel has no column, or ids repeat.
    """
    if cfg.manifest is not None:
        df = _from_manifest(cfg)
    elif cfg.loaddata is not None:
        df = _from_loaddata(cfg)
    else:
        df = _from_folder(cfg)
    df = df.reset_index(drop=True)
    if cfg.id_column:
        col = _metadata_name(cfg.id_column)
        if col not in df.columns:
            raise ConfigError(f"input.id_column {cfg.id_column!r} not found; columns: {list(df.columns)}")
        df[ID_COLUMN] = df[col].astype(str)
    elif ID_COLUMN not in df.columns:
        first = df[path_column(cfg.channels[0])]
        root = Path(_common_root([p for p in first if p]))
        df[ID_COLUMN] = [
            str(Path(p).relative_to(root).with_suffix("")) if p else f"row{i}" for i, p in enumerate(first)
        ]
    df[ID_COLUMN] = df[ID_COLUMN].astype(str)
    dup = df[ID_COLUMN][df[ID_COLUMN].duplicated()]
    if len(dup):
        raise ConfigError(f"image ids are not unique ({len(dup)} repeats, e.g. {dup.iloc[0]!r}); set input.id_column")
    if cfg.limit is not None:
        df = df.iloc[: cfg.limit].reset_index(drop=True)
    meta = [c for c in df.columns if c != ID_COLUMN and not c.startswith(PATH_PREFIX)]
    return df[[ID_COLUMN, *meta, *[path_column(ch) for ch in cfg.channels]]]


def _common_root(paths: list[str]) -> str:
    import os

    if not paths:
        return "/"
    if len(paths) == 1:
        return str(Path(paths[0]).parent)
    return os.path.commonpath(paths)
