"""`avgk serve --run RUN`: a trained run's label sets over HTTP with Ray Serve (replicas, requests batched together).

The request and the answer are the MLflow model's (`mlflow models serve`, avgk.inference.serving):

    POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG>"], ...]},
                        "params": {"k": 2, "top_k": false}}    (or {"rule": "coverage", "coverage": 0.95})
    ->                 {"predictions": [{"label_set": "{\\"labels\\": [...], \\"names\\": [...], ...}"}, ...]}
    GET /ping          200 once the replica has loaded the model

Where they differ: `dataframe_records` ([{"image": "<base64>"}, ...]) is the only other input form
accepted (no CSV, no `instances`); `k` may be any calibrated K, per request. Each replica holds one
SetPredictor; the images of the requests that arrive within `batch_wait_ms` are scored as one batch
(Serve's @serve.batch, up to `max_batch_size` images), and each request gets its own sets for its
own K. A request with a row that is not an image, or an uncalibrated K, gets HTTP 400 naming the row
or the calibrated K before anything of it is batched: the other requests are not affected.

`build_app(args)` is the application builder a Serve config names (infra/kuberay/rayservice.yaml:
`import_path: pipelines.serve:build_app`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from avgk.evaluation.metrics import format_k
from avgk.runtime.console import say

DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_MS = 10.0


class BadRequest(ValueError):
    """The request's own fault: HTTP 400 with this message."""


def parse_request(body: Any, *, default_k: float) -> tuple[list[bytes], dict[str, Any]]:
    """(image bytes per row, the choice of sets: k and top_k, or rule and coverage) of an MLflow-style JSON
    request; BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object with dataframe_split or dataframe_records")
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        columns = split.get("columns") or ["image"]
        if "image" not in columns:
            raise BadRequest(f"dataframe_split.columns must name 'image', got {columns}")
        at = columns.index("image")
        values = [row[at] if isinstance(row, list) and len(row) > at else None for row in split.get("data") or []]
    elif "dataframe_records" in body:
        values = [row.get("image") if isinstance(row, dict) else None for row in body["dataframe_records"] or []]
    else:
        raise BadRequest("the request must hold dataframe_split or dataframe_records (the MLflow model's input)")
    if not values:
        raise BadRequest("the request holds no row")
    images, errors = [], []
    for row, value in enumerate(values):
        try:
            if not isinstance(value, str):
                raise BadRequest(f"{type(value).__name__}, not a base64 string")
            images.append(base64.b64decode(value, validate=True))
        except (BadRequest, binascii.Error) as err:
            errors.append(f"row {row}: {err}")
    if errors:
        raise BadRequest("column 'image' must hold base64-encoded images: " + "; ".join(errors[:5]))
    params = body.get("params") or {}
    if params.get("rule") is not None or params.get("coverage") is not None:
        try:
            coverage = None if params.get("coverage") is None else float(params["coverage"])
        except (TypeError, ValueError):
            raise BadRequest(f"params.coverage must be a number, got {params.get('coverage')!r}") from None
        return images, {"rule": str(params["rule"]) if params.get("rule") is not None else None, "coverage": coverage}
    try:
        k = float(params.get("k", default_k))
    except (TypeError, ValueError):
        raise BadRequest(f"params.k must be a number, got {params.get('k')!r}") from None
    return images, {"k": k, "top_k": bool(params.get("top_k", False))}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class LabelSets:
    """One replica: a SetPredictor of the run, scoring the images of concurrent requests together."""

    def __init__(self, run: str, checkpoint: str | None = None, max_batch_size: int = DEFAULT_MAX_BATCH,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> None:
        import ray

        from avgk.inference.predict import SetPredictor
        from pipelines import ray_private

        # Serve binds this replica's gRPC server after this constructor: on the node's address, not "[::]"
        ray_private.bind_serve_replica_grpc_to_node(ray.util.get_node_ip_address())
        self.predictor = SetPredictor.from_run(run, checkpoint, batch_size=max_batch_size)
        calibrated = [float(k) for k in self.predictor.ks]
        loss_k = float(self.predictor.config.loss.k)  # the MLflow model's default K, as log_pyfunc_model sets it
        self.default_k = loss_k if loss_k in calibrated else calibrated[0]
        batcher = cast(Any, self.score_images)  # @serve.batch's wrapper: Ray's types show only the coroutine
        batcher.set_max_batch_size(max_batch_size)
        batcher.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1000)
    async def score_images(self, images: list[Any]) -> list[dict[str, np.ndarray]]:
        """The scores of images from any number of requests, as one batch of the model: per image, each head's
        that a request may choose (the predictor's heads)."""
        scores = self.predictor.score_heads(images)
        return [{head: rows[i] for head, rows in scores.items()} for i in range(len(images))]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path.rstrip("/").endswith("/ping") or request.method == "GET":
            rules: dict[str, list[str]] = {}
            for rule in self.predictor.set_rules:
                rules.setdefault(rule.name, []).append(format_k(rule.coverage))
            return JSONResponse({"status": "ready", "calibrated_k": self.predictor.ks, "set_rules": rules})
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("the request body is not JSON") from None
            encoded, choice = parse_request(body, default_k=self.default_k)
            try:
                self.predictor.rule(**choice)  # an uncalibrated K or rule, a bad top-K: this request's fault
            except ValueError as err:
                raise BadRequest(str(err)) from None
            images = self._decode(encoded)
        except BadRequest as err:
            return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": str(err)}, status_code=400)
        import asyncio

        scores = await asyncio.gather(*(self.score_images(image) for image in images))
        head = self.predictor.head_of(**choice)
        sets = self.predictor.sets_of(np.stack([image_scores[head] for image_scores in scores]), **choice)
        return JSONResponse({"predictions": [{"label_set": json.dumps(s.to_dict())} for s in sets]})

    @staticmethod
    def _decode(encoded: list[bytes]) -> list[Any]:
        from avgk.inference.serving import decode_rows

        errors: list[str] = []
        images = decode_rows(encoded, first_row=0, errors=errors)
        if errors:
            raise BadRequest(f"column 'image' must hold encoded images (PNG, JPEG, ...), {len(errors)} of "
                             f"{len(encoded)} rows do not: {'; '.join(errors[:5])}")
        return images


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application of a run: args run (required), checkpoint, replicas, max_batch_size, batch_wait_ms."""
    unknown = sorted(set(args) - {"run", "checkpoint", "replicas", "max_batch_size", "batch_wait_ms"})
    if unknown or "run" not in args:
        raise ValueError(f"avgk's Serve application takes args run (required), checkpoint, replicas, max_batch_size, "
                         f"batch_wait_ms; got {sorted(args)}")
    replicas = int(args.get("replicas", 1))
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    deployment = cast(Any, LabelSets)  # a serve.Deployment at run time; Ray's decorator types keep the class
    return cast(serve.Application, deployment.options(num_replicas=replicas).bind(
        str(args["run"]), args.get("checkpoint"), int(args.get("max_batch_size", DEFAULT_MAX_BATCH)),
        float(args.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS))))


def run_serve(*, run: str, checkpoint: str | None = None, replicas: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH,
              batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, host: str = "127.0.0.1", port: int = 8000,
              log: Callable[[str], None] = say, stop: threading.Event | None = None) -> None:
    """Serve the run until Ctrl-C or SIGTERM (or `stop`), then shut Serve down."""
    from avgk.records.runs import resolve_checkpoint, saved_run_config
    from avgk.runtime import storage
    from pipelines import job, ray_env

    for name, value in (("--replicas", replicas), ("--max-batch-size", max_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if batch_wait_ms < 0:
        raise ValueError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    if port < 0 or port > 65535:
        raise ValueError(f"--port must be a port number (0: a free one), got {port}")
    # Before a cluster starts: a second `avgk serve` on one port of this machine (a joined cluster's head is elsewhere).
    if port and not os.environ.get("RAY_ADDRESS") and ray_env.free_port(port) != port:
        raise ValueError(f"--port {port} is in use on this machine (another avgk serve?): choose another --port, "
                         "or 0 for a free one")
    run = storage.absolute(run)
    saved = saved_run_config(run)
    resolve_checkpoint(run, checkpoint, default=saved.eval.checkpoint if saved else "best")  # a bad run: one line now
    if not storage.exists(storage.join(run, "thresholds.json")):
        raise FileNotFoundError(f"no thresholds.json in run directory {run}: evaluate it first")
    port = ray_env.free_port(port) if port == 0 else port
    job.join_cluster(cpus=replicas + 1)
    serve.start(http_options={"host": host, "port": port})
    app = build_app({"run": run, "checkpoint": checkpoint, "replicas": replicas, "max_batch_size": max_batch_size,
                     "batch_wait_ms": batch_wait_ms})
    serve.run(app, name="avgk", route_prefix="/", blocking=False)
    log(f"serving {run} with {replicas} replica(s), batches of up to {max_batch_size} images within {batch_wait_ms:g} ms: "
        f"POST http://{host}:{port}/invocations (GET /ping); Ctrl-C to stop")
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):  # Ctrl-C, and SIGTERM through the CLI's handler, raise KeyboardInterrupt here
            pass
    finally:
        serve.shutdown()
        log("avgk serve: stopped")
