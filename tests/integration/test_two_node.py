"""Ray Train on a simulated 2-node cluster (ray.cluster_utils.Cluster), all on loopback."""

from __future__ import annotations

import pytest

from tests.helpers.runs import free_port, smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_node_cluster_one_worker_per_node(smoke_shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipelines.train import run_training

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
    })
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"avgk_node": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
        config = smoke_config(smoke_shards, tmp_path, "train.num_workers=2", "run.name=twonode",
                              "tracking.enabled=false", "train.epochs=1", "train.extra_resources={avgk_node: 1}")
        run_training(config)
        workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        assert len({w.node_id for w in workers}) == 2, [(w.pid, w.node_id) for w in workers]
        assert (tmp_path / "runs" / "twonode" / "metrics.json").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()
