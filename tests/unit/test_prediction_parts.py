"""The prediction job's parts without Ray: stable part assignment, what a record must match, the inputs found."""

from __future__ import annotations

import pytest

from avgk.inference.prediction_parts import (
    PartRecord,
    done_parts,
    list_inputs,
    part_name,
    part_of,
    rows_to_parquet,
)
from avgk.runtime import storage


def test_a_part_depends_on_its_key_alone():
    """CRC-32 of the key, not Python's per-process hash: the same part in every process and run, so
    adding inputs never moves those already assigned."""
    import zlib

    keys = [f"/data/img{n}.jpg" for n in range(500)]
    parts = [part_of(key, 16) for key in keys]
    assert parts == [zlib.crc32(key.encode()) % 16 for key in keys]
    assert len(set(parts)) == 16  # 500 keys reach every part


def test_a_part_counts_as_done_only_with_its_rows_and_the_same_record(tmp_path):
    record = PartRecord(part=3, num_parts=8, inputs="abc", checkpoint={"path": "c.pt", "size": 1, "mtime": "t"},
                        rule={"k": "2", "top_k": False})
    out = str(tmp_path)
    assert done_parts(out, [record]) == set()
    storage.write_json(storage.join(out, f"{part_name(3)}.json"), {**record.to_dict(), "rows": 5})
    assert done_parts(out, [record]) == set()  # the record without its rows: a killed write
    storage.write_bytes(storage.join(out, f"{part_name(3)}.parquet"),
                        rows_to_parquet({"source": ["a"], "labels": [[1]], "names": [["x"]], "scores": [[0.5]],
                                         "set_size": [1], "error": [None]}))
    assert done_parts(out, [record]) == {3}
    for changed in (PartRecord(**{**record.__dict__, "inputs": "abd"}),  # an input added to the part
                    PartRecord(**{**record.__dict__, "rule": {"k": "1", "top_k": False}}),  # another K
                    PartRecord(**{**record.__dict__, "checkpoint": {"path": "c.pt", "size": 2, "mtime": "u"}})):
        assert done_parts(out, [changed]) == set()
    (tmp_path / f"{part_name(3)}.json").write_text("{")
    assert done_parts(out, [record]) == set()  # unreadable: written again


def test_inputs_found_and_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b.JPG").write_bytes(b"22")
    found = list_inputs([str(tmp_path / "a"), str(tmp_path / "b.JPG")])
    assert found.kind == "files" and found.files == {str(tmp_path / "a" / "x.png"): 1, str(tmp_path / "b.JPG"): 2}
    digests = found.digests(4)
    assert set(digests) == {part_of(key, 4) for key in found.files}
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        list_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image file in"):
        list_inputs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="at least one INPUT"):
        list_inputs([])
