"""Which code a process runs: the driver and its Ray workers must run the same avgk.

On a cluster, workers import avgk from whatever their node has installed (or from their working
directory), so a node with an older checkout would train with other code than the driver's and
no error would say so. The fingerprint is a hash of the source files of avgk and pipelines.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

PACKAGES = ("avgk", "pipelines")


def package_dirs() -> dict[str, Path]:
    """Where this process imports each package from (found without importing it)."""
    dirs = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return dirs


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the relative path and bytes of every .py file of avgk and pipelines, 16 hex digits."""
    digest = hashlib.sha256()
    for name, folder in sorted(package_dirs().items()):
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class CodeMismatch(RuntimeError):
    pass


def check_same_code(expected: str, *, where: str) -> None:
    """Raise when this process's code differs from the driver's fingerprint `expected`."""
    found = code_fingerprint()
    if found != expected:
        dirs = ", ".join(f"{name} from {path}" for name, path in package_dirs().items())
        raise CodeMismatch(
            f"{where} runs other avgk code than the driver (fingerprint {found}, driver {expected}; it imports "
            f"{dirs}): install the same avgk on every node, or start the workers from the driver's checkout"
        )
