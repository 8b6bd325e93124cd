"""An object store that goes away for a while (stopped: connection refused; frozen with SIGSTOP: a hung
connection) costs time within run.object_store_retry_s, not the work; longer, one line naming the URI
and the time waited (avgk.runtime.safe_fs). Each test has its own S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from avgk.runtime import safe_fs, storage
from tests.helpers.runs import ROOT
from tests.helpers.s3 import S3Server, weed_binary

pytestmark = [pytest.mark.slow, pytest.mark.skipif(weed_binary() is None, reason="needs the dev extra's SeaweedFS")]

PAYLOAD = os.urandom(3 << 20)


@pytest.fixture(scope="module")
def _module_store(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def store(_module_store, monkeypatch, request):
    """This module's own S3 server (not the suite's), answering when each test starts (a test that stopped or
    froze it leaves it running again), and a fresh object in a bucket of the test's own."""
    server = _module_store
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(safe_fs.BUDGET_ENV, "60")
    monkeypatch.delenv(safe_fs.ANSWERED_ENV, raising=False)  # set by the first answer below; gone after the test
    bucket = f"outage-{len(request.node.name)}-{abs(hash(request.node.name)) % 10**6}"
    uri = server.create_bucket(bucket) + "/blob.bin"
    storage.write_bytes(uri, PAYLOAD)
    yield server, uri
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    else:
        server.thaw()


def _later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def test_a_read_waits_out_a_stopped_store(store):
    server, uri = store
    server.stop()
    back = _later(3.0, server.start)
    start = time.monotonic()
    assert storage.read_bytes(uri) == PAYLOAD
    back.join()
    assert time.monotonic() - start >= 3.0


def test_a_stream_frozen_mid_shard_resumes_at_its_offset(store):
    server, uri = store
    stream = storage.open_input_stream(uri, buffer_size=256 << 10)
    head = stream.read(1 << 20)
    server.freeze()
    back = _later(4.0, server.thaw)
    try:
        rest = stream.read()
    finally:
        back.join()
    assert head + rest == PAYLOAD


def test_a_write_waits_out_a_frozen_store(store):
    server, uri = store
    server.freeze()
    back = _later(3.0, server.thaw)
    try:
        storage.write_bytes(uri.replace("blob.bin", "new.bin"), b"written through a blip")
    finally:
        back.join()
    assert storage.read_bytes(uri.replace("blob.bin", "new.bin")) == b"written through a blip"


def test_an_outage_longer_than_the_budget_is_one_line_naming_the_uri_and_the_wait(store, monkeypatch):
    server, uri = store
    monkeypatch.setenv(safe_fs.BUDGET_ENV, "4")
    server.stop()
    start = time.monotonic()
    with pytest.raises(safe_fs.OutageError, match=r"outage-[0-9-]+/blob.bin: the object store did not answer for \d+ s "
                                                      r"\(AVGK_OBJECT_STORE_RETRY_S=4 s, run.object_store_retry_s\)"):
        storage.read_bytes(uri)
    assert time.monotonic() - start < 30


def test_an_answer_that_says_no_is_not_retried(store):
    _, uri = store
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri.replace("blob.bin", "missing.bin"))
    assert time.monotonic() - start < 5


def _train(args: list[str], env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(ROOT / "configs" / "smoke.yaml"), *args],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run_until(proc: subprocess.Popen, marker: str, then) -> str:
    """The command's output; `then()` once a line holds `marker`."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            then()
    proc.wait(timeout=600)
    return "".join(lines)


@pytest.mark.ray
def test_training_rides_out_a_blip_and_resumes_after_a_longer_outage(store, smoke_shards, tmp_path):
    """Shards and checkpoints in the bucket, no restart allowed (train.max_failures=0): frozen 10 s from the
    end of epoch 1, the run finishes. Stopped once a checkpoint is registered, with a 5 s budget: one line
    naming the URI and the wait; the same command then resumes from that checkpoint once the store is back."""
    server, uri = store
    bucket = uri.rsplit("/", 1)[0]
    for path in sorted(smoke_shards.rglob("*")):
        if path.is_file():
            storage.upload_file(path, f"{bucket}/smoke/{path.relative_to(smoke_shards)}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [f"data.shards={bucket}/smoke", f"run.storage={bucket}/runs", "train.epochs=2", "train.max_failures=0",
            "tracking.enabled=false"]

    blip = _train([*args, "run.name=blip"], env, tmp_path)
    out = _run_until(blip, "epoch 1/2 train_loss", lambda: (server.freeze(), _later(10.0, server.thaw)))
    assert blip.returncode == 0, out[-3000:]
    assert storage.exists(f"{bucket}/runs/blip/metrics.json")

    snapshot = f"{bucket}/runs/long/checkpoint_manager_snapshot.json"

    def stop_once_a_checkpoint_is_registered() -> None:
        deadline = time.monotonic() + 60
        while not (storage.exists(snapshot) and storage.file_info(snapshot).size) and time.monotonic() < deadline:
            time.sleep(0.1)  # Ray Train's controller registers a reported checkpoint when it next polls
        server.stop()

    long_args = [*args[:2], "train.epochs=4", *args[3:], "run.name=long", "run.object_store_retry_s=5"]
    long = _train(long_args, env, tmp_path)
    out = _run_until(long, "epoch 1/4 train_loss", stop_once_a_checkpoint_is_registered)
    assert long.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("avgk: error: ") and "the object store did not answer for" in last, out[-3000:]
    assert "run.object_store_retry_s" in last
    server.start()
    again = _train(long_args, env, tmp_path)
    out = _run_until(again, "never", lambda: None)
    assert again.returncode == 0, out[-3000:]
    assert "resuming long" in out and "epoch 4/4 train_loss" in out and "epoch 1/4 train_loss" not in out
