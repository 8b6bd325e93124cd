"""MLflow bookkeeping through an explicit client and run id (no global active run, so no duplicates).

The driver creates the run (or finds the one a resumed run directory already names), the
rank-0 worker logs into it by id, and the driver ends it with the final status. Every record after
the run's creation goes through avgk.runtime.outbox: a tracking server that does not answer delays
the records, never the work.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avgk.config import Config
from avgk.runtime import guardian, locks, outbox, storage

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RUN_ID_FILE = "mlflow_run_id.txt"
# MLflow rejects param values longer than this.
_MAX_PARAM_LEN = 6000


def tracking_uri(config: Config) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a sqlite store beside the runs."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    storage_dir = config.run.storage
    if "://" in storage_dir:
        raise ValueError(
            f"run.storage={storage_dir!r} is remote: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server"
        )
    return f"sqlite:///{Path(storage_dir).resolve() / 'mlflow.db'}"


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    if outbox.is_server(uri):
        outbox.configure_client()  # seconds, not MLflow's minutes of retries, before a hung server is told
    if uri.startswith("sqlite:///") and uri not in _opened_stores:
        # Made when first opened, not when named: a failed check writes nothing. Commands starting at once
        # would each create and migrate its tables (the client does when it is built): one does, under a
        # lock, the others then find them.
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.waiting(f"tracking store {path}", what=f"creates the MLflow store {path}"):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        _opened_stores.add(uri)
        return client
    return MlflowClient(tracking_uri=uri)


_opened_stores: set[str] = set()


def start_run(config: Config, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """The MLflow run of this run directory: reopened if a resumed run already has one, else created."""
    from mlflow.entities import RunStatus

    uri = tracking_uri(config)
    client = _client(uri)
    id_file = storage.join(storage.absolute(config.run_dir), RUN_ID_FILE)
    if storage.exists(id_file):
        run_id = storage.read_bytes(id_file).decode().strip()
        outbox.attach(run_id, storage.absolute(config.run_dir))
        folder = outbox.folder_of(run_id)
        if outbox.pending(folder):  # an earlier command's records go first, its end included
            left = outbox.flush(folder, timeout_s=10.0)
            if left:
                raise ValueError(f"{left} tracking record(s) of an earlier command on {config.run_dir} wait in {folder} "
                                 f"and could not be delivered to {uri}: run `avgk sync {config.run_dir}`, then this command")
        try:
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        except Exception as err:
            if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            # the store was wiped or moved: a fresh run
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
    all_tags = {"avgk.run_dir": storage.absolute(config.run_dir), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=config.run.name, tags=all_tags)
    new_run_id: str = run.info.run_id
    outbox.attach(new_run_id, storage.absolute(config.run_dir))
    log_params(uri, new_run_id, config.flat())
    storage.write_bytes(id_file, new_run_id.encode())
    return new_run_id


def run_params(uri: str, run_id: str) -> dict[str, str]:
    """The params a run already holds."""
    params: dict[str, str] = _client(uri).get_run(run_id).data.params
    return params


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    outbox.send(_log_params_now, uri, run_id, {"params": {k: str(v)[:_MAX_PARAM_LEN] for k, v in params.items()}})


def _log_params_now(uri: str, run_id: str, *, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    client = _client(uri)
    for start in range(0, len(items), 100):  # MLflow caps params per batch at 100
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
    import time

    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    # The time of the measurement, not of its delivery: a queued record keeps it.
    outbox.send(_log_metrics_now, uri, run_id, {"metrics": finite, "step": step, "timestamp": int(time.time() * 1000)})


def _log_metrics_now(uri: str, run_id: str, *, metrics: Mapping[str, float], step: int, timestamp: int) -> None:
    from mlflow.entities import Metric

    items = [Metric(k, v, timestamp, step) for k, v in sorted(metrics.items())]
    client = _client(uri)
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    outbox.send(_log_artifacts_now, uri, run_id, {"local_dir": str(local_dir), "artifact_path": artifact_path},
                files=("local_dir",))


def _log_artifacts_now(uri: str, run_id: str, *, local_dir: str, artifact_path: str | None) -> None:
    _client(uri).log_artifacts(run_id, local_dir, artifact_path)


def log_artifact(uri: str, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    outbox.send(_log_artifact_now, uri, run_id, {"local_path": str(local_path), "artifact_path": artifact_path},
                files=("local_path",))


def _log_artifact_now(uri: str, run_id: str, *, local_path: str, artifact_path: str | None) -> None:
    _client(uri).log_artifact(run_id, local_path, artifact_path)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    outbox.send(_set_tags_now, uri, run_id, {"tags": {k: str(v) for k, v in tags.items()}})


def _set_tags_now(uri: str, run_id: str, *, tags: Mapping[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def end_run(uri: str, run_id: str, *, status: str = "FINISHED") -> None:
    if uri.startswith("sqlite:///"):
        _client(uri)  # the store's folder
    outbox.send(outbox.set_terminated, uri, run_id, {"status": status})


@dataclass
class Outcome:
    """The status a run ends with when its block completes; the block may lower it (e.g. FAILED cells)."""

    status: str = "FINISHED"


@contextlib.contextmanager
def lifecycle(uri: str | None, run_id: str | None) -> Iterator[Outcome]:
    """Ends the MLflow run with the status its block earned: FINISHED (or what the block set),
    KILLED on Ctrl-C or SIGTERM (the CLI turns SIGTERM into a KeyboardInterrupt), FAILED on any other
    error. Without a run id (tracking off) it only runs the block."""
    outcome = Outcome()
    if not run_id:
        yield outcome
        return
    assert uri is not None  # a run id comes with the URI of its tracking store
    # a command killed outright (kill -9) cannot end the run: its watcher will (or queue that in the outbox)
    guardian.run_started(uri, run_id, outbox=str(outbox.folder_of(run_id)))
    with outbox.delivering(uri, run_id) as delivery:
        try:
            yield outcome
        except BaseException as err:
            interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
            delivery.hurry = interrupted  # Ctrl-C or SIGTERM: what waits stays for later, the command ends now
            end_run(uri, run_id, status="KILLED" if interrupted else "FAILED")
            guardian.run_ended(run_id)
            raise
        end_run(uri, run_id, status=outcome.status)
        guardian.run_ended(run_id)


TEST_METRICS = ("avg_k_accuracy", "macro_avg_k_accuracy", "avg_set_size", "top_k_accuracy",
                "macro_top_k_accuracy", "oracle_avg_k_accuracy", "gap_to_oracle")
RESULT_FILES = ("metrics.json", "thresholds.json", "per_class.parquet", "config.yaml")


def log_evaluation(uri: str, run_id: str, *, metrics: Mapping[str, Any], run_dir: str) -> None:
    """A metrics document's test metrics as flat MLflow metrics (test_<name>_k<K>, and test_<rule>_c<target>_<name>
    for the set rules), plus the run directory's result files as artifacts."""
    test = metrics["test"]
    flat: dict[str, float] = {}
    for name in TEST_METRICS:
        for key, value in (test.get(name) or {}).items():
            if value is not None:
                flat[f"test_{name}_k{key}"] = value
    for rule, targets in (test.get("set_rules") or {}).items():  # eval.set_rules: test_<rule>_c<target>_<metric>
        for target, entry in targets.items():
            for name in ("coverage", "macro_coverage", "avg_set_size", "classes_below_target"):
                flat[f"test_{rule}_c{target}_{name}"] = entry[name]
    log_metrics(uri, run_id, flat, step=0)
    for name in RESULT_FILES:
        local = Path(run_dir) / name
        if local.is_file():
            log_artifact(uri, run_id, local)
