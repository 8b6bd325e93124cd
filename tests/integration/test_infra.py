"""infra/ is well-formed, checked against the tools that read it (no Docker, cloud or cluster here).

- infra/ray/cluster.yaml against the cluster schema that ships inside the ray package, and Ray's own
  `ray up` validation;
- the KubeRay manifests: API, kinds, head and worker groups, GPUs, and an entrypoint that the real
  `avgk` argument parser and config loader accept once the submitter's shell has expanded it;
- the runbook's `avgk` commands, the same way;
- infra/mlflow: the compose file, the server entrypoint against MLflow's own option parser and
  auth-config reader, the server's MLflow pin against pyproject.toml;
- infra/docker/Dockerfile against pyproject.toml, and .dockerignore against the Dockerfile;
- infra/sync_data.py on local folders;
- infra/argo: the exported workflow of configs/pipelines/plantnet300k.yaml against Argo's schema
  (hera's models), equal to a fresh export, each stage's RayJob checked like the KubeRay files.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from avgk.config import load_config
from pipelines.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PLACEHOLDERS = ("registry.example.com", "my-avgk-bucket", "mlflow.example.com", "123456789012", "us-west-2")
# Variables that Ray or the shell define, not the env files.
PROVIDED_VARS = {"RAY_HEAD_IP", "HOME", "PATH"}


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _requirement(name: str) -> Requirement:
    for item in PYPROJECT["project"]["dependencies"]:
        req = Requirement(item)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=value"
            values[key] = value
    return values


def _shell_words(command: str, env: dict[str, str]) -> list[str]:
    """The argv a POSIX shell makes of `command` (expansion, quoting, word splitting) under `env`."""
    proc = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {command}"],
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=30, check=True,
    )
    return proc.stdout.split("\0")[:-1]


def _check_avgk_command(argv: list[str]) -> object:
    """Parse argv like the `avgk` console script does, then load its config with its overrides."""
    assert argv[0] == "avgk", argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv[1:])
    assert all("=" in item and not item.startswith("-") for item in extra), f"unrecognized arguments {extra}"
    overrides = [*getattr(args, "overrides", []), *extra]
    assert args.config, argv
    config_path = ROOT / args.config
    assert config_path.is_file(), f"{args.config} must exist relative to the repository root (and /app in the image)"
    if args.verb == "pipeline":  # a pipeline spec: every stage's config starts from its base
        from avgk.experiments.pipeline_plan import load_pipeline

        return args, load_pipeline(config_path, overrides).base
    return args, load_config(config_path, overrides)


# ---------------------------------------------------------------- ray up -------------------------


def _cluster() -> dict:
    return _yaml(INFRA / "ray" / "cluster.yaml")


def test_cluster_yaml_validates_against_the_schema_in_the_ray_package():
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(_cluster(), json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_ray_ups_own_validation():
    """What `ray up` does before touching the cloud: merge the provider's defaults, then validate."""
    from pipelines.ray_private import prepare_cluster_config, validate_cluster_config

    config = prepare_cluster_config(copy.deepcopy(_cluster()))
    validate_cluster_config(config)
    assert config["provider"]["type"] == "aws"


def test_cluster_yaml_has_a_cpu_head_and_an_autoscaling_gpu_group():
    config = _cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu_groups = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_groups, "no GPU worker type"
    for name, group in gpu_groups.items():
        assert group.get("min_workers", 0) < group["max_workers"] <= config["max_workers"], name
        # plantnet300k.yaml gives each GPU worker train.cpus_per_worker CPUs for decoding.
        plantnet = load_config(ROOT / "configs" / "plantnet300k.yaml")
        assert group["resources"]["CPU"] >= group["resources"]["GPU"] * plantnet.train.cpus_per_worker, name
    assert config["docker"]["image"] == _kuberay_image()


def test_cluster_yaml_reads_only_settings_its_env_file_declares():
    config = _cluster()
    env = _env_file(INFRA / "ray" / "avgk.env.example")
    commands = " ".join(
        config[key] if isinstance(config[key], str) else " ".join(config[key])
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                    "head_start_ray_commands", "worker_start_ray_commands")
    )
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", commands)) - PROVIDED_VARS
    assert used and used <= set(env), f"not in avgk.env.example: {sorted(used - set(env))}"
    assert "~/avgk.env" in config["file_mounts"] and config["file_mounts"]["~/avgk.env"] == "infra/ray/avgk.env"
    assert "avgk.env" in (INFRA / "ray" / ".gitignore").read_text().split()
    # Every node sources the file before `ray start`, so drivers and workers inherit it.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.index(". ~/avgk.env") < start.index("ray start"), key
    assert "/app/infra/sync_data.py" in commands and (ROOT / "infra" / "sync_data.py").is_file()


def test_runtime_env_leaves_out_repository_weight_and_secrets():
    runtime_env = _yaml(INFRA / "ray" / "runtime_env.yaml")
    assert set(runtime_env) == {"excludes"}, "working_dir comes from --working-dir; env_vars would clash"
    assert {".git", ".venv", "data", "runs", "mlruns"} <= set(runtime_env["excludes"])


# ---------------------------------------------------------------- KubeRay ------------------------


def _kuberay(name: str) -> dict:
    return _yaml(INFRA / "kuberay" / name)


def _kuberay_image() -> str:
    return _kuberay("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _config_map() -> dict[str, str]:
    doc = _kuberay("config.yaml")
    assert doc["apiVersion"] == "v1" and doc["kind"] == "ConfigMap"
    return doc["data"]


def _cluster_specs():
    yield "raycluster.yaml", _kuberay("raycluster.yaml")["spec"]
    yield "rayjob.yaml", _kuberay("rayjob.yaml")["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
                                       ("rayservice.yaml", "RayService")])
def test_kuberay_manifest_kind_and_metadata(name, kind):
    doc = _kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("name,spec", list(_cluster_specs()))
def test_kuberay_cluster_spec_has_head_and_gpu_worker_groups(name, spec):
    import ray

    assert spec["rayVersion"] == ray.__version__, "the image's Ray (pyproject.toml) and the CR must agree"
    config_map = _config_map()
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    pods = [("head", head["template"]["spec"])]
    assert spec["workerGroupSpecs"], f"{name}: no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0
        assert isinstance(group["rayStartParams"], dict)
        pods.append((group["groupName"], group["template"]["spec"]))
    gpus = []
    for pod_name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        mounts = {v["name"] for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["image"] == _kuberay_image(), f"{name}/{pod_name}: one image everywhere"
            refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
            assert {"avgk-config", "avgk-secrets"} <= refs, f"{name}/{pod_name}/{container['name']}"
            assert {m["name"] for m in container.get("volumeMounts", [])} <= mounts
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], f"{name}/{pod_name}: Guaranteed QoS"
        gpus.append(int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)))
        if pod_name != "head":
            assert any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])
    assert gpus[0] == 0 and max(gpus[1:]) > 0, f"{name}: GPUs belong to the worker group only"
    assert "AVGK_WEIGHTS_URI" in config_map


def test_rayjob_runs_on_the_same_cluster_spec_as_raycluster():
    assert _kuberay("rayjob.yaml")["spec"]["rayClusterSpec"] == _kuberay("raycluster.yaml")["spec"]


def test_rayjob_entrypoint_is_accepted_by_the_cli():
    job = _kuberay("rayjob.yaml")["spec"]
    config_map = _config_map()
    # The submitter pod's shell expands the entrypoint with avgk-config in its environment.
    submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
    assert "command" not in submitter, "KubeRay fills in `ray job submit`"
    assert {"name": "avgk-config"} in [ref.get("configMapRef") for ref in submitter["envFrom"]]
    argv = _shell_words(job["entrypoint"], config_map)
    assert argv[:3] == ["avgk", "train", "configs/plantnet300k.yaml"]
    # `ray job submit -- ARGV` re-quotes the words (shlex.join); the head's shell splits them back.
    assert shlex.split(shlex.join(argv)) == argv
    args, config = _check_avgk_command(argv)
    assert args.verb == "train"
    assert config.run.storage == config_map["AVGK_RUN_STORAGE"]
    assert config.data.shards == config_map["AVGK_SHARDS"]
    assert config.model.pretrained == config_map["AVGK_PRETRAINED"]
    assert config.train.use_gpu
    # The job's ranks fit the worker group.
    group = job["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert config.train.num_workers <= int(pod["nvidia.com/gpu"]) * group["maxReplicas"]
    assert config.train.num_workers * config.train.cpus_per_worker <= float(pod["cpu"]) * group["maxReplicas"]
    # The driver runs in /app, where the image holds configs/ (see the Dockerfile tests).
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/app"}
    # Without pretrained weights the same entrypoint trains from scratch.
    argv = _shell_words(job["entrypoint"], {**config_map, "AVGK_PRETRAINED": ""})
    assert _check_avgk_command(argv)[1].model.pretrained is None


def test_rayservice_serve_config_validates_and_builds_avgks_application():
    """serveConfigV2 against the installed Ray's own schema; its import path and args build the app."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    doc = _kuberay("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    build = getattr(importlib.import_module(module), name)
    assert app.args["run"].startswith(_config_map()["AVGK_RUN_STORAGE"])  # the runs the cluster trains
    built = build(app.args)  # binds only: the replicas load the run when they start
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="args run \\(required\\)"):
        build({"replicas": 2})
    cluster = doc["spec"]["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas on the workers
    for pod in [cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["image"] == _kuberay_image()
            refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
            assert {"avgk-config", "avgk-secrets"} <= refs


def test_the_runbooks_avgk_commands_are_accepted_by_the_cli():
    """Every `avgk ...` command of infra/README.md, expanded with the example settings, parses and loads."""
    text = (INFRA / "README.md").read_text()
    env = {k: v for k, v in _env_file(INFRA / "ray" / "avgk.env.example").items()}
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            line = re.sub(r"\s+>\s*\S+$", "", line)  # `avgk ... > workflow.yaml`: the command, not its output file
            if " -- avgk " in line:
                commands.append(line.split(" -- ", 1)[1])
            elif line.startswith("avgk "):
                commands.append(line)
    assert sum(" -- avgk " in b.replace("\\\n", " ") for b in blocks) >= 2, "submit commands went missing"
    verbs = set()
    for command in commands:
        argv = _shell_words(command, env)
        args, config = _check_avgk_command(argv)
        verbs.add(args.verb)
        if args.verb != "prepare":
            assert config.run.storage == env["AVGK_RUN_STORAGE"] and config.data.shards == env["AVGK_SHARDS"]
    assert {"prepare", "train", "evaluate", "pseudolabel", "pipeline"} <= verbs


def test_every_placeholder_is_named_in_the_runbook():
    runbook = (INFRA / "README.md").read_text()
    texts = [p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".example", ""}]
    for placeholder in PLACEHOLDERS:
        if any(placeholder in t for t in texts):
            assert placeholder in runbook, placeholder


# ---------------------------------------------------------------- MLflow server ------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$), recursively."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        current = env.get(name)
        if op in (":?", "?") and not current:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not current:
            return arg
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def _compose() -> dict:
    return _yaml(INFRA / "mlflow" / "compose.yaml")


def _compose_env() -> dict[str, str]:
    """.env.example with every empty secret filled in."""
    return {
        k: v or (f"secret-{k.lower()}" if re.search(r"PASSWORD|SECRET|KEY", k) else v)
        for k, v in _env_file(INFRA / "mlflow" / ".env.example").items()
    }


def test_compose_file_parses_and_wires_the_services():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    assert set(compose["volumes"]) == {"postgres-data", "minio-data"}
    text = (INFRA / "mlflow" / "compose.yaml").read_text()
    referenced = {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(1)}
    declared = set(_env_file(INFRA / "mlflow" / ".env.example"))
    assert referenced - {"MINIO_IMAGE"} <= declared, f"not in .env.example: {sorted(referenced - declared)}"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _interpolate(compose, {})  # secrets are required, never defaulted
    resolved = _interpolate(compose, _compose_env())
    mlflow = resolved["services"]["mlflow"]
    assert mlflow["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert resolved["services"]["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert all("healthcheck" in resolved["services"][s] for s in ("postgres", "minio", "mlflow"))
    assert mlflow["ports"] == ["127.0.0.1:5000:5000"], "published on loopback unless told otherwise"
    assert all(p.startswith("127.0.0.1:") for p in resolved["services"]["minio"]["ports"])
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert (INFRA / "mlflow" / mlflow["build"] / "Dockerfile").is_file()
    initdb = resolved["services"]["postgres"]["volumes"][1].split(":")[0]
    assert f"CREATE DATABASE {mlflow['environment']['MLFLOW_AUTH_DB']};" in (INFRA / "mlflow" / initdb).read_text()
    # No secret is written in the file: every password, secret or key is a ${...} reference.
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}", str(value)), f"{key} must be a required ${{VAR:?}}"
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()


def test_mlflow_server_image_pins_an_mlflow_the_clients_accept():
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    pins = re.findall(r"mlflow\[auth\]==([0-9][0-9.]*)", dockerfile)
    assert len(pins) == 1, "pin mlflow[auth]==X.Y.Z once"
    assert Version(pins[0]) in _requirement("mlflow").specifier
    assert "psycopg2" in dockerfile and "boto3" in dockerfile
    assert _dockerfile_user(_instructions(dockerfile)) not in {None, "0", "root"}


def _serve():
    spec = importlib.util.spec_from_file_location("avgk_mlflow_serve", INFRA / "mlflow" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlflow_auth_config_reader():
    # mlflow.server.auth's package __init__ needs Flask-WTF (the server image has it, the client
    # venv does not); its config reader alone needs only mlflow, so load that file directly.
    path = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_auth_config


def test_mlflow_serve_builds_a_command_and_auth_config_mlflow_accepts(tmp_path, monkeypatch):
    from mlflow.cli import server as mlflow_server_command

    serve = _serve()
    compose_env = _interpolate(_compose(), _compose_env())["services"]["mlflow"]["environment"]
    env = {k: str(v) for k, v in compose_env.items()}
    env["POSTGRES_PASSWORD"] = "p@ss:w/rd%1 #x"  # survives URI encoding and configparser
    env["MLFLOW_ALLOWED_HOSTS"] = "mlflow.example.com"
    argv, extra = serve.server_command(env)
    assert argv[:2] == ["mlflow", "server"]
    assert env["POSTGRES_PASSWORD"] not in " ".join(argv), "no secret on the command line"
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    ctx = mlflow_server_command.make_context("server", argv[2:])
    params = ctx.params
    assert params["app_name"] == "basic-auth"
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == env["MLFLOW_ARTIFACTS_DESTINATION"]
    assert params["host"] == "0.0.0.0" and int(params["port"]) == serve.PORT
    assert params["allowed_hosts"] == "mlflow.example.com"
    backend = urlsplit(params["backend_store_uri"])
    assert backend.scheme == "postgresql" and backend.path == "/mlflow" and backend.hostname == "postgres"
    assert unquote(backend.password) == env["POSTGRES_PASSWORD"]

    ini = tmp_path / "basic_auth.ini"
    ini.write_text(serve.auth_config(env))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", env["MLFLOW_AUTH_ADMIN_USERNAME"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    auth = _mlflow_auth_config_reader()()
    users = urlsplit(auth.database_uri)
    assert users.scheme == "postgresql" and users.path == "/mlflow_auth"
    assert unquote(users.password) == env["POSTGRES_PASSWORD"]
    assert auth.default_permission == "READ"
    assert auth.admin_password == env["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_mlflow_serve_refuses_to_start_without_its_secrets(monkeypatch, capsys):
    serve = _serve()
    for name in serve.REQUIRED:
        monkeypatch.delenv(name, raising=False)
    assert serve.main([]) == 2
    assert "POSTGRES_PASSWORD" in capsys.readouterr().err


# ---------------------------------------------------------------- the image ---------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _dockerfile_user(instructions) -> str | None:
    users = [args for word, args in instructions if word == "USER"]
    return users[-1] if users else None


def _image_dockerfile():
    return _instructions((INFRA / "docker" / "Dockerfile").read_text())


def _copies(instructions) -> list[tuple[str, str]]:
    """(source, destination in the image) of every COPY from the build context."""
    workdir = "/"
    out = []
    for word, args in instructions:
        if word == "WORKDIR":
            workdir = args if args.startswith("/") else f"{workdir.rstrip('/')}/{args}"
        elif word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *sources, dest = parts
            base = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.removeprefix('./')}"
            for source in sources:
                target = base.rstrip("/") + "/" + Path(source).name if dest.endswith("/") else base
                out.append((source, target.replace("//", "/")))
    return out


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, |), each as words; quotes respected."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def test_dockerfile_base_is_a_cuda_pytorch_that_pyproject_allows():
    instructions = _image_dockerfile()
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    base = instructions[0][1].split("=", 1)[1]
    assert [args for word, args in instructions if word == "FROM"] == ["${BASE_IMAGE}"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)", base)
    assert match, f"{base} is not a CUDA build of the official PyTorch image"
    assert Version(match.group(1)) in _requirement("torch").specifier


def test_dockerfile_installs_the_project_so_every_declared_dependency_comes_with_it():
    instructions = _image_dockerfile()
    copies = dict(_copies(instructions))
    project_dir = str(Path(copies["pyproject.toml"]).parent)
    # Everything setuptools needs to build the project is in the project directory.
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    needed += [pattern.rstrip("*").rstrip(".") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for path in needed:
        assert path in copies and copies[path] == f"{project_dir}/{path}", f"COPY {path} into {project_dir}"
    # Jobs name configs relative to the working directory (the RayJob's working_dir is /app).
    assert copies.get("configs") == f"{project_dir}/configs" and project_dir == "/app"

    installs = []
    for index, (word, args) in enumerate(instructions):
        if word != "RUN":
            continue
        for tokens in _shell_commands(args):
            if tokens[:2] in (["pip", "install"], ["pip3", "install"]) or tokens[:4] == ["python", "-m", "pip", "install"]:
                installs.append((index, tokens[tokens.index("install") + 1:]))
    assert len(installs) == 1, "one pip install: the project's"
    index, tokens = installs[0]
    with_value = {"-c", "--constraint"}
    forbidden = {"--no-deps", "--ignore-requires-python", "-r", "--requirement", "-e", "--editable", "--no-build-isolation"}
    targets, skip = [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        assert token not in forbidden, f"pip install {token}: the project must resolve its own dependencies"
        if token in with_value:
            skip = True
        elif not token.startswith("-"):
            targets.append(token)
    assert len(targets) == 1, targets
    target, _, extras = targets[0].partition("[")
    assert target in {project_dir, ".", "./"}, f"pip install {targets[0]} is not the project directory"
    for extra in filter(None, extras.rstrip("]").split(",")):
        assert extra in PYPROJECT["project"].get("optional-dependencies", {}), extra
    copy_indices = [i for i, (word, _) in enumerate(instructions) if word == "COPY"]
    assert max(copy_indices) < index, "the install sees every copied file"
    run = instructions[index][1]
    assert "avgk --help" in run, "the build proves the console script works"
    assert "torch.version.cuda" in run, "the build proves torch kept its CUDA build"


def test_dockerfile_runs_as_a_non_root_user():
    instructions = _image_dockerfile()
    user = _dockerfile_user(instructions)
    assert user is not None and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, (
        "a numeric non-root USER (Kubernetes verifies runAsNonRoot against it)"
    )
    last_user = max(i for i, (word, _) in enumerate(instructions) if word == "USER")
    assert all(word != "RUN" for word, _ in instructions[last_user:]), "nothing runs as root after USER"
    pods = [spec["headGroupSpec"]["template"]["spec"] for _, spec in _cluster_specs()]
    assert all(str(pod["securityContext"]["runAsUser"]) == user for pod in pods)


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, pattern in _dockerignore_patterns():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_image_copies_and_nothing_secret():
    for source, _ in _copies(_image_dockerfile()):
        probe = f"{source}/__init__.py" if (ROOT / source).is_dir() else source
        assert not _dockerignored(source) and not _dockerignored(probe), f"{source} is copied but ignored"
    for path in (".venv/bin/python", "data/plantnet300k/manifest.json", "runs/demo/config.yaml", ".git/config",
                 "mlruns/0/meta.yaml", "infra/ray/avgk.env", "infra/mlflow/.env", "avgk/__pycache__/x.pyc",
                 "tests/unit/test_infra.py", "mlflow.db"):
        assert _dockerignored(path), f"{path} would reach the build context"


# ---------------------------------------------------------------- sync_data ---------------------


def _sync_module():
    spec = importlib.util.spec_from_file_location("avgk_sync_data", INFRA / "sync_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_data_copies_what_is_missing_or_changed(tmp_path):
    sync = _sync_module().sync
    source = tmp_path / "bucket" / "shards"
    (source / "train").mkdir(parents=True)
    (source / "train" / "shard-000000.tar").write_bytes(b"a" * 10)
    (source / "train" / "shard-000001.tar").write_bytes(b"b" * 20)
    (source / "manifest.json").write_text("{}")
    destination = tmp_path / "node" / "data"
    copied = sync(str(source), str(destination), threads=2)
    assert sorted(copied) == ["manifest.json", "train/shard-000000.tar", "train/shard-000001.tar"]
    assert copied[-1] == "manifest.json", "the manifest lands last"
    assert (destination / "train" / "shard-000001.tar").read_bytes() == b"b" * 20
    assert sync(str(source), str(destination)) == []
    (source / "train" / "shard-000001.tar").write_bytes(b"c" * 21)
    assert sync(str(source), str(destination)) == ["train/shard-000001.tar"]
    with pytest.raises(FileNotFoundError):
        sync(str(tmp_path / "absent"), str(destination))


def test_sync_data_command_line(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.pth").write_bytes(b"w")
    proc = subprocess.run(
        [sys.executable, str(INFRA / "sync_data.py"), str(source), str(tmp_path / "dst")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 file(s) copied" in proc.stdout and (tmp_path / "dst" / "w.pth").read_bytes() == b"w"


def test_the_wheel_carries_the_packages_and_the_configs(tmp_path):
    """`pip install avgk` outside a checkout gets configs/ (under <prefix>/share/avgk/configs)."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("avgk", "pipelines", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("avgk-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = next(n.split("/data/")[0] for n in names if ".data/data/" in n)
    shipped = {n.removeprefix(f"{data}/data/share/avgk/") for n in names if n.startswith(f"{data}/data/share/avgk/")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == expected
    assert {"avgk/config/__init__.py", "avgk/config/run.py", "avgk/training/engine.py", "pipelines/cli.py"} <= names


# ---------------------------------------------------------------- Argo Workflows -------------------------

ARGO_SPEC = "configs/pipelines/plantnet300k.yaml"


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", *args, "--export", "argo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exported_workflow() -> dict:
    """`avgk pipeline configs/pipelines/plantnet300k.yaml --export argo`, as a user runs it."""
    proc = _export(ARGO_SPEC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "an Argo Workflow of 7 stage(s)" in proc.stderr
    return yaml.safe_load(proc.stdout)


def _stage_jobs(workflow: dict) -> dict[str, dict]:
    return {t["name"].removeprefix("stage-"): yaml.safe_load(t["resource"]["manifest"])
            for t in workflow["spec"]["templates"] if "resource" in t}


def test_the_committed_argo_workflow_is_the_export_of_its_spec(exported_workflow):
    """infra/argo/plantnet300k-workflow.yaml is regenerated by the command in its header, not edited."""
    committed = _yaml(INFRA / "argo" / "plantnet300k-workflow.yaml")
    assert committed == exported_workflow, "regenerate it: the command in its header"


def test_the_exported_workflow_is_valid_argo_and_mirrors_the_graph(exported_workflow):
    from hera.workflows.models import Workflow

    from avgk.experiments.pipeline_plan import load_pipeline

    Workflow.model_validate(exported_workflow)  # Argo's schema, as hera models it: raises on any bad field
    spec = exported_workflow["spec"]
    assert exported_workflow["kind"] == "Workflow" and spec["entrypoint"] == "pipeline"
    plan = load_pipeline(ROOT / ARGO_SPEC)
    assert spec["parallelism"] == plan.spec.max_concurrent
    (dag,) = [t["dag"] for t in spec["templates"] if t["name"] == "pipeline"]
    tasks = {t["name"]: t for t in dag["tasks"]}
    assert list(tasks) == plan.stage_order
    for stage in plan.stage_order:
        needs = plan.spec.stages[stage].needs
        assert tasks[stage].get("depends", "") == " && ".join(needs), stage
        assert tasks[stage]["template"] == f"stage-{stage}"
    # the steps' service account may create and watch RayJobs (infra/argo/rbac.yaml), and report to Argo
    docs = {d["kind"]: d for d in yaml.safe_load_all((INFRA / "argo" / "rbac.yaml").read_text())}
    assert docs["ServiceAccount"]["metadata"]["name"] == spec["serviceAccountName"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": spec["serviceAccountName"]} in binding["subjects"]
    rules = docs["Role"]["rules"]
    rayjobs = next(r for r in rules if "rayjobs" in r["resources"])
    assert rayjobs["apiGroups"] == ["ray.io"] and {"create", "get", "watch"} <= set(rayjobs["verbs"])
    assert any("workflowtaskresults" in r["resources"] and "create" in r["verbs"] for r in rules)


def test_each_stage_is_a_rayjob_on_the_clusters_spec_running_that_stage(exported_workflow):
    template = _kuberay("rayjob.yaml")
    for stage, job in _stage_jobs(exported_workflow).items():
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
        assert "name" not in job["metadata"] and job["metadata"]["generateName"].endswith(f"-{stage}-")
        assert job["spec"]["rayClusterSpec"] == _kuberay("raycluster.yaml")["spec"]
        assert {k: v for k, v in job["spec"].items() if k != "entrypoint"} == \
            {k: v for k, v in template["spec"].items() if k != "entrypoint"}
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv == ["avgk", "pipeline", ARGO_SPEC, "--only", stage]
        args = build_parser().parse_args(argv[1:])
        assert args.verb == "pipeline" and args.only == stage and (ROOT / args.config).is_file()
    step = next(t for t in exported_workflow["spec"]["templates"] if "resource" in t)
    assert step["resource"]["successCondition"] == "status.jobStatus == SUCCEEDED"
    assert step["resource"]["failureCondition"] == "status.jobStatus == FAILED"
    assert step["resource"]["setOwnerReference"] is True and step["retryStrategy"]["limit"] >= 1


def test_a_changed_spec_changes_the_workflow(tmp_path, exported_workflow):
    """A new stage and a spec override: the export follows the spec, not a copy of it."""
    spec = yaml.safe_load((ROOT / ARGO_SPEC).read_text())
    spec["base"] = str(ROOT / "configs" / "plantnet300k.yaml")
    spec["stages"]["tune"]["with"]["sweep"] = str(ROOT / "configs" / "sweeps" / "plantnet300k-protocol.yaml")
    spec["stages"]["evaluate_last"] = {"verb": "evaluate", "needs": ["train"], "with": {"checkpoint": "last"},
                                       "matrix": spec["stages"]["evaluate"]["matrix"]}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    proc = _export(str(changed), "max_concurrent=2", "train.lr=0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    workflow = yaml.safe_load(proc.stdout)
    assert workflow != exported_workflow and workflow["spec"]["parallelism"] == 2
    jobs = _stage_jobs(workflow)
    assert set(jobs) == set(_stage_jobs(exported_workflow)) | {"evaluate-last"}
    argv = shlex.split(jobs["evaluate-last"]["spec"]["entrypoint"])
    assert argv == ["avgk", "pipeline", str(changed), "--only", "evaluate_last", "max_concurrent=2", "train.lr=0.01"]
    (dag,) = [t["dag"] for t in workflow["spec"]["templates"] if t["name"] == "pipeline"]
    assert {t["name"]: t.get("depends") for t in dag["tasks"]}["evaluate-last"] == "train"


@pytest.mark.parametrize("args, message", [
    (["configs/pipelines/demo.yaml"], "run.storage='runs' is on one machine"),
    ([ARGO_SPEC, "data.shards=/data/shards"], "data.shards='/data/shards', on one machine"),
    ([ARGO_SPEC, "--only", "train"], "drop --dry-run, --only and --from"),
    ([ARGO_SPEC, "--rayjob-template", "nope.yaml"], "--rayjob-template 'nope.yaml': no such file"),
])
def test_an_unexportable_spec_is_one_line(args, message):
    proc = _export(*args)
    assert proc.returncode == 2 and not proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("avgk: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
