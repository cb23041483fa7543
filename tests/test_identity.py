"""The run's identity: every setting that can change a stored vector or row, and nothing is left out silently.

No Ray: identities are computed from configs and a loaded random network, and compared by the output folder
(``RunDir.check_resumable``) over a folder holding one part, as a resumed run would find it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from msnoop.core import parts
from msnoop.core.rundir import OutputMismatchError, RunDir
from msnoop.embed.config import EmbedJob
from msnoop.embed.identity import (
    NOT_IDENTITY,
    RESOLVED,
    config_leaves,
    config_paths,
    field_defaults,
    identity_defaults,
    run_identity,
)
from msnoop.job_kinds import build_config
from msnoop.models.loading import load_for_embedding


def _data(tmp_path, cells: bool = False) -> dict:
    data = {
        "job": "embed",
        "input": {"manifest": str(tmp_path / "m.csv"), "channels": ["dna", "gfp"]},
        "model": "random:test_cnn:0",
        "output": {"dir": str(tmp_path / "out")},
    }
    if cells:
        data["cells"] = {"segmentation": {"backend": "builtin", "channel": "dna"}}
    return data


def _identity(data: dict) -> dict:
    cfg = build_config(data)
    model, spec = load_for_embedding(cfg.model, cfg.preprocess)
    return run_identity(cfg, model, spec)


def test_every_setting_is_in_the_identity_or_excluded_with_a_reason(tmp_path):
    """A setting added to the config is part of the identity unless someone lists it, with a reason, as one that
    changes no vector or row: this test fails for a listed name that no longer exists, and the identity of a
    cells-mode job holds every other leaf."""
    leaves = config_leaves(EmbedJob)
    listed = {*NOT_IDENTITY, *RESOLVED}
    stale = [k for k in listed if k not in config_paths(EmbedJob)]
    assert not stale, f"NOT_IDENTITY/RESOLVED name settings EmbedJob does not have: {stale}"
    assert all(reason.strip() for reason in NOT_IDENTITY.values())
    identity = _identity(_data(tmp_path, cells=True))
    for leaf in leaves:
        covered = any(leaf == k or leaf.startswith(k + ".") for k in listed)
        assert covered or leaf in identity, f"{leaf} is neither in the identity nor excluded"
    assert {"model", "model.arch", "preprocess", "model.embed_dim_per_channel", "precision"} <= set(identity)
    json.dumps(identity)  # saved in run.json as it is


#: Settings the issue names as changing stored vectors or rows, with another valid value.
CHANGES = {
    "input.channel_index": {"dna": 1, "gfp": 0},
    "input.channel_names": True,
    "input.z": "max",
    "input.channels": ["gfp", "dna"],
    "input.channel_columns": {"dna": "a", "gfp": "b"},
    "input.id_column": "Metadata_Key",
    "cells.segmentation.backend": "mask",
    "cells.ratio": 3.0,
    "cells.skip_border": False,
    "cells.max_cells_per_image": 8,
    "cells.seed": 7,
    "cells.empty": "zero",
    "output.postprocess": "raw",
    "runtime.amp": "off",
    "model": "random:test_cnn:1",
    "preprocess.mode": "tile",
}
#: Settings that change no vector or row.
SAME = {
    "runtime.batch_size": 3,
    "runtime.images_per_block": 1,
    "runtime.actors": 2,
    "runtime.ray_min_images": 0,
    "runtime.memory_format": "contiguous",
    "output.table": "other",
    "output.index": "none",
    "input.limit": 5,
    "name": "renamed",
    "cells.save_masks": True,
    "storage": {"region": "eu-west-1"},
}


def _set(data: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(data))
    node = out
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    if dotted == "cells.segmentation.backend":
        node["column"] = "mask_path"
        node.pop("channel", None)
        node.setdefault("channel", None)
    if dotted == "preprocess.mode":
        out.pop("cells", None)
    return out


def _folder_with_rows(tmp_path, identity: dict) -> RunDir:
    run = RunDir(tmp_path / "out")
    err = pa.table({"Metadata_ImageID": ["a"], "path": ["a.tif"], "reason": ["x"]}, schema=parts.ERRORS_SCHEMA)
    parts.write_part(err, run.errors)  # any row makes the folder one to resume
    run.write_info({"job": "embed", "identity": identity})
    return run


@pytest.mark.parametrize("setting", sorted(CHANGES))
def test_a_rerun_with_another_value_of_a_setting_that_changes_rows_is_refused_naming_it(tmp_path, setting):
    cells = setting.startswith("cells.")
    base = _data(tmp_path, cells=cells or setting == "input.channel_index")
    before = _identity(base)
    changed = _identity(_set(base, setting, CHANGES[setting]))
    assert changed != before
    run = _folder_with_rows(tmp_path, before)
    key = {"preprocess.mode": "preprocess", "runtime.amp": "precision"}.get(setting, setting)
    with pytest.raises(OutputMismatchError, match=rf"\({'.*' if key != 'model' else ''}{key}: .* there, .* now"):
        run.check_resumable({"identity": changed}, defaults=field_defaults(EmbedJob))
    run.check_resumable({"identity": before}, defaults=field_defaults(EmbedJob))  # the same settings resume


@pytest.mark.parametrize("setting", sorted(SAME))
def test_settings_that_change_no_row_leave_the_identity_alone(tmp_path, setting):
    base = _data(tmp_path, cells=True)
    assert _identity(_set(base, setting, SAME[setting])) == _identity(base)


@pytest.mark.parametrize("seed", range(6))
def test_random_changes_are_refused_and_a_setting_new_since_the_folder_counts_as_its_default(tmp_path, seed):
    """Property over random identities: any differing setting is refused by name; settings the folder's record
    lacks (added to msnoop since) pass at their default and are refused at another value."""
    rng = np.random.default_rng(seed)
    identity = _identity(_data(tmp_path, cells=bool(seed % 2)))
    defaults = field_defaults(EmbedJob)
    run = _folder_with_rows(tmp_path, identity)
    keys = sorted(identity)
    for key in rng.choice(keys, size=4, replace=False):
        if key == "cells":  # the mode: whole-image or cells
            other, said = {**identity, key: None if identity[key] else "set"}, r"\(it holds a (cells|whole-image) mode"
        else:
            other, said = {**identity, key: {"changed": int(rng.integers(1, 100))}}, rf"{key}: "
        with pytest.raises(OutputMismatchError, match=said):
            run.check_resumable({"identity": other}, defaults=defaults)
    new_setting = "input.some_future_setting"
    run.check_resumable({"identity": {**identity, new_setting: None}}, defaults={**defaults, new_setting: None})
    with pytest.raises(OutputMismatchError, match=rf"{new_setting}: null there, 3 now"):
        run.check_resumable({"identity": {**identity, new_setting: 3}}, defaults={**defaults, new_setting: None})


def test_a_folder_without_rows_accepts_any_identity_and_one_with_errors_only_does_not(tmp_path):
    identity = _identity(_data(tmp_path))
    run = RunDir(tmp_path / "out")
    run.write_info({"job": "embed", "identity": {**identity, "input.z": "max"}})
    run.check_resumable({"identity": identity})  # a run killed before its first part: nothing to mix
    _folder_with_rows(tmp_path, {**identity, "input.z": "max"})
    with pytest.raises(OutputMismatchError, match=r"input.z: \"max\" there, \"refuse\" now"):
        run.check_resumable({"identity": identity})


def test_the_config_fixes_defaults_for_every_identity_setting(tmp_path):
    """A setting added later is compared with its default: every identity leaf of the config has one (or is
    required and always recorded)."""
    defaults = identity_defaults(EmbedJob)
    identity = _identity(_data(tmp_path, cells=True))
    required = {"input.channels", "model", "model.arch", "model.embed_dim_per_channel", "preprocess", "cells"}
    missing = [k for k in identity if k not in defaults and k not in required and not k.startswith("cells.")]
    assert not missing
    assert defaults["input.z"] == "refuse" and defaults["output.postprocess"] == "standardize"
