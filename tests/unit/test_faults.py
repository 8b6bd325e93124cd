"""The pure parts of avgk's fault handling: which errors are outages, the retry budget, one-line messages."""

from __future__ import annotations

import pytest

from avgk.runtime import outbox, retrying_fs
from pipelines.cli_support import one_line


def test_transient_store_errors_are_retried_and_answers_are_not():
    assert retrying_fs.is_transient(OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7"))
    assert retrying_fs.is_transient(OSError("When reading key 'a': AWS Error SLOW_DOWN during GetObject operation"))
    assert not retrying_fs.is_transient(OSError("AWS Error ACCESS_DENIED during HeadObject operation"))
    assert not retrying_fs.is_transient(FileNotFoundError("Path does not exist 'bucket/key'"))
    assert not retrying_fs.is_transient(ValueError("timed out"))  # not an I/O error


def test_retries_stop_at_the_budget_counted_from_the_first_failure(monkeypatch):
    monkeypatch.setenv(retrying_fs.BUDGET_ENV, "10")
    slept: list[float] = []
    calls = []

    def failing() -> None:
        calls.append(1)
        raise OSError("Could not connect to server\nsecond line")

    with pytest.raises(retrying_fs.OutageError, match=r"^s3://b/k: the object store did not answer for 8 s "
                                                      r"\(AVGK_OBJECT_STORE_RETRY_S=10 s, run.object_store_retry_s\): "
                                                      r"Could not connect to server second line$"):
        retrying_fs.with_retries("s3://b/k", failing, sleep=slept.append, clock=lambda: 1000.0 + sum(slept))
    assert slept == [0.5, 1.0, 2.0, 4.0]  # doubling; the next wait (8 s) would pass the 10 s budget
    assert len(calls) == 5


def test_a_call_that_succeeds_after_failures_returns_its_value(monkeypatch):
    answers = iter([OSError("Connection refused"), OSError("Timeout"), "ok"])

    def flaky() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retrying_fs.with_retries("s3://b/k", flaky, sleep=lambda s: None) == "ok"


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


def test_a_dataloader_workers_error_is_told_by_its_own_message():
    from avgk.data.decoding import DataSetupError

    wrapped = DataSetupError("Caught DataSetupError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\navgk.data.decoding.DataSetupError: "
                             "s3://b/k: the object store did not answer for 8 s\n\n")
    assert one_line(wrapped) == "s3://b/k: the object store did not answer for 8 s"
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(ValueError("")) == "ValueError"
