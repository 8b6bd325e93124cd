"""Every private Ray name the project uses, in one place (ray pinned to 2.60.x in pyproject.toml).

Each wrapper names the public alternative, or says that there is none as of ray 2.60 and what using
it instead would lose. A Ray upgrade re-reads this module; nothing else in the project (avgk/,
pipelines/, benchmarks/, tests/) imports `ray._private`, a `_internal` package or an underscored Ray
name (ruff's PLC2701 checks it everywhere but here).

Replaced by public API, so no longer here: the session folder of the local cluster
(`ray._private.worker._global_node.get_session_dir_path()`, now RuntimeContext.get_temp_dir() joined
with RuntimeContext.get_session_name() in pipelines.ray_env).

Importing this module costs no more than `import ray`: every private module is imported on first
use, Ray Train's included (`TorchBackend` through the module `__getattr__` below), so that
pipelines.ray_env, which every command imports, does not pull in Ray Train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # BaseWorkerGroup: what Ray's Backend.on_start/on_shutdown receive (ray.train.backend.Backend, a
    # DeveloperAPI, names it in its signatures), for annotations only; no public module exports it.
    from ray.train._internal.base_worker_group import BaseWorkerGroup
    from ray.train.torch.config import _TorchBackend as TorchBackend  # at run time: __getattr__ below

__all__ = [
    "TOKEN_SETUP_LOGGER",
    "BaseWorkerGroup",
    "TorchBackend",
    "bind_serve_replica_grpc_to_node",
    "filter_worker_output",
    "is_v1_worker_group",
    "object_store_stats_reader",
    "prepare_cluster_config",
    "propagate_env_var_to_train",
    "set_torch_distributed_env_vars",
    "set_train_context_log_level",
    "setup_torch_process_group",
    "validate_cluster_config",
]


def __getattr__(name: str) -> Any:
    """`TorchBackend`: ray.train.torch.config._TorchBackend, Ray Train's backend for TorchConfig, imported
    on first use (PEP 562).

    pipelines.process_group subclasses it to start the rendezvous store itself and otherwise keep
    everything Ray's torch backend does (on_shutdown, on_training_start, share_cuda_visible_devices,
    the TPU set-up). Public alternative: none as of ray 2.60. `ray.train.backend.Backend` and
    `BackendConfig` are public (DeveloperAPI), but a Backend built on them alone would re-implement
    Ray's process-group set-up and teardown, LOCAL_RANK and the other torch.distributed variables,
    and the CUDA device sharing, and drift from them at each Ray release.
    """
    if name == "TorchBackend":
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- Ray Train's torch process group


def is_v1_worker_group(worker_group: object) -> bool:
    """Whether a backend's worker group is Ray Train v1's (ray.train._internal.worker_group.WorkerGroup).

    Ray's own torch backend sets LOCAL_RANK and the rest only on v2 groups (v1 sets them itself);
    pipelines.process_group does the same. Public alternative: none as of ray 2.60 (neither worker
    group class is public); without the check, v1 groups would get the variables twice.
    """
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

    return isinstance(worker_group, V1WorkerGroup)


def set_torch_distributed_env_vars() -> None:
    """On a Train worker: LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, RANK, WORLD_SIZE and
    ACCELERATE_TORCH_DEVICE, as ray.train.torch.config._set_torch_distributed_env_vars sets them.

    Public alternative: ray.train.get_context() (public) gives every value; writing the variables
    from it here would copy Ray's list and miss what a later Ray adds to it.
    """
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def setup_torch_process_group(*, backend: str, world_rank: int, world_size: int, init_method: str,
                              timeout_s: int) -> None:
    """On a Train worker: torch.distributed.init_process_group as Ray's torch backend calls it
    (ray.train.torch.config._setup_torch_process_group: NCCL's async error handling, the device, the
    timeout).

    Public alternative: torch.distributed.init_process_group itself, losing Ray's NCCL settings
    (TORCH_NCCL_ASYNC_ERROR_HANDLING and the rest) unless they are copied.
    """
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                               init_method=init_method, timeout_s=timeout_s)


def set_train_context_log_level(level: int) -> None:
    """The level of Ray Train v2's worker-context logger (ray.train.v2._internal.execution.context.logger),
    which logs every report at INFO.

    That logger is named by its file path (`logging.getLogger(__file__)`), outside the `ray.train`
    hierarchy, so `logging.getLogger("ray.train").setLevel` does not reach it. Public alternative: none
    as of ray 2.60 (RunConfig's LoggingConfig sets the level of Train's own log files, not this logger).
    A Ray that renamed or moved it gets its INFO lines back on the console, nothing worse.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(level)


def propagate_env_var_to_train(name: str) -> None:
    """Have Ray Train copy the driver's environment variable `name` to its controller actor (and the
    controller's child actors) as it does its own: ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE.

    Public alternative: none as of ray 2.60. The controller's runtime_env is built from that set only,
    and a job-wide runtime_env cannot name the local cluster's address before ray.init has started it.
    """
    from ray.train.v2._internal import constants

    constants.ENV_VARS_TO_PROPAGATE.add(name)


# ---------------------------------------------------------------- the driver's console


TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's notice that token authentication is on (the name of a private module).
Public alternative: none (ray.init's logging_level is the `ray` logger's, and the notice is wanted
quiet without hiding Ray's other warnings); a renamed module prints the notice again."""


def filter_worker_output(keep_line: Callable[[str], bool]) -> None:
    """Print on the driver's console only the lines of the workers' output (log_to_driver) that
    `keep_line` keeps; Ray's log files keep everything.

    Replaces the "ray_print_logs" handler of ray._private.worker's stdstream dispatcher with a filter
    in front of Ray's own printer (worker.print_to_stdstream). A Ray that moved the hook prints every
    line rather than failing. Public alternative: ray.init(log_to_driver=False), which drops all of
    the workers' output, the training progress with it; none filters lines as of ray 2.60.
    """
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        ignore_prefix = worker._should_ignore_worker_log_prefix(worker.global_worker)
    except (ImportError, AttributeError):
        return

    def print_filtered(data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", []) if keep_line(line)]
        if lines:
            worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_filtered)


# ---------------------------------------------------------------- benchmarks and tests only


def object_store_stats_reader(gcs_address: str) -> Callable[[], Any]:
    """A function returning the object store's counters of the cluster at `gcs_address` (bytes in use,
    spilled and restored: ray._private.internal_api.get_memory_info_reply(...).store_stats), for
    benchmarks/bench_top_scores.py.

    Public alternative: `ray memory --stats-only` (the same numbers, as text, one process per
    reading), or the Prometheus metrics of the metrics export port (ray_object_store_memory, the
    spill counters) when metrics export is set up; neither reads in-process every 0.1 s.
    """
    from ray._private import internal_api

    state = internal_api.get_state_from_address(gcs_address)
    return lambda: internal_api.get_memory_info_reply(state).store_stats


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster YAML's config with its provider's defaults merged in, as `ray up` prepares it
    (ray.autoscaler._private.util.prepare_config), for tests/integration/test_infra.py.

    Public alternative: `ray up` itself, which prepares and validates and then starts the cluster;
    ray/autoscaler/ray-schema.json with jsonschema checks the schema only, without the defaults.
    """
    from ray.autoscaler._private.util import prepare_config

    prepared: dict[str, Any] = prepare_config(config)
    return prepared


def validate_cluster_config(config: dict[str, Any]) -> None:
    """What `ray up` checks of a prepared cluster config before it touches the cloud
    (ray.autoscaler._private.util.validate_config: the schema and the node types' consistency).

    Public alternative: `ray up` itself; the schema alone, ray/autoscaler/ray-schema.json with
    jsonschema, misses the checks across fields.
    """
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


# ---------------------------------------------------------------- Ray Serve's replica


def bind_serve_replica_grpc_to_node(node_address: str) -> None:
    """In a Serve replica, before it finishes starting: its inter-deployment gRPC server binds the node's
    address (127.0.0.1 on a local cluster) instead of "[::]:0", every interface.

    Ray 2.60's replica (ray.serve._private.replica) binds that server with a hard-coded "[::]:0"
    through the name `add_port_to_grpc_server` it imports from ray._common.tls_utils; this rebinds
    the name in the replica module so that the address becomes `<node_address>:0`, the address the
    node's other Ray services use (other nodes still reach it; nothing listens on other interfaces).
    Public alternative: none as of ray 2.60 (no option or environment variable sets that address).
    """
    from ray.serve._private import replica

    module: Any = replica  # the name is the module's import, not part of its interface
    bind: Callable[[Any, str], int] = module.add_port_to_grpc_server
    if getattr(bind, "__avgk_node_address__", None) == node_address:
        return

    def on_node_address(server: Any, address: str) -> int:
        return bind(server, f"{node_address}:0" if address == "[::]:0" else address)

    setattr(on_node_address, "__avgk_node_address__", node_address)  # noqa: B010  # marks the wrapper
    module.add_port_to_grpc_server = on_node_address
