"""The pure parts of avgk's fault handling: which errors are outages, the retry budget, one-line messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from avgk.runtime import outbox, safe_fs
from pipelines.cli_support import one_line


def test_transient_store_errors_are_retried_and_answers_are_not():
    assert safe_fs.is_transient(OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7"))
    assert safe_fs.is_transient(OSError("When reading key 'a': AWS Error SLOW_DOWN during GetObject operation"))
    assert not safe_fs.is_transient(OSError("AWS Error ACCESS_DENIED during HeadObject operation"))
    assert not safe_fs.is_transient(FileNotFoundError("Path does not exist 'bucket/key'"))
    assert not safe_fs.is_transient(ValueError("timed out"))  # not an I/O error


def test_retries_stop_at_the_budget_counted_from_the_first_failure(monkeypatch):
    monkeypatch.setenv(safe_fs.BUDGET_ENV, "10")
    monkeypatch.setenv(safe_fs.ANSWERED_ENV, "1")  # the store answered this job before
    slept: list[float] = []
    calls = []

    def failing() -> None:
        calls.append(1)
        raise OSError("Could not connect to server\nsecond line")

    with pytest.raises(safe_fs.OutageError, match=r"^s3://b/k: the object store did not answer for 8 s "
                                                      r"\(AVGK_OBJECT_STORE_RETRY_S=10 s, run.object_store_retry_s\): "
                                                      r"Could not connect to server second line$"):
        safe_fs.with_retries("s3://b/k", failing, sleep=slept.append, clock=lambda: 1000.0 + sum(slept))
    assert slept == [0.5, 1.0, 2.0, 4.0]  # doubling; the next wait (8 s) would pass the 10 s budget
    assert len(calls) == 5


def test_a_call_that_succeeds_after_failures_returns_its_value(monkeypatch):
    monkeypatch.setenv(safe_fs.ANSWERED_ENV, "1")
    answers = iter([OSError("Connection refused"), OSError("Timeout"), "ok"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert safe_fs.with_retries("s3://b/k", flaky, sleep=lambda s: None) == "ok"


def test_a_store_that_never_answered_is_a_setup_error_told_at_once(monkeypatch):
    """A wrong endpoint, or a dry run of a spec whose bucket is unreachable: no wait of the budget. The first
    answer makes the job patient, its later processes included (they inherit the variable)."""
    monkeypatch.delenv(safe_fs.ANSWERED_ENV, raising=False)
    slept: list[float] = []

    def refused() -> None:
        raise OSError("Could not connect to server")

    with pytest.raises(OSError, match="Could not connect") as raised:
        safe_fs.with_retries("s3://b/k", refused, sleep=slept.append)
    assert not isinstance(raised.value, safe_fs.OutageError) and slept == []
    assert safe_fs.with_retries("s3://b/k", lambda: "ok") == "ok"
    assert safe_fs.answered()


def test_tracking_outages_are_told_from_rejections():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert outbox.is_outage(requests.exceptions.ConnectionError("refused"))
    assert outbox.is_outage(MlflowException("API request to http://x/api/2.0/mlflow/runs/log-batch failed with "
                                            "exception HTTPConnectionPool: Max retries exceeded"))
    assert outbox.is_outage(MlflowException("upstream", error_code=TEMPORARILY_UNAVAILABLE))  # a 503
    assert not outbox.is_outage(MlflowException("Invalid parameter name", error_code=INVALID_PARAMETER_VALUE))
    assert not outbox.is_outage(ValueError("bad"))
    # MLflow wraps any exception, and a proxy's non-JSON error pages, in "API request to ... failed with ...":
    assert not outbox.is_outage(MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with "
                                                "error code 413 != 200. Response body: 'Request Entity Too Large'"))
    assert outbox.is_outage(MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with "
                                            "error code 502 != 200. Response body: 'Bad Gateway'"))
    assert not outbox.is_outage(MlflowException("API request to http://x failed with exception ValueError('bad json')"))
    response = requests.Response()
    response.status_code = 503
    assert outbox.is_outage(requests.exceptions.HTTPError("503 Server Error", response=response))
    response.status_code = 403
    assert not outbox.is_outage(requests.exceptions.HTTPError("403 Forbidden", response=response))


def test_a_dataloader_workers_error_is_told_by_its_own_message():
    from avgk.data.decoding import DataSetupError

    wrapped = DataSetupError("Caught DataSetupError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\navgk.data.decoding.DataSetupError: "
                             "s3://b/k: the object store did not answer for 8 s\n\n")
    assert one_line(wrapped) == "s3://b/k: the object store did not answer for 8 s"
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(ValueError("")) == "ValueError"


def test_a_full_disk_keeps_the_previous_file_and_names_it(tmp_path):
    """ENOSPC injected at the write: the temporary file is /dev/full."""
    import os

    from avgk.runtime import safe_fs, storage

    target = tmp_path / "metrics.json"
    storage.write_bytes(str(target), b"previous")
    tmp = Path(f"{target}.tmp-{os.getpid()}")
    tmp.symlink_to("/dev/full")
    with pytest.raises(safe_fs.DiskFullError, match=rf"^no space left on the device of {target}: what was written "
                                                    r"before is kept"):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"previous" and not tmp.exists() and not tmp.is_symlink()


def test_writes_through_the_atomic_local_filesystem_never_leave_a_truncated_file(tmp_path):
    from avgk.runtime import safe_fs
    from tests.helpers.small_disk import small_disk

    with small_disk(tmp_path / "disk", size="256k") as disk:
        fs = safe_fs.atomic_local()
        with fs.open_output_stream(str(disk / "index.json")) as f:
            f.write(b"{\"checkpoints\": 1}")
        with pytest.raises(OSError) as raised, fs.open_output_stream(str(disk / "index.json")) as f:
            f.write(b"x" * (512 << 10))
        assert safe_fs.is_disk_full(raised.value)
        assert (disk / "index.json").read_bytes() == b"{\"checkpoints\": 1}"
        assert sorted(p.name for p in disk.iterdir()) == ["index.json"]


def test_a_record_naming_anything_but_avgks_own_functions_is_kept_aside_not_called(tmp_path, capsys):
    import json

    folder = tmp_path / "run" / outbox.OUTBOX_DIR
    folder.mkdir(parents=True)
    marker = tmp_path / "called"
    record = {"call": "os:system", "uri": "http://127.0.0.1:1", "run_id": "r",
              "kwargs": {"command": f"touch {marker}"}}
    (folder / "00000000000000000001-1-000000.json").write_text(json.dumps(record))
    assert outbox.deliver(folder) == (0, 0)
    assert not marker.exists()
    assert [p.name for p in folder.glob("*.rejected")] == ["00000000000000000001-1-000000.rejected"]
    assert "was refused and is kept aside" in capsys.readouterr().out


def test_rays_busy_machine_warning_and_its_traceback_leave_the_console_and_nothing_else_does():
    from pipelines.ray_env import NoiseFilter

    keep = NoiseFilter()
    lines = ["epoch 1/3 step 10/20 loss 3.1",
             "Failed to send resource request for train-f82e. If this only happens transiently during network "
             "partition or CPU being overloaded, it's safe to ignore this",
             "Traceback (most recent call last):",
             '  File "autoscaling_coordinator_client.py", line 58, in send_resource_request',
             "    ray.get(",
             "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
             "epoch 1/3 train_loss 3.0",
             "Traceback (most recent call last):",
             "ValueError: a real error"]
    assert [line for line in lines if keep(line)] == ["epoch 1/3 step 10/20 loss 3.1", "epoch 1/3 train_loss 3.0",
                                                      "Traceback (most recent call last):", "ValueError: a real error"]
