"""Remote shards end to end against a real S3 server on 127.0.0.1 (SeaweedFS, tests/helpers/s3.py):
`avgk prepare` to s3://, 2-worker Ray training streaming from s3:// (run directory on s3:// too),
`avgk evaluate` from s3://, each with the same metrics as the same run on local shards."""

from __future__ import annotations

import hashlib
import json

import pytest

from avgk.runtime import storage
from tests.helpers.runs import SMOKE, smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BUCKET = "avgk-it"
COMMON = ("train.num_workers=2", "train.epochs=1", "tracking.enabled=false")  # 1 epoch: the read path is what differs


@pytest.fixture(scope="module")
def cluster(s3_env, local_ray):
    """A local Ray cluster started after the AWS_* variables are set: its workers find the server
    through the standard variables only, as the nodes of a real cluster do. The bucket exists
    beforehand, as a real one would (avgk never creates buckets)."""
    s3_env.create_bucket(BUCKET)
    return local_ray


def _same(actual, expected, path="metrics"):
    """Equal documents, floats bit for bit: the same seed, shard order and arithmetic on both sides."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), (path, set(actual) ^ set(expected))
        for key in expected:
            _same(actual[key], expected[key], f"{path}.{key}")
    else:
        assert actual == expected, (path, actual, expected)


def test_prepare_train_and_evaluate_from_s3_match_local_shards(cluster, smoke_shards, tmp_path, capsys):
    from avgk.data.manifest import read_manifest
    from pipelines import cli
    from pipelines.evaluate import run_evaluate
    from pipelines.train import run_training

    remote = f"s3://{BUCKET}/smoke"
    # `avgk prepare` writes the smoke data straight to the bucket, manifest last
    assert cli.main(["prepare", str(SMOKE), f"data.shards={remote}"]) == 0, capsys.readouterr().err
    assert f"shards ready in {remote}" in capsys.readouterr().out
    local_manifest, remote_manifest = read_manifest(smoke_shards), read_manifest(remote)
    assert remote_manifest.root == remote
    for split, info in local_manifest.splits.items():
        stored = remote_manifest.split(split)
        assert (stored.shards, stored.shard_samples, stored.class_counts) == (info.shards, info.shard_samples,
                                                                               info.class_counts)
        # what was uploaded is what was hashed: sizes match the manifest and the objects' bytes hash as recorded
        first = storage.read_bytes(remote_manifest.shard_urls(split)[0])
        assert len(first) == stored.shard_bytes[0]
        assert hashlib.sha256(first).hexdigest() == stored.shard_sha256[0]

    # the same 2-worker training from local shards and from the bucket (run directory in the bucket)
    run_training(smoke_config(smoke_shards, tmp_path, *COMMON, "run.name=local"))
    remote_runs = f"s3://{BUCKET}/runs"
    s3_config = smoke_config(smoke_shards, tmp_path, *COMMON, f"data.shards={remote}", f"run.storage={remote_runs}",
                             "run.name=remote")
    run_training(s3_config)
    local_metrics = json.loads((tmp_path / "runs" / "local" / "metrics.json").read_text())
    remote_run = storage.join(remote_runs, "remote")
    remote_metrics = storage.read_json(storage.join(remote_run, "metrics.json"))
    assert remote_metrics["test"]["num_samples"] == 400
    _same(remote_metrics, local_metrics)

    # `avgk evaluate` of the remote run, scoring from the bucket with Ray Data, writes the documents anew
    for name in ("metrics.json", "thresholds.json"):
        storage.delete(storage.join(remote_run, name))
    run_evaluate(s3_config, run=remote_run, num_actors=1, log=lambda _: None)
    assert storage.exists(storage.join(remote_run, "thresholds.json"))
    evaluated = storage.read_json(storage.join(remote_run, "metrics.json"))
    _same(evaluated, local_metrics)
