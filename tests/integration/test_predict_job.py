"""`avgk predict ... --out OUT` as a Ray Data job on the smoke run: a folder with an unreadable file, a
bucket prefix on the suite's S3 server, a shard set with labels; equal to SetPredictor; parts reused
by a rerun, a killed job resumed, another K recomputing every part."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from avgk.inference.predict import SetPredictor
from avgk.runtime import storage
from tests.helpers.runs import ROOT, read_split, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BUCKET = "avgk-predict"
NUM_IMAGES = 240


@pytest.fixture(scope="module")
def cluster(s3_env, local_ray):
    """Started after the AWS_* variables are set, so the model actors reach the bucket."""
    s3_env.create_bucket(BUCKET)
    return local_ray


@pytest.fixture(scope="module")
def folder(predict_smoke_run, tmp_path_factory) -> Path:
    """NUM_IMAGES test images as PNG files in two sub-folders, and a file that is not an image."""
    shards, _ = predict_smoke_run
    images, _ = read_split(shards, "test")
    root = tmp_path_factory.mktemp("images")
    for n, data in enumerate(images[:NUM_IMAGES]):
        (root / f"sub{n % 2}").mkdir(exist_ok=True)
        (root / f"sub{n % 2}" / f"{n:04d}.png").write_bytes(data)
    (root / "sub0" / "broken.png").write_bytes(b"not a png")
    return root


def predict(*args: str) -> tuple[int, str, str]:
    from pipelines import cli

    return cli.main(["predict", *args]), "", ""


def read_parts(out: str) -> dict[str, dict]:
    """Every row of the Parquet parts under `out`, by source."""
    rows = {}
    for rel in sorted(storage.list_files(out)):
        if rel.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, rel))))
            rows.update({row["source"]: row for row in table.to_pylist()})
    return rows


def test_a_folder_equals_set_predictor_and_lists_the_unreadable_file(cluster, predict_smoke_run, folder, tmp_path,
                                                                      capsys):
    _, run = predict_smoke_run
    out = tmp_path / "out"
    assert predict("--run", str(run), "--k", "2", str(folder), "--out", str(out), "--parts", "8")[0] == 1  # one failed
    captured = capsys.readouterr()
    summary = captured.out + captured.err
    assert f"predict: {NUM_IMAGES + 1} images (1 failed)" in summary and f"output: {out}" in summary, summary
    rows = read_parts(str(out))
    assert len(rows) == NUM_IMAGES + 1
    broken = rows[str(folder / "sub0" / "broken.png")]
    assert broken["error"].startswith("UnidentifiedImageError") and broken["labels"] == [] and broken["set_size"] == 0
    files = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")
    predictor = SetPredictor.from_run(str(run), batch_size=64)
    expected = predictor.predict([str(p) for p in files], k=2)
    threshold = predictor.threshold(2)
    for path, want in zip(files, expected, strict=True):
        got = rows[str(path)]
        assert got["error"] is None and got["set_size"] == want.size
        np.testing.assert_allclose(got["scores"], want.scores, atol=1e-6)
        if not any(abs(s - threshold) < 1e-6 for s in predictor.score([str(path)])[0]):
            assert got["labels"] == want.ids and got["names"] == want.names
    assert "within 1e-06 of the threshold" not in summary  # none on this data
    # each part's record: its checkpoint and rule
    record = json.loads(next(out.glob("part-*.json")).read_text())
    assert record["rule"] == {"k": "2", "top_k": False} and record["checkpoint"]["path"].endswith("checkpoint.pt")

    # started again: every part reused, no image read; another K: none reused
    assert predict("--run", str(run), "--k", "2", str(folder), "--out", str(out))[0] == 0  # the failed file: reused
    again = capsys.readouterr()
    parts = len(list(out.glob("part-*.json")))
    assert f"{parts} of {parts} parts already written" in again.out + again.err
    predict("--run", str(run), "--k", "1", str(folder), "--out", str(out))
    other = capsys.readouterr()
    assert "already written" not in other.out + other.err and f"predict: {NUM_IMAGES + 1} images" in other.out + other.err
    assert {json.loads(p.read_text())["rule"]["k"] for p in out.glob("part-*.json")} == {"1"}
    # an unknown K, and --parts against the folder's: one line each, before anything runs
    from pipelines import cli

    assert cli.main(["predict", "--run", str(run), "--k", "7", str(folder), "--out", str(out)]) == 2
    assert "k=7 was not calibrated for this run; calibrated K: 1, 2, 3" in capsys.readouterr().err
    assert cli.main(["predict", "--run", str(run), "--k", "1", str(folder), "--out", str(out), "--parts", "3"]) == 2
    assert "was written with 8 parts" in capsys.readouterr().err


def test_a_bucket_prefix_in_and_out(cluster, predict_smoke_run, folder, capsys):
    _, run = predict_smoke_run
    prefix = f"s3://{BUCKET}/images"
    for path in sorted(folder.rglob("*.png"))[:60]:
        storage.upload_file(path, f"{prefix}/{path.relative_to(folder)}")
    out = f"s3://{BUCKET}/labels"
    predict("--run", str(run), "--k", "2", prefix, "--out", out, "--parts", "4")
    capsys.readouterr()
    rows = read_parts(out)
    assert len(rows) == 60 and all(source.startswith(prefix + "/") for source in rows)
    local = read_parts_from_predictor(run, folder, [source[len(prefix) + 1:] for source in rows])
    for source, row in rows.items():
        want = local[source[len(prefix) + 1:]]
        if row["error"] is None:
            assert row["labels"] == want.ids
            np.testing.assert_allclose(row["scores"], want.scores, atol=1e-6)
    assert storage.exists(f"{out}/job.json")


def read_parts_from_predictor(run: Path, folder: Path, rels: list[str]):
    predictor = SetPredictor.from_run(str(run), batch_size=64)
    good = [rel for rel in rels if rel != "sub0/broken.png"]
    return dict(zip(good, predictor.predict([str(folder / rel) for rel in good], k=2), strict=True))


def test_a_shard_set_gives_each_rows_truth_and_the_set_accuracy(cluster, predict_smoke_run, tmp_path, capsys):
    shards, run = predict_smoke_run
    out = tmp_path / "shard-labels"
    assert predict("--run", str(run), "--k", "2", str(shards), "--out", str(out))[0] == 0
    captured = capsys.readouterr()
    rows = read_parts(str(out))
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert len(rows) == metrics["num_samples"]
    assert all(key.startswith("test-") for key in rows)
    accuracy = np.mean([row["in_set"] for row in rows.values()])
    # the run's own evaluation of the same split, checkpoint and K
    assert accuracy == pytest.approx(metrics["avg_k_accuracy"]["2"], abs=1e-9)
    assert f"set accuracy {100 * accuracy:.2f}%" in captured.out + captured.err
    assert len(list(out.glob("part-*.parquet"))) == len(json.loads((shards / "manifest.json").read_text())
                                                        ["splits"]["test"]["shards"])


def test_a_killed_job_resumes_its_unfinished_parts(predict_smoke_run, tmp_path):
    """kill -9 of `avgk predict` once some parts are written: the same command writes only the others.
    400 test images as files, one per batch: the job runs long enough to be killed midway."""
    shards, run = predict_smoke_run
    folder = tmp_path / "images"
    folder.mkdir()
    images = read_split(shards, "test")[0][:400]
    for n, data in enumerate(images):
        (folder / f"{n:05d}.png").write_bytes(data)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "predict", "--run", str(run), "--k", "2", str(folder),
           "--out", str(out), "--parts", "24", "--batch-size", "1", "--num-actors", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(list(out.glob("part-*.json"))) >= 2, timeout_s=300, what="two parts written",
                       interval_s=0.05)
            os.kill(driver.pid, signal.SIGKILL)  # the command alone, as a user's kill -9: its watcher stops its cluster
        finally:
            driver.kill()
            driver.wait()
    finished = len(list(out.glob("part-*.json")))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    reused = int(text.split(" of 24 parts already written")[0].rsplit("predict: ", 1)[-1])
    assert finished <= reused < 24, text[-2000:]
    assert len(read_parts(str(out))) == len(images)


def test_without_out_a_shard_set_streams_json_lines(cluster, predict_smoke_run, capsys):
    """No --out: the job still runs (a shard set is its input) and each row is a JSON line on stdout."""
    shards, run = predict_smoke_run
    assert predict("--run", str(run), "--k", "2", str(shards), "--split", "val")[0] == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    val = json.loads((shards / "manifest.json").read_text())["splits"]["val"]
    assert len(lines) == sum(val["shard_samples"]) and all(key.startswith("val-") for key in (r["source"] for r in lines))
    assert all(set(r) == {"source", "labels", "names", "scores", "set_size"} for r in lines)
