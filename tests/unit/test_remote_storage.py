"""Shard and run locations given as URIs (avgk.runtime.storage): URI rules, and one-line errors and shard checks
against a real S3 server on 127.0.0.1 (SeaweedFS, tests/helpers/s3.py; started once per session)."""

from __future__ import annotations

import pytest

from avgk.config import ConfigError, load_config
from avgk.data.manifest import read_manifest, shard_problems, write_manifest
from avgk.data.shards import write_split
from avgk.runtime import storage
from tests.helpers.runs import SMOKE

# ---------------------------------------------------------------- URI handling (no server)


@pytest.mark.parametrize(
    "uri, parts, expected",
    [
        ("s3://b-1/data", ("train", "shard-000000.tar"), "s3://b-1/data/train/shard-000000.tar"),
        ("s3://b-1/data/", ("manifest.json",), "s3://b-1/data/manifest.json"),
        # a query (pyarrow's non-secret options) stays at the end of every path built from the URI
        ("s3://b-1/data?endpoint_override=127.0.0.1:9000", ("manifest.json",),
         "s3://b-1/data/manifest.json?endpoint_override=127.0.0.1:9000"),
        ("/tmp/shards", ("val",), "/tmp/shards/val"),
    ],
)
def test_join_keeps_the_query_last(uri, parts, expected):
    assert storage.join(uri, *parts) == expected


@pytest.mark.parametrize(
    "uri, remote",
    [("s3://bucket/x", True), ("gs://bucket/x", True), ("file:///tmp/x", False), ("/tmp/x", False), ("data/x", False)],
)
def test_is_remote(uri, remote):
    assert storage.is_remote(uri) is remote


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://Bad_Bucket/x", "S3 bucket name 'Bad_Bucket' breaks the naming rule (3-63 characters"),
        ("s3://ab/x", "S3 bucket name 'ab' breaks the naming rule"),
        ("s3:///x", "'s3:///x' is not a filesystem URI: expected scheme://bucket/prefix"),
        ("s3://key:secret@bucket/x", "the URI carries user:password@ credentials; credentials come from the standard"),
        ("s3://bucket/x?access_key=a&secret_key=b",
         "s3://bucket/x: the URI carries query option(s) ['access_key', 'secret_key']; credentials come from"),
    ],
)
def test_bad_uris_are_named_with_the_rule(uri, message):
    with pytest.raises(ValueError) as err:
        storage.check_uri(uri)
    assert message in str(err.value)
    assert "key:secret" not in str(err.value) and "=b" not in str(err.value)  # a secret given is never echoed


def test_a_bad_shards_uri_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"data.shards: 's3://My_Data/smoke': S3 bucket name 'My_Data' breaks"):
        load_config(SMOKE, ["data.shards=s3://My_Data/smoke"])
    assert load_config(SMOKE, ["data.shards=s3://my-data/smoke"]).data.shards == "s3://my-data/smoke"


# ---------------------------------------------------------------- against the server


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    return s3_env.create_bucket("avgk-unit")


def _tiny_split(shards: str, split: str = "train", num: int = 6) -> dict:
    samples = [{"key": f"{split}-{i:08d}", "image": b"\x89PNG-not-decoded-here", "ext": "png", "cls": i % 2, "idx": i}
                for i in range(num)]
    return write_split(samples=samples, shards_dir=shards, split=split, num_classes=2, maxcount=2)


def test_a_missing_bucket_is_named(s3_env):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/data/manifest.json: bucket 'no-such-bucket' "
                                                   r"does not exist .*create it first"):
        read_manifest("s3://no-such-bucket/data")
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        _tiny_split("s3://no-such-bucket/data")  # refused before any upload, not at the first close


def test_a_missing_manifest_says_to_prepare(bucket):
    with pytest.raises(FileNotFoundError, match=rf"^{bucket}/nothing-here/manifest.json does not exist: no complete "
                                                r"shards there; run `avgk prepare CONFIG` first$"):
        read_manifest(f"{bucket}/nothing-here")


def test_missing_or_wrong_credentials_are_one_line_naming_the_rule(bucket, monkeypatch, tmp_path):
    entry = _tiny_split(f"{bucket}/creds")
    write_manifest(shards_dir=f"{bucket}/creds", source="test", settings={}, classes=["a", "b"], splits={"train": entry})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    with pytest.raises(storage.StorageError,
                       match=r"^s3://avgk-unit/creds/manifest.json: access denied: the "
                             r"credentials in effect may not read or write it.*never from the avgk config$"):
        read_manifest(f"{bucket}/creds")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match=r"access denied and no credentials found: credentials come from the "
                                                   r"standard places only \(AWS_ACCESS_KEY_ID"):
        read_manifest(f"{bucket}/creds")


def test_the_cli_reports_a_storage_error_in_one_line(s3_env, capsys):
    from pipelines import cli

    assert cli.main(["prepare", str(SMOKE), "data.shards=s3://no-such-bucket/smoke"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("avgk: error:")]
    assert len(lines) == 1 and "bucket 'no-such-bucket' does not exist" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_remote_shards_are_checked_by_size_and_listed_once(bucket):
    shards = f"{bucket}/sizes"
    entry = _tiny_split(shards)
    manifest = write_manifest(shards_dir=shards, source="test", settings={}, classes=["a", "b"], splits={"train": entry})
    assert manifest.shard_urls("train") == [f"{shards}/train/shard-00000{i}.tar" for i in range(3)]
    assert list(manifest.split("train").shard_samples) == [2, 2, 2] and all(manifest.split("train").shard_sha256)
    assert shard_problems(manifest) == []
    urls = manifest.shard_urls("train")
    storage.write_bytes(urls[1], storage.read_bytes(urls[1])[:-512])  # truncated
    storage.delete(urls[2])
    assert shard_problems(read_manifest(shards)) == [
        f"train/shard-000001.tar differs from the manifest (size {manifest.split('train').shard_bytes[1] - 512} "
        f"bytes, recorded {manifest.split('train').shard_bytes[1]})",
        "train/shard-000002.tar is missing",
    ]
    # a rewrite of the split replaces its objects: no stale shard of a longer earlier write survives
    smaller = _tiny_split(shards, num=2)
    assert sorted(storage.list_files(f"{shards}/train")) == ["shard-000000.tar"]
    assert not storage.exists(f"{shards}/manifest.json")  # removed by the rewrite until write_manifest runs
    assert smaller["shards"] == ["train/shard-000000.tar"]


def test_a_loader_stops_on_a_storage_error_instead_of_skipping_shards(bucket, monkeypatch):
    """Broken shards are skipped and counted; credentials that stop working are not a broken shard."""
    from avgk.data.loaders import eval_loader

    shards = f"{bucket}/loader"
    write_manifest(shards_dir=shards, source="test", settings={}, classes=["a", "b"], splits={"train": _tiny_split(shards)})
    loader = eval_loader(shards_dir=shards, split="train", batch_size=2, rank=0, world_size=1, num_workers=0,
                         transform=None)  # manifest read with good credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ValueError, match=r"s3://avgk-unit/loader/train/shard-000000.tar: access denied"):
        next(iter(loader))


def test_single_process_runs_refuse_a_remote_run_directory(tmp_path, monkeypatch):
    """An in-process run (study cell) with run.storage=s3://... must not write a local folder named 's3:'."""
    from avgk.training.checkpoints import LocalReporter

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"run directory 's3://bucket/runs/cell' is remote: single-process runs"):
        LocalReporter("s3://bucket/runs/cell")
    assert not (tmp_path / "s3:").exists()


def test_pretrained_weights_load_from_object_storage(bucket):
    """model.pretrained names a weights file or an avgk run directory in the bucket, as on local disk."""
    import io

    import torch

    from avgk.config import ModelConfig
    from avgk.models.networks import build_model

    heads = ("softmax", "multilabel")
    source = build_model(ModelConfig(width=8), num_classes=5, heads=heads)
    buffer = io.BytesIO()
    torch.save(source.backbone.state_dict(), buffer)
    storage.write_bytes(f"{bucket}/weights/backbone.pt", buffer.getvalue())
    buffer = io.BytesIO()
    torch.save({"model": source.state_dict(), "config": {}, "num_classes": 5}, buffer)
    storage.write_bytes(f"{bucket}/runs/source/best/checkpoint.pt", buffer.getvalue())
    for pretrained in (f"{bucket}/weights/backbone.pt", f"{bucket}/runs/source"):
        model = build_model(ModelConfig(width=8, pretrained=pretrained), num_classes=3, heads=heads)
        for name, tensor in model.backbone.state_dict().items():
            assert torch.equal(tensor, source.backbone.state_dict()[name]), (pretrained, name)
        assert model.heads["softmax"].weight.shape == (3, 32)  # a new label set: heads start fresh
    with pytest.raises(FileNotFoundError, match=rf"model.pretrained='{bucket}/weights/nope.pt' does not exist"):
        build_model(ModelConfig(width=8, pretrained=f"{bucket}/weights/nope.pt"), num_classes=3, heads=heads)
