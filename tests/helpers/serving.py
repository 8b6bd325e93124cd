"""Serving tests' helpers: child processes that cannot import this checkout's avgk (where a logged model
must bring its own code), and a JSON POST to a server."""

from __future__ import annotations

import json
import os
import site
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers.runs import ROOT

HIDDEN = ("avgk", "pipelines")

SITECUSTOMIZE = '''\
"""Written by tests/helpers/serving.py: {hidden} import only from folders outside {blocked}."""
import os
import sys
from importlib.machinery import PathFinder

HIDDEN = {hidden!r}
BLOCKED = {blocked!r}


def _allowed(entry):
    real = os.path.realpath(entry or os.getcwd())
    return not any(real == b or real.startswith(b + os.sep) for b in BLOCKED)


class HideInstalledAvgk:
    """First on sys.meta_path: finds {hidden} on the allowed sys.path entries only (e.g. a model's
    code/ folder), and fails instead of falling through to site-packages or the editable finder."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in HIDDEN:
            return None
        spec = PathFinder.find_spec(fullname, [p for p in sys.path if _allowed(p)])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (hidden by the test)", name=fullname)
        return spec


sys.meta_path.insert(0, HideInstalledAvgk)
'''


def env_without_avgk(folder: Path) -> dict[str, str]:
    """os.environ for a child Python of this venv in which `import avgk` and `import pipelines` fail.

    avgk may come from this checkout (PYTHONPATH, the editable install's finder, the working
    folder) or from site-packages (a plain install): a sitecustomize.py in `folder`, run at every
    interpreter start, refuses all of them. Run the child with a cwd outside the checkout.
    """
    import avgk

    blocked = {str(ROOT), str(Path(avgk.__file__).resolve().parents[1]), *site.getsitepackages()}
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        blocked.add(site.getusersitepackages())
    blocked = sorted({os.path.realpath(b) for b in blocked})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=HIDDEN, blocked=blocked))
    env = {**os.environ, "PYTHONPATH": str(folder)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # uvicorn, mlflow
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def post(url: str, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a JSON POST; an error status is returned, not raised."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
