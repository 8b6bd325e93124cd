"""A real `mlflow server` on 127.0.0.1 that a test may stop, restart on the same port, or freeze.

`stop()` ends it (clients then get "connection refused"), `start()` brings it back on the same port
and store, `freeze()`/`thaw()` send SIGSTOP/SIGCONT to its process group (the kernel still accepts
connections, nothing answers: a hung server).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import server_process
from tests.helpers.runs import free_port, wait_for_http


class MlflowServer:
    def __init__(self, root: Path, *, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "server.log"
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_http(self.proc, f"{self.uri}/health", log_path=log_path, timeout_s=120, name="mlflow server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        server_process.end_group(self.proc, grace_s=30)
        self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        server_process.freeze(self.proc)

    def thaw(self) -> None:
        assert self.proc is not None
        server_process.thaw(self.proc)
