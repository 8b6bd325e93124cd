"""`avgk serve --run RUN` (Ray Serve) as a user runs it, on 127.0.0.1 and a free port: several clients at
once, one sending a bad row; the answers equal SetPredictor's; SIGTERM stops it and its cluster."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from avgk.inference.predict import SetPredictor
from tests.helpers.runs import ROOT, free_port, read_split, wait_until
from tests.helpers.serving import post

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def rows(images: list[bytes]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]}}


EXPOSED: dict[str, str] = {}
"""Listeners on a non-loopback address opened while the server started and answered."""


@pytest.fixture(scope="module")
def server(predict_smoke_run, tmp_path_factory):
    from avgk.runtime import procfs
    from tests.helpers.listeners import ListenerWatch

    _, run = predict_smoke_run
    watch = ListenerWatch(session_start_ticks=procfs.started(os.getpid()), interval_s=0.2)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--run", str(run), "--port", str(port),
                                 "--max-batch-size", "16", "--batch-wait-ms", "20"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            return False

    try:
        wait_until(ready, timeout_s=240, what="avgk serve to answer /ping", interval_s=0.5)
        yield url, proc, log_path, watch
    finally:
        EXPOSED.update(watch.stop())
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_concurrent_clients_get_set_predictors_answers_and_a_bad_row_only_fails_its_request(server, predict_smoke_run):
    url, _, _, _ = server
    shards, run = predict_smoke_run
    images, _ = read_split(shards, "test")
    predictor = SetPredictor.from_run(str(run), batch_size=64)
    expected = predictor.predict(images[:60], k=2)
    answers: dict[tuple[int, int], tuple[int, dict]] = {}

    def client(c: int) -> None:
        for r in range(5):
            chunk = images[(c * 5 + r) * 3:(c * 5 + r) * 3 + 3]
            body = rows(chunk)
            if c == 3 and r == 2:  # one bad row in one request of one client
                body["dataframe_split"]["data"][1] = [base64.b64encode(b"not an image").decode()]
            answers[c, r] = post(f"{url}/invocations", {**body, "params": {"k": 2}})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (c, r), (status, answer) in answers.items():
        if (c, r) == (3, 2):
            assert status == 400 and "row 1" in answer["message"], answer
            continue
        assert status == 200, answer
        for i, prediction in enumerate(answer["predictions"]):
            got, want = json.loads(prediction["label_set"]), expected[(c * 5 + r) * 3 + i]
            assert got["labels"] == want.ids and got["names"] == want.names and got["set_size"] == want.size
            np.testing.assert_allclose(got["scores"], want.scores, atol=1e-6)


def test_k_per_request_top_k_and_an_uncalibrated_k(server, predict_smoke_run):
    url, _, _, _ = server
    shards, _ = predict_smoke_run
    images, _ = read_split(shards, "test")
    status, answer = post(f"{url}/invocations", {**rows(images[:2]), "params": {"k": 3, "top_k": True}})
    assert status == 200 and all(json.loads(p["label_set"])["set_size"] == 3 for p in answer["predictions"])
    status, answer = post(f"{url}/invocations", {**rows(images[:2]), "params": {"k": 7}})
    assert status == 400 and "k=7 was not calibrated for this run; calibrated K: 1, 2, 3" in answer["message"]
    predictor = SetPredictor.from_run(str(predict_smoke_run[1]))
    for choice in ({"rule": "coverage", "coverage": 0.99}, {"rule": "aps_softmax", "coverage": 0.9}):  # both heads
        status, answer = post(f"{url}/invocations", {**rows(images[:4]), "params": choice})
        assert status == 200 and [json.loads(p["label_set"])["labels"] for p in answer["predictions"]] == [
            s.ids for s in predictor.predict(images[:4], **choice)], choice
    status, answer = post(f"{url}/invocations", {**rows(images[:2]), "params": {"rule": "coverage", "coverage": 0.8}})
    assert status == 400 and "no set rule 'coverage' calibrated at coverage 0.8" in answer["message"]
    status, answer = post(f"{url}/invocations", {"instances": []})
    assert status == 400 and "dataframe_split or dataframe_records" in answer["message"]
    records = {"dataframe_records": [{"image": base64.b64encode(images[0]).decode()}]}  # the MLflow model's other form
    status, answer = post(f"{url}/invocations", records)
    assert status == 200 and len(answer["predictions"]) == 1


def test_every_listener_is_on_loopback(server):
    """The HTTP proxy on --host, and Ray's and Serve's own servers on the node's address: Ray 2.60 binds
    each replica's inter-deployment gRPC server on every interface unless pipelines.ray_private rebinds it."""
    *_, watch = server
    exposed = watch.stop()
    EXPOSED.update(exposed)
    assert not exposed, exposed


def test_sigterm_stops_serving(server):
    url, proc, log_path, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 143, log_path.read_text()[-3000:]
    assert "avgk serve: stopped" in log_path.read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=5)
