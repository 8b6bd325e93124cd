"""The stored global pseudo-label table: a CSR lookup over sample idx, and its parquet parts written, read and published.

Legend: B batch size, N samples, M positives of the whole training set,
R rows of a part of the table, P positives of those rows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from avgk.runtime import storage

if TYPE_CHECKING:
    import pyarrow as pa

PSEUDO_LABELS_DIR = "pseudo_labels"
"""Folder of the global pseudo-label table inside a run directory."""
METADATA_KEY = b"avgk.pseudo_labels"
"""Parquet schema-metadata key holding the table's JSON description (GlobalSelection + provenance)."""


def positives_as_rows(positive_NL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts_N int64, labels_P int32): each row's positive class ids, ascending, rows concatenated."""
    _, cols = np.nonzero(positive_NL)  # row-major: rows in order, class ids ascending
    return np.count_nonzero(positive_NL, axis=1).astype(np.int64), cols.astype(np.int32)


@dataclasses.dataclass
class PseudoLabelTable:
    """Global pseudo-labels as a dense CSR lookup over sample idx 0..N-1 (8 N + 4 M bytes)."""

    offsets_N1: np.ndarray
    """int64, N + 1: the labels of sample i are labels_M[offsets_N1[i]:offsets_N1[i + 1]]."""
    labels_M: np.ndarray
    """int32 class ids, ascending within each sample."""
    metadata: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return self.offsets_N1.size - 1

    @property
    def num_positives(self) -> int:
        return self.labels_M.size

    @classmethod
    def from_rows(
        cls, *, idx_R: Any, counts_R: Any, labels_P: Any, num_samples: int, metadata: Mapping[str, Any]
    ) -> PseudoLabelTable:
        """The table of rows given in any order; every idx in 0..num_samples-1 exactly once."""
        idx_R = np.asarray(idx_R, dtype=np.int64)
        counts_R = np.asarray(counts_R, dtype=np.int64)
        labels_P = np.asarray(labels_P, dtype=np.int32)
        if idx_R.shape != counts_R.shape or int(counts_R.sum()) != labels_P.size:
            raise ValueError(
                f"rows disagree: {idx_R.size} idx, {counts_R.size} counts summing to {int(counts_R.sum())}, "
                f"{labels_P.size} labels"
            )
        if idx_R.size != num_samples or not np.array_equal(np.sort(idx_R), np.arange(num_samples)):
            raise ValueError(
                f"a pseudo-label table needs every sample idx 0..{num_samples - 1} exactly once, got {idx_R.size} rows"
            )
        order = np.argsort(idx_R, kind="stable")
        starts_R = np.concatenate([[0], np.cumsum(counts_R)[:-1]]).astype(np.int64)
        offsets_N1 = np.zeros(num_samples + 1, dtype=np.int64)
        np.cumsum(counts_R[order], out=offsets_N1[1:])
        labels_M = labels_P[concat_ranges(starts_R[order], counts_R[order])]
        return cls(offsets_N1=offsets_N1, labels_M=labels_M, metadata=dict(metadata))

    def labels_of(self, idx: int) -> np.ndarray:
        return self.labels_M[self.offsets_N1[idx] : self.offsets_N1[idx + 1]]

    def targets(self, idx_B: Any, *, num_classes: int) -> torch.Tensor:
        """B x L float32 0/1 targets of the samples idx_B (a torch tensor or array of sample idx)."""
        idx_B = np.asarray(idx_B.cpu() if isinstance(idx_B, torch.Tensor) else idx_B, dtype=np.int64)
        if idx_B.size and (int(idx_B.min()) < 0 or int(idx_B.max()) >= self.num_samples):
            raise ValueError(
                f"sample idx must lie in [0, {self.num_samples}) (the table's N), got {int(idx_B.min())}..{int(idx_B.max())}"
            )
        starts_B = self.offsets_N1[idx_B]
        counts_B = self.offsets_N1[idx_B + 1] - starts_B
        targets_BL = torch.zeros(idx_B.size, num_classes, dtype=torch.float32)
        rows_P = np.repeat(np.arange(idx_B.size), counts_B)
        cols_P = self.labels_M[concat_ranges(starts_B, counts_B)]
        targets_BL[torch.from_numpy(rows_P), torch.from_numpy(cols_P.astype(np.int64))] = 1.0
        return targets_BL


def concat_ranges(starts_R: np.ndarray, counts_R: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + count) for each row, vectorised."""
    total = int(counts_R.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends_R = np.cumsum(counts_R)
    ranges: np.ndarray = np.arange(total, dtype=np.int64) - np.repeat(ends_R - counts_R - starts_R, counts_R)
    return ranges


def pseudo_label_arrow_table(*, idx_R: Any, counts_R: Any, labels_P: Any, metadata: Mapping[str, Any]) -> pa.Table:
    """A pyarrow table (idx int64, labels list<int32>) with `metadata` as JSON in its schema metadata."""
    import pyarrow as pa

    counts_R = np.asarray(counts_R, dtype=np.int64)
    offsets = np.zeros(counts_R.size + 1, dtype=np.int32)
    np.cumsum(counts_R, out=offsets[1:])
    labels = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(np.asarray(labels_P, dtype=np.int32)))
    table = pa.table({"idx": pa.array(np.asarray(idx_R, dtype=np.int64)), "labels": labels})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(dict(metadata)).encode()})


def write_parquet(uri: str, table: pa.Table) -> None:
    """One parquet file on a local path or a pyarrow filesystem URI."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue())


def read_pseudo_label_table(uri: str) -> PseudoLabelTable:
    """The table in folder `uri` (every *.parquet part), checked complete: N rows, M positives, one description.

    Raises FileNotFoundError when the folder holds no table, ValueError when it is incomplete
    or its parts disagree.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    parts = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not parts:
        raise FileNotFoundError(f"no pseudo-label table in {uri} (no *.parquet files)")
    idx, counts, labels, descriptions = [], [], [], set()
    for part in parts:
        table = pq.read_table(part, filesystem=fs)
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{part} has no {METADATA_KEY.decode()!r} metadata: not a pseudo-label table part")
        descriptions.add(raw)
        idx.append(table.column("idx").to_numpy())
        column = table.column("labels").combine_chunks()
        offsets = column.offsets.to_numpy()
        counts.append(np.diff(offsets).astype(np.int64))
        labels.append(column.values.to_numpy()[offsets[0] : offsets[-1]])
    if len(descriptions) != 1:
        raise ValueError(f"the parts of {uri} come from {len(descriptions)} different selections: a mixed table")
    metadata = json.loads(descriptions.pop())
    num_samples, num_positives = int(metadata["num_samples"]), int(metadata["num_positives"])
    table = PseudoLabelTable.from_rows(
        idx_R=np.concatenate(idx), counts_R=np.concatenate(counts), labels_P=np.concatenate(labels),
        num_samples=num_samples, metadata=metadata,
    )
    if table.num_positives != num_positives:
        raise ValueError(f"{uri} holds {table.num_positives} positives, its metadata says M={num_positives}: incomplete")
    return table


def temporary_dir_for(final_uri: str) -> str:
    """A fresh hidden sibling of `final_uri` to write a table into before publish_dir."""
    parent, _, name = final_uri.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


def publish_dir(tmp_uri: str, final_uri: str) -> None:
    """Moves a completely written folder to `final_uri`, replacing what was there.

    Local paths: renames (a reader sees the old table or the new one, never a partial one).
    Object stores cannot rename folders: the old folder is deleted and the new one copied;
    read_pseudo_label_table's count checks reject a table caught half-copied.
    """
    import pyarrow.fs as pafs

    fs, tmp = storage.resolve(tmp_uri)
    _, final = storage.resolve(final_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        trash = None
        if os.path.exists(final):
            trash = f"{final}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
        return
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        fs.delete_dir(final)
    pafs.copy_files(tmp, final, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(tmp)


def remove_dir(uri: str) -> None:
    """Deletes a folder (a failed write's temporary folder) if it exists."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
