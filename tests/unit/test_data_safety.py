"""Input data is never overwritten: synthetic generation refuses any folder that is not its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from avgk.config import load_config
from avgk.data.shards import read_manifest, write_synthetic_shards
from tests.helpers.digits import write_digit_pairs

SMALL = dict(num_classes=5, num_train=20, num_val=10, num_test=10, image_size=8, zipf_exponent=1.0,
             ambiguity_rate=0.3, seed=0, maxcount=10)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    write_digit_pairs(root / "images", num_train=60, num_val=20, num_test=20, seed=1)
    config = load_config(None, ["data.source=imagefolder", f"data.root={root / 'images'}", f"data.shards={root / 'shards'}",
                                "data.resize=16", "data.crop=16"])
    prepare(config, progress=False)
    return root / "shards"


def test_training_a_synthetic_config_on_a_prepared_folder_keeps_it_byte_for_byte(prepared_digits, tmp_path):
    """The reported loss: `avgk prepare` of a real source into S, then `avgk train` with the default
    (synthetic) source and data.shards=S regenerated S as synthetic data. Now S is used as it is."""
    from pipelines.train import ensure_shards

    before = tree_digest(prepared_digits)
    config = load_config(None, [f"data.shards={prepared_digits}", f"run.storage={tmp_path}", "loss.k=2", "eval.ks=[1,2]"])
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
