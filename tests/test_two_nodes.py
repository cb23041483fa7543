"""A real two-node Ray cluster on 127.0.0.1: work forced onto the second node writes to S3 (moto) and
the driver sees all of it; the embed job with its actors pinned to the second node (``runtime.actor_resources``)
reads its manifest and images from S3 and writes there; losing that node mid-run and re-running loses and
duplicates nothing. One cluster for the module (each test's driver is a subprocess; see tests/ray_two_nodes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DRIVER = """
import json, ray
import numpy as np, pandas as pd
from msnoop.core.storage import StorageConfig
from msnoop.core import parts
from msnoop.store.lance_ray import build_table_ray

args = json.loads({args!r})
cfg = StorageConfig(**args["storage"])
ray.init(log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False

def write(batch):
    ids = [f"img{{i:05d}}" for i in batch["id"]]
    rng = np.random.default_rng(int(batch["id"][0]))
    table = parts.embeddings_frame(pd.DataFrame({{"Metadata_ImageID": ids}}), rng.random((len(ids), 4), np.float32))
    parts.write_part(table, args["emb"], storage=cfg)
    return {{"node": np.array([ray.get_runtime_context().get_node_id()])}}

ds = ray.data.range(args["rows"], override_num_blocks=args["blocks"])
nodes = ds.map_batches(write, batch_size=None, num_cpus=0.5, resources={{"worker_node": 0.01}}).take_all()
n = build_table_ray(args["db"], "images", args["emb"], dim=4, info={{"model": "two-nodes"}}, storage=cfg,
                    ray_remote_args={{"num_cpus": 0.5, "resources": {{"worker_node": 0.01}}}})
alive = [n_ for n_ in ray.nodes() if n_["Alive"]]
print(json.dumps({{
    "task_nodes": sorted({{r["node"] for r in nodes}}),
    "worker_node": [n_["NodeID"] for n_ in alive if "worker_node" in n_["Resources"]],
    "node_ips": sorted(n_["NodeManagerAddress"] for n_ in alive),
    "lance_rows": n,
}}))
"""


def test_cluster_listens_on_loopback_only(ray_two_nodes):
    listeners = ray_two_nodes.listeners()
    assert listeners, "no listening sockets found for the cluster's processes"
    hosts = {addr.rsplit(":", 1)[0] for addr in listeners}
    assert hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, listeners


def test_worker_node_writes_parts_to_s3_driver_sees_them(ray_two_nodes, s3):
    base = s3.fresh()
    emb, db = storage.join(base, RunDir.EMBEDDINGS), storage.join(base, "lancedb")
    rows, blocks = 500, 6
    args = {"storage": s3.config.model_dump(), "emb": emb, "db": db, "rows": rows, "blocks": blocks}
    out = ray_two_nodes.run_driver(DRIVER.format(args=json.dumps(args)))
    assert out["node_ips"] == ["127.0.0.1", "127.0.0.1"]
    assert len(out["worker_node"]) == 1
    assert out["task_nodes"] == out["worker_node"]  # every write ran on the second node
    # this process (not the cluster's driver) sees every row once, from S3
    assert len(parts.part_files(emb, storage=s3.config)) >= 1
    assert parts.count_rows(emb, storage=s3.config) == rows
    assert parts.read_ids(emb, storage=s3.config) == {f"img{i:05d}" for i in range(rows)}
    assert out["lance_rows"] == rows
    import lancedb

    table = lancedb.connect(db, storage_options=storage.storage_options(db, s3.config)).open_table("images")
    assert table.count_rows() == rows
    frame = parts.read_frame(emb, storage=s3.config).set_index("Metadata_ImageID")
    probe = "img00123"
    hit = table.search(frame.loc[probe].to_numpy(np.float32)).limit(1).to_pandas()
    assert hit["Metadata_ImageID"].tolist() == [probe]


# --- the embed job itself on the two nodes: actors pinned to the second node, inputs and outputs on S3 ----------

N_IMAGES = 40  # of which BAD_ROWS are unreadable
BAD_ROWS = (3, 29)
FIRST = 12  # images of the first run (input.limit), bad row 3 among them

EMBED_DRIVER = """
import json, time
import ray
from ray._private import state
from msnoop.job_kinds import build_config, run_embed_job

cfg = build_config(json.loads({cfg!r}))
t0 = time.perf_counter()
r = run_embed_job(cfg)
job = ray.get_runtime_context().get_job_id()
pool = [a for a in state.actors().values() if "EmbedActor" in a["ActorClassName"] and a["JobID"] == job]
print(json.dumps({{
    "n_input": r.n_input, "skipped": r.n_skipped, "embedded": r.n_embedded, "errors": r.n_errors,
    "rows_total": r.n_rows_total, "errors_total": r.n_errors_total, "table": r.table,
    "actor_nodes": sorted({{a["Address"]["NodeID"] for a in pool}}), "n_actors": len(pool),
    "worker_node": [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]],
    "seconds": time.perf_counter() - t0,
}}))
"""


@pytest.fixture(scope="module")
def s3_images(s3, tmp_path_factory):
    """``N_IMAGES`` one-channel TIFFs and a manifest (relative paths) in the bucket; ``BAD_ROWS`` are not TIFFs."""
    import io

    import boto3
    import pandas as pd
    import tifffile

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
    prefix = s3.fresh().split("/", 3)[3]
    rng = np.random.default_rng(18)
    rows = []
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        if i in BAD_ROWS:
            buf.write(b"not a tiff")
        else:
            tifffile.imwrite(buf, rng.integers(0, 4000, (64, 64)).astype(np.uint16))
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/img/i{i:03d}.tif", Body=buf.getvalue())
        rows.append({"dna": f"img/i{i:03d}.tif", "Metadata_Index": i, "Metadata_Group": f"g{i % 4}"})
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.csv", Body=pd.DataFrame(rows).to_csv(index=False))
    return s3.uri(prefix, "manifest.csv")


def embed_config(manifest: str, out: str, s3, limit: int | None = None) -> dict:
    return {
        "job": "embed",
        "name": "twonodes",
        "input": {"manifest": manifest, "channels": ["dna"], **({"limit": limit} if limit else {})},
        "model": "random:test_cnn:0",
        "output": {"dir": out},
        "storage": {"endpoint_url": s3.endpoint_url, "region": "us-east-1"},
        "runtime": {
            "images_per_block": 2,
            "batch_size": 8,
            "progress": False,
            "actors": "auto",  # capped at 1 by the one worker_node unit of the second node
            "actor_resources": {"worker_node": 1},
        },
    }


def assert_each_row_once(out: str, s3, n_input: int) -> None:
    """Every manifest row is in embeddings/ or errors/ exactly once, read back from S3 by this process."""
    emb = parts.read_frame(storage.join(out, RunDir.EMBEDDINGS), columns=[parts.ID_COLUMN], storage=s3.config)
    err = parts.read_frame(storage.join(out, RunDir.ERRORS), columns=[parts.ID_COLUMN], storage=s3.config)
    emb_ids, err_ids = emb[parts.ID_COLUMN], err[parts.ID_COLUMN]
    assert emb_ids.is_unique, emb_ids[emb_ids.duplicated()].tolist()
    assert err_ids.is_unique, err_ids[err_ids.duplicated()].tolist()
    assert not set(emb_ids) & set(err_ids)
    assert len(emb_ids) + len(err_ids) == n_input


def test_embed_job_actors_on_second_node_s3_in_and_out(ray_two_nodes, s3, s3_images):
    out = storage.join(s3.fresh(), "run")
    cfg = embed_config(s3_images, out, s3, limit=FIRST)
    result = ray_two_nodes.run_driver(EMBED_DRIVER.format(cfg=json.dumps(cfg)), timeout=300)
    assert result["n_input"] == FIRST
    assert (result["embedded"], result["errors"]) == (FIRST - 1, 1)  # rows in = rows out + errors
    assert (result["rows_total"], result["errors_total"]) == (FIRST - 1, 1)
    assert len(result["worker_node"]) == 1
    assert result["n_actors"] == 1 and result["actor_nodes"] == result["worker_node"]  # ran on the second node
    assert_each_row_once(out, s3, FIRST)
    import lancedb

    db = storage.join(out, "lancedb")
    table = lancedb.connect(db, storage_options=storage.storage_options(db, s3.config)).open_table("twonodes")
    assert table.count_rows() == FIRST - 1


def test_second_node_lost_mid_run_then_rerun_completes_once(ray_two_nodes, s3, s3_images, tmp_path):
    """Kill the second node (raylet, workers) once some parts exist; the run dies with it. With the node back, a
    re-run embeds what is left: every row once, totals add up. (Last in this module: it restarts that node.)"""
    import time

    from ray_two_nodes import stop_process

    out = storage.join(s3.fresh(), "run")
    cfg = embed_config(s3_images, out, s3)
    cfg["output"]["write_lance"] = False  # the parts are what a lost node can corrupt; LanceDB is built from them
    code = EMBED_DRIVER.format(cfg=json.dumps(cfg))
    done_folder = storage.join(out, RunDir.EMBEDDINGS)
    t0 = time.perf_counter()

    def phase(what: str) -> None:  # shown by pytest when the test fails
        print(f"{time.perf_counter() - t0:6.1f} s  {what}")

    first = ray_two_nodes.start_driver(code, tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        while not parts.part_files(done_folder, storage=s3.config):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no part written within 240 s"
            time.sleep(0.2)
        phase("first part written")
        assert ray_two_nodes.kill_second_node() >= 2  # its raylet and at least its log monitor or a worker
        phase("second node killed")
    finally:
        stop_process(first)  # the run that lost its node ends (here: stopped, as a user would)
        if not ray_two_nodes.second_node_processes():
            ray_two_nodes.start_second_node()  # the node comes back (also when an assertion above failed)
            phase("second node back")
    done = parts.count_rows(done_folder, storage=s3.config) + parts.count_rows(
        storage.join(out, RunDir.ERRORS), storage=s3.config
    )
    assert 0 < done < N_IMAGES, f"the kill came too late to interrupt the run ({done} of {N_IMAGES} done)"

    result = ray_two_nodes.run_driver(code, timeout=300)
    phase(f"re-run done: {result}")
    assert result["skipped"] == done and result["embedded"] + result["errors"] == N_IMAGES - done
    assert (result["rows_total"], result["errors_total"]) == (N_IMAGES - len(BAD_ROWS), len(BAD_ROWS))
    assert len(result["worker_node"]) == 1 and result["actor_nodes"] == result["worker_node"]  # the new node
    assert_each_row_once(out, s3, N_IMAGES)
