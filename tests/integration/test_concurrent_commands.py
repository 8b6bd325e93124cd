"""Several avgk commands started at the same instant on one machine, as a user would: the defaults,
none of the test suite's environment variables, an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.runs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SUITE_ENV = ("AVGK_DASHBOARD_PORT", "OMP_NUM_THREADS", "RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_V2_ENABLED",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "MLFLOW_TRACKING_URI",
             "RAY_ADDRESS", "AVGK_LOCK_DIR")
"""What tests/conftest.py sets for the suite, and what would point a command at another service."""


def test_three_trainings_and_a_same_named_one_at_once(tmp_path):
    """a, b and c all finish, sharing the default shard folder (generated once), the default MLflow store
    and the machine's ports; the second `a` refuses in one line and touches nothing of the first."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in SUITE_ENV}
    env["PYTHONPATH"] = str(ROOT)
    names = ("a", "b", "c", "a")
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(ROOT / "configs" / "smoke.yaml"),
                               f"run.name={name}", "train.epochs=1"], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name in names]
    try:
        outputs = [proc.communicate(timeout=840)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    codes = [proc.returncode for proc in procs]
    refused = [i for i, (code, out) in enumerate(zip(codes, outputs, strict=True))
               if code == 2 and "is in use by another command" in out]
    assert len(refused) == 1 and names[refused[0]] == "a", list(zip(names, codes, [o[-1500:] for o in outputs], strict=True))
    finished = [i for i in range(len(names)) if i not in refused]
    assert all(codes[i] == 0 for i in finished), [(names[i], codes[i], outputs[i][-3000:]) for i in finished]
    line = outputs[refused[0]].strip().splitlines()[-1]
    assert line.startswith(f"avgk: error: run error: run directory {tmp_path / 'runs' / 'a'} is in use by another "
                           "command (pid "), line
    assert "Traceback" not in outputs[refused[0]]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("a", "FINISHED"), ("b", "FINISHED"),
                                                                      ("c", "FINISHED")]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["smoke"]  # one shard folder, written once
