"""`plantnet300k` source: the Pl@ntNet-300K release, root/images/{train,val,test}/<species_id>/*.jpg."""

# Class ids are the sorted species-id folder names (the union over the three splits), as
# for imagefolder; the manifest names each class by its species name from the release's
# plantnet300K_species_id_2_name.json ({"<species_id>": "<name>"}) when available, and
# settings["class_folders"] keeps the species ids in class-id order.

from __future__ import annotations

import json
import os
from pathlib import Path

from avgk.config import DataConfig
from avgk.data.manifest import Manifest
from avgk.data.sources.common import ConvertOptions, convert_file, file_digest, scan_class_folders, write_image_dataset
from avgk.data.sources.imagefolder import SPLITS, check_root, plan_class_splits

__all__ = ["SPECIES_NAMES_FILE", "prepare_plantnet300k", "read_species_names"]

SPECIES_NAMES_FILE = "plantnet300K_species_id_2_name.json"


def read_species_names(path: Path) -> dict[str, str]:
    """The release's species id -> name JSON; errors name the file and the expected shape."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"data.plantnet_metadata={str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError(
            f"data.plantnet_metadata={str(path)!r} must hold an object mapping species id -> name "
            f'(e.g. {{"1355868": "Lactuca virosa L."}}), got {type(raw).__name__}'
        )
    return {str(k): v for k, v in raw.items()}


def _metadata_path(root: Path, metadata: str | os.PathLike[str] | None) -> Path | None:
    if metadata is None:
        default = root / SPECIES_NAMES_FILE
        return default if default.is_file() else None
    path = Path(metadata).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"data.plantnet_metadata={str(metadata)!r} does not exist (looked for {path})")
    return path


def prepare_plantnet300k(
    *,
    root: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    options: ConvertOptions,
    metadata: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Convert the Pl@ntNet-300K release to shards + manifest (idempotent: see write_image_dataset)."""
    base = check_root(root)
    images = base / "images"
    missing = [s for s in SPLITS if not (images / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r} is not a Pl@ntNet-300K release: it needs images/train, images/val and "
            f"images/test folders of <species_id>/<image>.jpg; missing {[f'images/{s}' for s in missing]}"
        )
    trees = {s: scan_class_folders(images / s, root=base) for s in SPLITS}
    folders, plans = plan_class_splits(trees=trees, root=str(images))
    stats = [stat for tree in trees.values() for stat in tree.stats]

    names_path = _metadata_path(base, metadata)
    names = folders
    num_unnamed = len(folders)
    if names_path is not None:
        species = read_species_names(names_path)
        names = [species.get(folder, folder) for folder in folders]
        num_unnamed = sum(folder not in species for folder in folders)
        stat = names_path.stat()
        stats.append((str(names_path), stat.st_size, stat.st_mtime_ns))
    settings = {
        "root": str(base),
        "layout": "plantnet300k",
        "species_names": str(names_path) if names_path else None,
        "num_classes": len(folders),
        "class_folders": folders,
    }
    return write_image_dataset(
        shards_dir=shards_dir,
        source="plantnet300k",
        root=str(base),
        classes=names,
        plans=plans,
        convert=convert_file,
        options=options,
        settings=settings,
        inputs_digest=file_digest(stats) + file_digest([(c, 0, 0) for c in folders]),
        results={"num_classes_without_name": num_unnamed},  # those are named by their species id
    )


def from_config(data: DataConfig, options: ConvertOptions) -> Manifest:
    assert data.root is not None  # DataConfig requires data.root for every source but synthetic
    return prepare_plantnet300k(root=data.root, shards_dir=data.shards, options=options, metadata=data.plantnet_metadata)
