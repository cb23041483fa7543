"""A real two-node Ray cluster on 127.0.0.1: work forced onto the second node writes to S3 (moto) and
the driver sees all of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    emb, db = storage.join(base, parts.EMBEDDINGS), storage.join(base, "lancedb")
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
