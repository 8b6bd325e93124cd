"""Benchmark: `avgk serve` (Ray Serve) against `mlflow models serve`, the same model, requests and clients.

Run: python benchmarks/bench_serving.py [--requests 400] [--clients 4] [--images-per-request 1]
Prints a markdown table. Not collected by pytest (a script, and __test__ = False).

A smoke-config model (small CNN, 16 px input) is trained one epoch in process and logged as the
pyfunc model to a sqlite MLflow store in a temporary folder. Each server runs in turn on 127.0.0.1
and a free port, started as a user would (`avgk serve --run RUN`; `mlflow models serve -m
runs:/.../model --env-manager local`), and is stopped when its load test ends. The load test is
bounded: --requests POSTs of --images-per-request 16-px PNGs at k=2 from --clients threads, after
20 warm-up requests; requests/s is the count over the wall time, latencies per request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__test__ = False
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def train_and_log(folder: Path) -> tuple[str, str, list[bytes]]:
    """(run dir, the logged model's URI, test PNGs)."""
    from PIL import Image

    from avgk.config import load_config
    from avgk.data.prepare import prepare
    from avgk.inference.serving import log_pyfunc_model
    from avgk.records import tracking
    from avgk.training import checkpoints, engine

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = load_config(ROOT / "configs" / "smoke.yaml", [f"data.shards={folder / 'shards'}", f"run.storage={folder}",
                                                          "run.name=model", f"tracking.uri={uri}", "train.epochs=1"])
    prepare(config, progress=False)
    run_id = tracking.start_run(config)
    engine.fit(config, reporter=checkpoints.LocalReporter(config.run_dir), log=lambda _: None)
    model_uri = log_pyfunc_model(uri, run_id, config.run_dir, checkpoint=f"{config.run_dir}/best/checkpoint.pt")
    tracking.end_run(uri, run_id, status="FINISHED")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return str(config.run_dir), model_uri, images


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url}/ping did not answer within {timeout_s:.0f} s")


def load_test(url: str, images: list[bytes], *, requests: int, clients: int, per_request: int) -> dict[str, float]:
    def body(n: int) -> bytes:
        chosen = [images[(n * per_request + i) % len(images)] for i in range(per_request)]
        data = [[base64.b64encode(im).decode()] for im in chosen]
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}, "params": {"k": 2}}).encode()

    def send(n: int) -> float:
        request = urllib.request.Request(f"{url}/invocations", data=body(n), headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
            answer.read()
        return time.perf_counter() - start

    for n in range(20):
        send(n)  # warm-up: the model's first batches, connection set-up
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            seconds = send(n)
            with lock:
                latencies.append(seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.asarray(latencies)
    return {"rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def serve(cmd: list[str], url: str, env: dict[str, str], images: list[bytes], args: argparse.Namespace,
          cwd: Path) -> dict[str, float]:
    log_path = cwd / "server.log" if cwd != ROOT else Path(tempfile.gettempdir()) / "bench-serving-avgk.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_ready(url, proc)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; its output:\n{log_path.read_text()[-3000:]}") from None
        return load_test(url, images, requests=args.requests, clients=args.clients, per_request=args.images_per_request)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=60)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        folder = Path(tmp)
        run, model_uri, images = train_and_log(folder)
        env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])  # mlflow starts `uvicorn` by name
        results = {}
        port = free_port()
        results[f"avgk serve (Ray Serve, {args.replicas} replica)"] = serve(
            [sys.executable, "-m", "pipelines.cli", "serve", "--run", run, "--port", str(port),
             "--replicas", str(args.replicas)], f"http://127.0.0.1:{port}", env, images, args, ROOT)
        port = free_port()
        results["mlflow models serve (one process)"] = serve(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)], f"http://127.0.0.1:{port}", {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"},
            images, args, folder)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"{args.requests} requests of {args.images_per_request} 16-px PNG(s) at k=2 from {args.clients} clients, "
          f"after 20 warm-up requests; {os.cpu_count()} CPUs, {platform.machine()}; commit {commit}\n")
    print("| server | requests/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
