"""Input data is never overwritten: synthetic generation refuses any folder that is not its own."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from avgk.config import load_config
from avgk.data.manifest import read_manifest
from avgk.data.shards import write_synthetic_shards
from avgk.data.sources.digits import write_digit_pairs
from tests.helpers.runs import ROOT

SMALL = dict(num_classes=5, num_train=20, num_val=10, num_test=10, image_size=8, zipf_exponent=1.0,
             ambiguity_rate=0.3, seed=0, maxcount=10)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    from avgk.data.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    write_digit_pairs(root / "images", num_train=60, num_val=20, num_test=20, seed=1)
    config = load_config(None, ["data.source=imagefolder", f"data.root={root / 'images'}", f"data.shards={root / 'shards'}",
                                "data.resize=16", "data.crop=16"])
    prepare(config, progress=False)
    return root / "shards"


def test_training_a_synthetic_config_on_a_prepared_folder_keeps_it_byte_for_byte(prepared_digits, tmp_path):
    """The reported loss: `avgk prepare` of a real source into S, then `avgk train` with the default
    (synthetic) source and data.shards=S regenerated S as synthetic data. Now S is used as it is."""
    from avgk.data.prepare import ensure_shards

    before = tree_digest(prepared_digits)
    config = load_config(None, [f"data.shards={prepared_digits}", f"run.storage={tmp_path}", "loss.k=2", "eval.ks=[1,2]",
                                "train.batch_size=16"])
    assert config.data.source == "synthetic"
    ensure_shards(config)
    assert tree_digest(prepared_digits) == before
    assert read_manifest(prepared_digits).source == "imagefolder"


def test_synthetic_generation_refuses_a_folder_it_did_not_write(prepared_digits, tmp_path):
    before = tree_digest(prepared_digits)
    with pytest.raises(ValueError, match=r"holds a prepared 'imagefolder' data set \(100 classes\): refusing to overwrite"):
        write_synthetic_shards(shards_dir=prepared_digits, **SMALL)
    assert tree_digest(prepared_digits) == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that are not avgk's synthetic data \(notes.txt\)"):
        write_synthetic_shards(shards_dir=user, **SMALL)
    assert (user / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        write_synthetic_shards(shards_dir=tmp_path / "file", **SMALL)


def test_synthetic_generation_writes_into_empty_folders_and_over_its_own_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_synthetic_shards(shards_dir=empty, **SMALL).num_classes == 5
    regenerated = write_synthetic_shards(shards_dir=empty, **{**SMALL, "num_classes": 6})
    assert regenerated.num_classes == 6 and read_manifest(empty).num_classes == 6


def test_a_corrupt_manifest_is_named_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "classes": ')
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON .*: the manifest is corrupt"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- every sample accounted for


def _truncate_one_test_shard(shards: Path, copy: Path) -> None:
    """A copy of the shards whose first test shard is cut at half its size (a short read)."""
    import shutil

    shutil.copytree(shards, copy)
    shard = copy / read_manifest(copy).split("test").shards[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def test_an_evaluation_over_fewer_samples_than_the_manifest_fails_or_is_counted(smoke_shards, tmp_path):
    from avgk.evaluation.accounting import SampleCountError
    from avgk.training import checkpoints, engine

    _truncate_one_test_shard(smoke_shards, tmp_path / "shards")
    common = [f"data.shards={tmp_path / 'shards'}", f"run.storage={tmp_path}", "tracking.enabled=false",
              "train.epochs=1", "data.loader_workers=0"]
    strict = load_config(ROOT / "configs" / "smoke.yaml", [*common, "run.name=strict"])
    with pytest.raises(SampleCountError, match=r"split 'test' read \d+ of the manifest's 400 samples.*eval.strict=false"):
        engine.fit(strict, reporter=checkpoints.LocalReporter(strict.run_dir), log=lambda _: None)
    assert not (tmp_path / "strict" / "metrics.json").exists()
    counted = load_config(ROOT / "configs" / "smoke.yaml", [*common, "run.name=counted", "eval.strict=false"])
    lines: list[str] = []
    result = engine.fit(counted, reporter=checkpoints.LocalReporter(counted.run_dir), log=lines.append)
    samples = result.evaluation.metrics["samples"]
    assert samples["val"] == {"expected": 400, "read": 400, "missing": 0}
    assert samples["test"]["expected"] == 400 and 0 < samples["test"]["missing"] < 400
    assert result.evaluation.metrics["test"]["num_samples"] == samples["test"]["read"]
    assert any(line.startswith("warning:") and "split 'test' read" in line for line in lines)


def test_account_samples_names_every_short_split():
    from avgk.evaluation.accounting import SampleCountError, account_samples

    ok = account_samples(read={"val": 5, "test": 7}, expected={"val": 5, "test": 7}, strict=True, shards="S")
    assert ok["test"] == {"expected": 7, "read": 7, "missing": 0}
    with pytest.raises(SampleCountError, match=r"^data error: S: split 'val' read 4 of the manifest's 5 samples; "
                                               r"split 'test' read 6 of the manifest's 7 samples"):
        account_samples(read={"val": 4, "test": 6}, expected={"val": 5, "test": 7}, strict=True, shards="S")


# ---------------------------------------------------------------- stale runs: run.resume


def _saved_run(tmp_path, *overrides):
    from avgk.config import save_config

    config = load_config(None, [f"run.storage={tmp_path}", "run.name=r", *overrides])
    (tmp_path / "r").mkdir(exist_ok=True)
    save_config(config, tmp_path / "r" / "config.yaml")
    return config


def test_a_rerun_resumes_only_the_same_config_unless_forced(tmp_path):
    from avgk.config import ConfigError
    from avgk.records.runs import check_resume

    fresh = load_config(None, [f"run.storage={tmp_path}", "run.name=r"])
    assert check_resume(fresh) is False  # no run there yet
    _saved_run(tmp_path)
    assert check_resume(fresh) is True
    longer = load_config(None, [f"run.storage={tmp_path}", "run.name=r", "train.epochs=9", "data.loader_workers=0"])
    assert check_resume(longer) is True  # how long and where it trains may change, not what it learns
    changed = load_config(None, [f"run.storage={tmp_path}", "run.name=r", "train.lr=0.01", "loss.k=3"])
    with pytest.raises(ConfigError, match=r"trained with a different config \(loss.k: 2.0 -> 3.0; train.lr: 0.002 -> 0.01\)"
                                          r".*run.resume=force"):
        check_resume(changed)
    forced = load_config(None, [f"run.storage={tmp_path}", "run.name=r", "train.lr=0.01", "run.resume=force"])
    assert check_resume(forced) is True
    never = load_config(None, [f"run.storage={tmp_path}", "run.name=r", "run.resume=never"])
    with pytest.raises(ConfigError, match=re.escape("already holds run 'r' and run.resume=never")):
        check_resume(never)


# ---------------------------------------------------------------- fail fast on the driver


def _manifest(tmp_path, **overrides):
    return write_synthetic_shards(shards_dir=tmp_path / "shards", **{**SMALL, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=64"], r"train.batch_size=64 exceeds the 20 training samples of data.shards="),
    (["train.grad_accumulation=3"], r"train.grad_accumulation=3 x train.batch_size=8 exceeds the 20 training samples"),
    (["train.grad_accumulation=2"], None),
    (["loss.k=0.001"], r"loss.k=0.001 selects round\(K x N\) = 0 of the 10 val samples: K x N must be >= 1"),
    (["eval.ks=[0.01, 2]"], r"eval.ks=0.01 selects round\(K x N\) = 0 of the 10 val samples"),
    (["train.batch_size=8", "loss.pseudo_k=1.01", "loss.k=1.01"], None),
    (["eval.ks=[1, 9]"], r"eval.ks: K must be < number of classes 5, got 9"),
])
def test_the_config_is_checked_against_the_manifest_before_any_work(tmp_path, overrides, message):
    from avgk.config import ConfigError
    from avgk.data.prepare import check_data

    manifest = _manifest(tmp_path)
    config = load_config(None, [f"data.shards={tmp_path / 'shards'}", "data.source=imagefolder", "data.root=x",
                                "train.batch_size=8", "eval.ks=[1, 2]", *overrides])
    if message is None:
        check_data(config, manifest)
        return
    with pytest.raises(ConfigError, match=message):
        check_data(config, manifest)


def test_a_manifest_without_a_split_is_refused(tmp_path):
    import dataclasses

    from avgk.config import ConfigError
    from avgk.data.prepare import check_data

    manifest = _manifest(tmp_path)
    manifest = dataclasses.replace(manifest, splits={k: v for k, v in manifest.splits.items() if k != "val"})
    config = load_config(None, [f"data.shards={tmp_path / 'shards'}", "train.batch_size=8", "data.synthetic.num_classes=5",
                                "eval.ks=[1,2]"])
    with pytest.raises(ConfigError, match=r"has no 'val' split \(it has \['test', 'train'\]\)"):
        check_data(config, manifest)


@pytest.mark.parametrize("name, message", [
    ("small_cnn", None),
    ("timm:resnet18", None),
    ("timm:resnet18.a1_in1k", None),  # a pretrained tag: timm's own name check accepts it
    ("torchvision:resnet18", None),
    ("timm:resnet5", r"timm has no model 'resnet5' \(did you mean resnet\d+"),
    ("torchvision:resnet5", r"torchvision has no model 'resnet5' \(did you mean resnet\d+"),
    ("resnet18", r"must be 'small_cnn', 'timm:<name>' or 'torchvision:<name>'"),
])
def test_backbone_names_are_checked_by_each_registry(name, message):
    from avgk.config import ConfigError
    from avgk.training.preflight import check_backbone

    if message is None:
        check_backbone(name)
        return
    with pytest.raises(ConfigError, match=message):
        check_backbone(name)


def test_an_unreachable_tracking_server_is_one_line():
    import socket

    from avgk.config import ConfigError
    from avgk.training.preflight import check_reachable

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"MLflow server at tracking.uri='http://127.0.0.1:{port}' is not reachable"):
        check_reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    check_reachable("sqlite:///x.db")  # local stores need no server


def test_a_directory_passed_as_the_config_is_named(tmp_path):
    from avgk.config import ConfigError

    with pytest.raises(ConfigError, match="is a directory: pass a YAML file"):
        load_config(tmp_path)


def test_gpus_the_cluster_lacks_are_one_line_at_once(monkeypatch):
    """train.use_gpu=true on a CPU cluster: Ray Train would wait for GPUs without end."""
    import ray

    from avgk.config import ConfigError
    from pipelines.train import check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    check_resources(load_config(None, ["train.use_gpu=false"]))
    with pytest.raises(ConfigError, match=r"train.use_gpu=true with train.num_workers=2 needs that many GPUs, "
                                          r"the Ray cluster has 0"):
        check_resources(load_config(None, ["train.use_gpu=true", "train.num_workers=2"]))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    check_resources(load_config(None, ["train.use_gpu=true", "train.num_workers=2"]))


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_every_mlflow_run_ends_with_the_status_its_block_earned(tmp_path, raised, status):
    from mlflow.tracking import MlflowClient

    from avgk.records import tracking

    config = load_config(ROOT / "configs" / "smoke.yaml", [f"run.storage={tmp_path}", "run.name=life"])
    uri = tracking.tracking_uri(config)
    run_id = tracking.start_run(config)
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext(), tracking.lifecycle(uri, run_id):
        if raised:
            raise raised
    assert MlflowClient(uri).get_run(run_id).info.status == status


def test_sigterm_ends_the_cli_like_ctrl_c(tmp_path):
    """SIGTERM during a command: exit 143 and one line, so run lifecycles unwind (KILLED), not a silent death."""
    import signal
    import subprocess
    import sys

    script = (
        "import time\n"
        "from pipelines import cli\n"
        "def slow(args):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "    return 0\n"
        "cli.cmd_config = slow  # a long command, any command\n"
        "raise SystemExit(cli.main(['config']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)  # a hang raises TimeoutExpired
    assert proc.returncode == 143 and err.strip() == "avgk: terminated"


def test_the_manifest_records_each_shards_count_and_checksum_and_reuse_checks_them(tmp_path):
    import tarfile

    from avgk.data.manifest import file_sha256, shard_problems

    shards = tmp_path / "shards"
    kwargs = dict(shards_dir=shards, num_classes=5, num_train=50, num_val=20, num_test=20, image_size=8,
                  zipf_exponent=0.0, ambiguity_rate=0.0, seed=0, maxcount=16)
    manifest = write_synthetic_shards(**kwargs)
    train = manifest.split("train")
    assert train.shard_samples == (16, 16, 16, 2) and sum(train.shard_samples) == train.num_samples
    for relative, count, digest in zip(train.shards, train.shard_samples, train.shard_sha256, strict=True):
        with tarfile.open(shards / relative) as tar:
            assert sum(name.endswith(".cls") for name in tar.getnames()) == count
        assert file_sha256(shards / relative) == digest
    assert read_manifest(shards).split("train") == train  # written and read back alike
    assert shard_problems(manifest) == []

    # A shard truncated behind a complete manifest is found, and the data set is written again.
    victim = shards / train.shards[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert shard_problems(read_manifest(shards)) == [f"{train.shards[1]} differs from the manifest (SHA-256)"]
    rewritten = write_synthetic_shards(**kwargs)
    # Rewritten whole (tar headers carry the write time, so the checksums are the new manifest's).
    assert shard_problems(rewritten) == [] and file_sha256(victim) == rewritten.split("train").shard_sha256[1]
    assert rewritten.split("train").shard_samples == train.shard_samples


def test_a_killed_writers_partial_folder_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    shards = tmp_path / "shards"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = shards / f".train.partial-{int(dead.stdout)}"
    stale.mkdir(parents=True)
    (stale / "shard-000000.tar").write_bytes(b"half a shard")
    from avgk.data.shards import encode_png, write_split

    image = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    samples = [{"key": f"s{i}", "image": image, "ext": "png", "cls": i % 2, "idx": i} for i in range(4)]
    write_split(samples=samples, shards_dir=shards, split="train", num_classes=2)
    assert not stale.exists()
    assert sorted(p.name for p in shards.iterdir()) == ["train"]


def test_a_synthetic_write_killed_half_way_is_finished_by_the_next_one(tmp_path):
    import subprocess
    import sys

    shards = tmp_path / "shards"
    # kill -9 (os._exit) while the val split is being written: train is complete, no manifest.
    script = (
        "import os, sys\n"
        "from avgk.data import shards as s\n"
        "real = s.write_split\n"
        "def dying(**kw):\n"
        "    if kw['split'] == 'val':\n"
        "        os._exit(9)\n"
        "    return real(**kw)\n"
        "s.write_split = dying\n"
        f"s.write_synthetic_shards(shards_dir={str(shards)!r}, num_classes=5, num_train=20, num_val=10, num_test=10,"
        " image_size=8, zipf_exponent=0.0, ambiguity_rate=0.0, seed=0, maxcount=100)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT).returncode == 9
    assert (shards / "train").is_dir() and not (shards / "manifest.json").exists()
    manifest = write_synthetic_shards(shards_dir=shards, num_classes=5, num_train=20, num_val=10, num_test=10,
                                      image_size=8, zipf_exponent=0.0, ambiguity_rate=0.0, seed=0, maxcount=100)
    assert sorted(manifest.splits) == ["test", "train", "val"]
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "test", "train", "val"]


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`avgk config --keys | head -1`: the pipe closes under avgk; exit 141 (as SIGPIPE would), no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "config", "--keys"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before avgk has written anything: its first flush meets a closed pipe
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
