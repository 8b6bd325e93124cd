"""The logged pyfunc carries avgk as code: it loads, and `mlflow models serve` answers, where avgk is not installed."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from avgk.inference.predict import SetPredictor
from avgk.inference.serving import log_pyfunc_model, using_tracking_uri
from tests.helpers.runs import free_port, read_split, wait_for_http
from tests.helpers.serving import env_without_avgk, post

pytestmark = [pytest.mark.slow, pytest.mark.mlflow]

MODEL_NAME = "avgk-serve"
NUM_IMAGES = 8
SERVER_START_S = 180  # measured 15-30 s on 2 shared cores; the deadline only bounds a hang

LOAD_SCRIPT = """
import base64, json, sys
try:
    import avgk
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"avgk is importable before the model is loaded, from {avgk.__file__}: the test hides nothing")
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import avgk
images = [base64.b64decode(x) for x in json.load(open(sys.argv[2]))]
out = model.predict(pd.DataFrame({"image": images}), params={"k": 2.0})
print(json.dumps({"avgk": avgk.__file__, "pipelines": "pipelines" in sys.modules, "sets": list(out["label_set"])}))
"""


@pytest.fixture(scope="module")
def logged(predict_smoke_run, tmp_path_factory):
    """(tracking URI, model URI, run directory, test images): the smoke run's model, registered as avgk-serve v1."""
    shards, run_dir = predict_smoke_run
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("serving", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    model_uri = log_pyfunc_model(
        uri, run_id, str(run_dir), checkpoint=str(run_dir / "best" / "checkpoint.pt"), register_as=MODEL_NAME
    )
    images, _ = read_split(shards, "test")
    return uri, model_uri, run_dir, images[:NUM_IMAGES]


def expected_sets(run_dir: Path, images: list[bytes], *, k: float, top_k: bool = False) -> list[dict]:
    return [s.to_dict() for s in SetPredictor.from_run(str(run_dir), "best").predict(images, k=k, top_k=top_k)]


def assert_same_sets(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected), f"{len(served)} label sets for {len(expected)} images"
    for row, (a, b) in enumerate(zip(served, expected, strict=True)):
        assert (a["labels"], a["names"], a["set_size"]) == (b["labels"], b["names"], b["set_size"]), f"row {row}"
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6), f"row {row}"


def test_model_brings_avgk_as_code_and_loads_without_it(logged, tmp_path, monkeypatch):
    uri, model_uri, run_dir, images = logged
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with using_tracking_uri(uri):  # models:/ URIs resolve through the global tracking URI
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    assert sorted(p.name for p in (local / "code").iterdir()) == ["avgk"], "the model's code must be avgk alone"
    requirements = (local / "requirements.txt").read_text().split()
    assert not any(r.startswith(("avgk", "-e")) for r in requirements), f"avgk travels as code, got {requirements}"

    (tmp_path / "images.json").write_text(json.dumps([base64.b64encode(im).decode() for im in images]))
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(local), str(tmp_path / "images.json")],
        cwd=tmp_path, env=env_without_avgk(tmp_path / "site"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"loading the model without avgk installed failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["avgk"]).resolve() == (local / "code" / "avgk" / "__init__.py").resolve(), out["avgk"]
    assert out["pipelines"] is False, "loading the model imported pipelines"
    assert_same_sets([json.loads(s) for s in out["sets"]], expected_sets(run_dir, images, k=2))


def image_request(images: list[bytes], **params) -> dict:
    """The JSON body `mlflow models serve` takes: a binary column is base64 in "dataframe_split"."""
    data = [[base64.b64encode(im).decode("ascii")] for im in images]
    return {"dataframe_split": {"columns": ["image"], "data": data}, "params": params}


def test_mlflow_models_serve_answers_label_sets(logged, tmp_path):
    uri, _, run_dir, images = logged
    port = free_port()
    env = {**env_without_avgk(tmp_path / "site"), "MLFLOW_TRACKING_URI": uri}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}/1",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_for_http(proc, f"{base}/ping", log_path=log_path, timeout_s=SERVER_START_S,
                                name="mlflow models serve")
        print(f"mlflow models serve answered /ping after {seconds:.1f} s")

        for params, k, top_k in [({"k": 2}, 2, False), ({"k": 3, "top_k": True}, 3, True)]:
            status, answer = post(f"{base}/invocations", image_request(images, **params))
            assert status == 200, f"{params}: HTTP {status}: {answer}"
            served = [json.loads(row["label_set"]) for row in answer["predictions"]]
            assert_same_sets(served, expected_sets(run_dir, images, k=k, top_k=top_k))

        status, answer = post(f"{base}/invocations", image_request([images[0], b"not an image"], k=2))
        assert status == 400, f"a non-image row: HTTP {status}: {answer}"
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
        assert "column 'image' must hold encoded images" in answer["message"], answer["message"]
        rule = "1 of 2 rows do not: row 1: UnidentifiedImageError (not an image format PIL reads)"
        assert rule in answer["message"], answer["message"]
        assert "stack_trace" not in answer and "Traceback" not in answer["message"], answer

        status, answer = post(f"{base}/invocations", image_request(images[:1], k=1.5))
        assert status == 400 and "k=1.5 was not calibrated for this run" in answer["message"], (status, answer)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the mlflow CLI and uvicorn), SIGKILL after 30 s."""
    for sig, wait_s in [(signal.SIGTERM, 30), (signal.SIGKILL, 30)]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
