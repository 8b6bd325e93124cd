"""Several avgk commands on one machine: the locks that keep them apart (avgk.runtime.locks), each
held by a real second process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avgk.config import ConfigError, load_config
from avgk.runtime import locks
from tests.helpers.runs import ROOT


@pytest.fixture(autouse=True)
def _own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))


def _holder(name: str, *, argv: tuple[str, ...] = ("avgk", "demo")) -> subprocess.Popen:
    """A second process holding lock `name` (its command line shown as `argv`) until its stdin closes."""
    code = (f"import sys; sys.argv = {list(argv)!r}\n"
            "from avgk.runtime import locks\n"
            f"assert locks.claim({name!r}) is None\n"
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _end(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_claim_held_by_another_process_names_it_and_ends_with_it():
    proc = _holder("run directory /x/runs/a")
    try:
        holder = locks.claim("run directory /x/runs/a")
        assert holder is not None and holder.startswith(f"pid {proc.pid} since ") and holder.endswith("avgk demo")
        assert locks.claim("run directory /x/runs/b") is None  # another name is free
    finally:
        _end(proc)
    assert locks.claim("run directory /x/runs/a") is None  # released by the system when its process ended
    assert locks.claim("run directory /x/runs/a") is None  # claimed again by the same process: nothing changes
    locks.release("run directory /x/runs/a")
    locks.release("run directory /x/runs/b")


def test_a_killed_holder_leaves_no_stale_lock():
    proc = _holder("shard folder /x/data")
    proc.kill()
    proc.wait(timeout=30)
    assert locks.claim("shard folder /x/data") is None
    locks.release("shard folder /x/data")


def test_waiting_says_one_line_and_goes_on_once_the_holder_ends():
    proc = _holder("local Ray cluster start")
    said: list[str] = []
    threads_done = []

    def release_soon() -> None:
        time.sleep(1.0)
        _end(proc)

    import threading

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    start = time.monotonic()
    with locks.waiting("local Ray cluster start", what="starts a local Ray cluster", say=said.append):
        threads_done.append(time.monotonic() - start)
    releaser.join()
    assert threads_done[0] >= 0.9
    assert len(said) == 1 and said[0].startswith("avgk: waiting for another command that starts a local Ray cluster")


def test_generated_data_asked_with_other_settings_is_refused_naming_them(tmp_path):
    from avgk.data.manifest import read_manifest
    from avgk.data.prepare import ensure_shards

    shards = tmp_path / "data"
    small = ["data.synthetic.num_train=60", "data.synthetic.num_val=40", "data.synthetic.num_test=40",
             "train.batch_size=20", f"data.shards={shards}"]
    ensure_shards(load_config(ROOT / "configs" / "smoke.yaml", small))
    before = {p.name: p.stat().st_mtime_ns for p in shards.rglob("*")}
    with pytest.raises(ConfigError, match=r"data.shards=.* holds synthetic data made with num_classes=20 "
                                          r"\(this config: 10\): choose another data.shards"):
        ensure_shards(load_config(ROOT / "configs" / "smoke.yaml", [*small, "data.synthetic.num_classes=10"]))
    assert {p.name: p.stat().st_mtime_ns for p in shards.rglob("*")} == before  # nothing rewritten
    assert read_manifest(shards).num_classes == 20
    ensure_shards(load_config(ROOT / "configs" / "smoke.yaml", small))  # the same settings: reused


def test_a_pipeline_folder_in_use_is_refused_in_one_line_naming_the_command(tmp_path):
    from avgk.experiments.pipeline_plan import load_pipeline
    from pipelines.demo import demo_spec
    from pipelines.pipeline import run_plan

    plan = load_pipeline(demo_spec(), [f"run.storage={tmp_path / 'runs'}", f"data.shards={tmp_path / 'data'}"])
    root = Path(plan.root).resolve()
    proc = _holder(f"pipeline folder {root}")
    try:
        with pytest.raises(ConfigError, match=rf"pipeline error: {root} is in use by another command "
                                              rf"\(pid {proc.pid} since .*: avgk demo\): wait for it to end"):
            run_plan(plan)
        assert run_plan(plan, dry_run=True).states  # looking is never refused
    finally:
        _end(proc)
    assert not (tmp_path / "data").exists()


def test_a_second_prediction_job_on_one_output_folder_is_refused(tmp_path):
    from pipelines.predict_job import run_predict_job

    out = (tmp_path / "labels").resolve()
    proc = _holder(f"prediction output {out}", argv=("avgk", "predict"))
    try:
        with pytest.raises(ValueError, match=rf"--out {out} is being written by another command \(pid {proc.pid} since "
                                             r".*: avgk predict\): wait for it to end"):
            run_predict_job(run=str(tmp_path / "run"), k=2, inputs=[str(tmp_path)], out=str(out))
    finally:
        _end(proc)
    assert not out.exists()


def test_a_second_server_on_a_busy_port_is_refused_before_any_cluster_starts(tmp_path):
    import socket

    import ray

    from pipelines.serve import run_serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--port {port} is in use on this machine \(another avgk serve\?\)"):
            run_serve(run=str(tmp_path / "run"), port=port)
    assert not ray.is_initialized()
