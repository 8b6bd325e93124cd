"""The run's MLflow pyfunc model: logged into a run, registered, loaded back, same sets as SetPredictor."""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from avgk.inference.predict import SetPredictor
from avgk.inference.serving import log_pyfunc_model, using_tracking_uri
from tests.helpers.runs import read_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(predict_smoke_run):
    return predict_smoke_run


def test_pyfunc_round_trip_through_a_registry(trained, tmp_path, monkeypatch):
    shards, run_dir = trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)  # no tracking URI set in this process, as in a fresh one
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("pyfunc", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id

    model_uri = log_pyfunc_model(
        uri, run_id, str(run_dir), checkpoint=str(run_dir / "best" / "checkpoint.pt"), register_as="avgk-smoke"
    )
    assert client.get_run(run_id).info.status == "RUNNING"  # the run's owner ends it
    assert mlflow.active_run() is None
    # Logging leaves no tracking URI behind: later runs in this process would otherwise go to a
    # store in the working directory (MLFLOW_TRACKING_URI=sqlite:///mlflow.db).
    assert "MLFLOW_TRACKING_URI" not in os.environ and not mlflow.tracking.is_tracking_uri_set()
    versions = client.search_model_versions("name='avgk-smoke'")
    assert [int(v.version) for v in versions] == [1]

    images, _ = read_split(shards, "test")
    images = images[:40]
    predictor = SetPredictor.from_run(str(run_dir), "best")
    with using_tracking_uri(uri):
        model = mlflow.pyfunc.load_model("models:/avgk-smoke/1")
        assert mlflow.pyfunc.load_model(model_uri).metadata.signature == model.metadata.signature
    assert "MLFLOW_TRACKING_URI" not in os.environ
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["image"] and signature.params.to_dict()[0]["default"] == 2.0

    frame = pd.DataFrame({"image": images})
    for params, k, top_k in [({"k": 2.0}, 2, False), ({"k": 3.0}, 3, False), ({"k": 3, "top_k": True}, 3, True)]:
        out = model.predict(frame, params=params)
        served = [json.loads(x) for x in out["label_set"]]
        expected = [s.to_dict() for s in predictor.predict(images, k=k, top_k=top_k)]
        assert [s["labels"] for s in served] == [s["labels"] for s in expected], params
        assert [s["names"] for s in served] == [s["names"] for s in expected]
        for a, b in zip(served, expected, strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert all(len(json.loads(x)["labels"]) == 3 for x in model.predict(frame, params={"k": 3, "top_k": True})["label_set"])
    with pytest.raises(Exception, match=r"k=1.5 was not calibrated"):
        model.predict(frame, params={"k": 1.5})
