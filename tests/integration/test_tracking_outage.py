"""A tracking server that goes away never stops the work: records wait in the run's outbox, in
order, and arrive when it answers again (avgk.runtime.outbox). Each test has its own `mlflow server`,
stopped (connection refused) or frozen with SIGSTOP (a hung connection)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avgk.records import tracking
from avgk.runtime import guardian, outbox
from tests.helpers.mlflow_server import MlflowServer
from tests.helpers.runs import ROOT

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture
def server(_module_server):
    """This module's own server (not the suite's), answering when each test starts: a test that stopped or
    froze it leaves it running again."""
    yield _module_server
    if _module_server.proc is None:
        _module_server.start()
    else:
        _module_server.thaw()


@pytest.fixture(autouse=True)
def _fresh_outbox_state(monkeypatch):
    """Each test starts with a server this process believes answers."""
    monkeypatch.setattr(outbox, "_down_since", {})
    monkeypatch.setattr(outbox, "_owned", {})


def _new_run(uri: str, run_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id: str = client.create_run(client.create_experiment(f"outage-{time.time_ns()}")).info.run_id
    outbox.attach(run_id, str(run_dir))
    return run_id


def _timed(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def test_records_wait_while_the_server_is_stopped_and_arrive_in_order(server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_id = _new_run(server.uri, run_dir)
    tracking.log_metrics(server.uri, run_id, {"loss": 3.0}, step=1)
    server.stop()
    artifact = tmp_path / "tmp" / "notes.txt"
    artifact.parent.mkdir()
    artifact.write_text("written while the server was away")
    first = _timed(lambda: tracking.log_metrics(server.uri, run_id, {"loss": 2.0}, step=2))
    rest = _timed(lambda: (tracking.log_metrics(server.uri, run_id, {"loss": 1.0}, step=3),
                           tracking.log_params(server.uri, run_id, {"lr": 0.1}),
                           tracking.set_tags(server.uri, run_id, {"avgk.note": "queued"}),
                           tracking.log_artifact(server.uri, run_id, artifact),
                           tracking.end_run(server.uri, run_id, status="FINISHED")))
    assert first < 15 and rest < 1, (first, rest)  # one record finds the server gone; the others queue at once
    artifact.unlink()  # a temporary file: the outbox kept its own copy
    folder = run_dir / outbox.OUTBOX_DIR
    assert len(outbox.pending(folder)) == 6
    said = capsys.readouterr().out
    assert said.count("does not answer") == 1 and str(folder) in said

    server.start()
    assert outbox.flush(folder, timeout_s=30) == 0
    assert "answers again" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert history[1].timestamp < history[2].timestamp  # the time each was measured, not delivered
    assert run.data.params == {"lr": "0.1"} and run.data.tags["avgk.note"] == "queued"
    assert run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id)] == ["notes.txt"]
    assert not folder.exists()  # delivered: nothing left in the run directory


def test_a_frozen_server_costs_one_record_seconds_then_nothing(server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_id = _new_run(server.uri, run_dir)
    server.freeze()
    try:
        first = _timed(lambda: tracking.log_metrics(server.uri, run_id, {"loss": 2.0}, step=1))
        rest = _timed(lambda: [tracking.log_metrics(server.uri, run_id, {"loss": 1.0}, step=s) for s in (2, 3, 4)])
        assert first < 20 and rest < 1, (first, rest)
        assert len(outbox.pending(run_dir / outbox.OUTBOX_DIR)) == 4
    finally:
        server.thaw()
    assert outbox.flush(run_dir / outbox.OUTBOX_DIR, timeout_s=30) == 0
    assert [m.step for m in MlflowClient(tracking_uri=server.uri).get_metric_history(run_id, "loss")] == [1, 2, 3, 4]


def test_a_record_the_server_refuses_is_raised_not_queued(server, tmp_path):
    from mlflow.exceptions import MlflowException

    run_dir = tmp_path / "run"
    run_id = _new_run(server.uri, run_dir)
    with pytest.raises(MlflowException):
        tracking.log_params(server.uri, run_id, {"bad key?!": 1})  # not a valid param name
    assert not (run_dir / outbox.OUTBOX_DIR).exists()


def test_the_watcher_queues_a_killed_commands_end_when_the_server_is_away(server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_id = _new_run(server.uri, run_dir)
    server.stop()
    guardian.end_runs_killed({run_id: server.uri}, {run_id: str(run_dir / outbox.OUTBOX_DIR)})
    assert len(outbox.pending(run_dir / outbox.OUTBOX_DIR)) == 1
    server.start()
    assert outbox.deliver_all(run_dir) == (1, 0)
    assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "KILLED"


def _avgk(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(proc: subprocess.Popen, marker: str, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError(f"the command ended before {marker!r}:\n{''.join(lines[-40:])}")


def test_training_outlives_a_stopped_server_and_sync_delivers_the_rest(server, smoke_shards, tmp_path):
    """The server stops after epoch 1 of 3 and stays down: the training finishes, says what waits and
    how to send it; `avgk sync` does once the server is back, and the MLflow run is complete."""
    from mlflow.tracking import MlflowClient

    proc = _avgk("train", str(ROOT / "configs" / "smoke.yaml"), f"data.shards={smoke_shards}",
                 f"run.storage={tmp_path / 'runs'}", f"tracking.uri={server.uri}", "train.epochs=3",
                 "run.name=outage", cwd=tmp_path)
    lines: list[str] = []
    try:
        _read_until(proc, "epoch 1/3 train_loss", lines)
        server.stop()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    run_dir = tmp_path / "runs" / "outage"
    assert (run_dir / "metrics.json").is_file()
    assert out.count("does not answer (") == 1, out[-3000:]
    assert f"avgk sync {run_dir}" in out
    assert "Traceback" not in out

    server.start()
    sync = _avgk("sync", str(tmp_path / "runs"), cwd=tmp_path)
    said, _ = sync.communicate(timeout=300)
    assert sync.returncode == 0 and "record(s) delivered" in said, said
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    assert any(key.startswith("test_avg_k_accuracy") for key in run.data.metrics)
    assert not (run_dir / outbox.OUTBOX_DIR).exists()


def test_sigterm_ends_a_training_within_seconds_while_the_server_hangs(server, smoke_shards, tmp_path):
    """The server freezes (SIGSTOP) during epoch 1; SIGTERM ends the command within seconds, KILLED queued."""
    from mlflow.tracking import MlflowClient

    proc = _avgk("train", str(ROOT / "configs" / "smoke.yaml"), f"data.shards={smoke_shards}",
                 f"run.storage={tmp_path / 'runs'}", f"tracking.uri={server.uri}", "train.epochs=20",
                 "run.name=frozen", cwd=tmp_path)
    lines: list[str] = []
    try:
        _read_until(proc, "epoch 1/20 train_loss", lines)
        server.freeze()
        _read_until(proc, "epoch 2/20 train_loss", lines)  # training goes on past the hung record
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        server.thaw()
    out = "".join(lines) + out
    assert proc.returncode == 143, out[-3000:]
    assert took < 30, (took, out[-2000:])
    run_dir = tmp_path / "runs" / "frozen"
    assert outbox.pending(run_dir / outbox.OUTBOX_DIR), out[-2000:]
    assert outbox.deliver_all(run_dir, timeout_s=30)[1] == 0
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "KILLED"
