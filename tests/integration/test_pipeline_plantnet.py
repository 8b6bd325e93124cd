"""configs/pipelines/plantnet300k.yaml at smoke size, as its header documents: a tiny Pl@ntNet-layout release
prepared into the suite's S3 server, then the whole protocol on the local cluster (both methods tuned with
the same budget, trained, scored and pseudo-labelled by the scoring job, compared, the winner registered in
MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.plantnet import make_release
from tests.helpers.runs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]
BUCKET = "avgk-pipeline"
SPEC = ROOT / "configs" / "pipelines" / "plantnet300k.yaml"
# The documented smoke-size override (the spec's header), with this test's bucket, folder and server.
SMOKE = ["model.backbone=small_cnn", "model.pretrained=null", "model.channels_last=false", "data.resize=32",
         "data.crop=32", "data.loader_workers=0", "data.shuffle_buffer=100", "train.epochs=1", "train.milestones=[]",
         "train.batch_size=16", "train.cpus_per_worker=1", "train.use_gpu=false", "train.num_workers=1",
         "eval.ks=[1,2]", "loss.k=2", "stages.tune.with.num_samples=1",
         "stages.tune.with.sweep_overrides={scheduler.grace_period: 1}", "stages.train.matrix.seed.values=[0]",
         "stages.evaluate.matrix.seed.values=[0]", "stages.pseudolabel.matrix.seed.values=[0]"]


@pytest.fixture(scope="module")
def cluster(s3_env, local_ray):
    """The local cluster starts after the AWS_* variables are set, so its workers reach the bucket."""
    s3_env.create_bucket(BUCKET)
    return local_ray


def test_the_protocol_at_smoke_size_from_a_bucket(cluster, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines import cli

    release = tmp_path / "plantnet_300K"
    make_release(release)
    shards = f"s3://{BUCKET}/plantnet300k"
    assert cli.main(["prepare", str(ROOT / "configs" / "plantnet300k.yaml"), f"data.root={release}",
                     f"data.shards={shards}", "data.resize_shorter=40", "data.prepare_workers=1"]) == 0
    capsys.readouterr()
    # and a stage the shipped spec does not have: fine-tuning the trained two-head run (a train that
    # needs a train starts from its weights), as configs/pipelines/regimes.yaml's finetune stage does
    finetune = ("stages.finetune={verb: train, needs: [data, train], overrides: {train.epochs: 1}, "
                "matrix: {method: {two_head: {loss.name: two_head}}}}")
    # and the prediction job as a stage: the compared winner labels the bucket's test split
    predict = f"stages.predict={{verb: predict, needs: [compare], with: {{inputs: ['{shards}'], k: 2}}}}"
    args = ["pipeline", str(SPEC), *SMOKE, finetune, predict, f"data.shards={shards}",
            f"run.storage={tmp_path / 'runs'}", f"tracking.uri={mlflow_server}"]
    code, captured = cli.main(args), capsys.readouterr()
    out = captured.out
    assert code == 0, out[-4000:] + captured.err[-3000:]
    root = tmp_path / "runs" / "plantnet300k-protocol"
    records = {r["cell"]: r for r in (json.loads(p.read_text()) for p in root.glob("*/*/record.json"))}
    assert set(records) == {"data", "tune[two_head]", "tune[ce]", "train[two_head-0]", "train[ce-0]",
                            "evaluate[two_head-0]", "evaluate[ce-0]", "pseudolabel[two_head-0]", "pseudolabel[ce-0]",
                            "compare", "register", "finetune[two_head]", "predict"}, sorted(records)
    assert all(r["status"] == "finished" for r in records.values())
    # each training starts from its own method's tuned values (the same search for both)
    for method in ("two_head", "ce"):
        tuned = records[f"tune[{method}]"]["outputs"]["values"]
        run_dir = Path(records[f"train[{method}-0]"]["outputs"]["run_dir"])
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert set(tuned) == {"train.lr", "train.weight_decay"}
        assert (trained["train"]["lr"], trained["train"]["weight_decay"]) == (tuned["train.lr"], tuned["train.weight_decay"])
        assert trained["loss"]["name"] == method
        table = records[f"pseudolabel[{method}-0]"]["outputs"]["pseudo_labels"]
        assert table.endswith("pseudo_labels")
    tuned_run = records["finetune[two_head]"]["outputs"]["run_dir"]
    pretrained = yaml.safe_load((Path(tuned_run) / "config.yaml").read_text())["model"]["pretrained"]
    assert pretrained == records["train[two_head-0]"]["outputs"]["run_dir"]
    assert (Path(tuned_run) / "history.json").is_file()  # compare's best epochs and val curves read it
    labelled = records["predict"]["outputs"]
    assert labelled["run_dir"] == records["compare"]["outputs"]["winner_run"] and labelled["failed_now"] == 0
    parts = sorted(Path(labelled["out"]).glob("part-*.parquet"))
    assert parts and sum(pq.read_metadata(p).num_rows for p in parts) == labelled["labelled_now"] > 0
    # the winner is registered under the spec's name, from its training's MLflow run
    winner = records["compare"]["outputs"]["winner_run"]
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions("name='plantnet300k-avgk'")
    assert version.run_id == (Path(winner) / "mlflow_run_id.txt").read_text().strip()
    assert "register finished" in out

    # started again: every cell reused; the predict stage runs again (its inputs may have grown) and
    # reuses every part it wrote
    assert cli.main(args) == 0
    again = capsys.readouterr()
    assert "reused 12 finished cell(s)" in again.out
    assert f"{len(parts)} of {len(parts)} parts already written" in again.out + again.err
