"""Entrypoint of the MLflow server image (compose.yaml): PostgreSQL stores, S3 artifacts, basic-auth.

Everything comes from the environment (compose.yaml passes it from .env); nothing secret is on
the command line, in the image or in the repository:

    POSTGRES_USER, POSTGRES_PASSWORD          PostgreSQL login (required)
    POSTGRES_HOST=postgres, POSTGRES_PORT=5432
    POSTGRES_DB=mlflow                        runs, experiments, model registry
    MLFLOW_AUTH_DB=mlflow_auth                users and permissions (created by initdb.sql)
    MLFLOW_ARTIFACTS_DESTINATION              s3://bucket/prefix; MLflow proxies every artifact (required)
    MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   first admin, created at the first start (required)
    MLFLOW_FLASK_SERVER_SECRET_KEY            signs the auth app's sessions, equal across workers (required)
    MLFLOW_DEFAULT_PERMISSION=READ            what a user may do on experiments they did not create
    MLFLOW_ALLOWED_HOSTS                      Host names clients use, comma-separated (default: MLflow's,
                                              localhost and private addresses)
    MLFLOW_WORKERS=4

Passwords are percent-encoded into the database URIs, which reach MLflow through
MLFLOW_BACKEND_STORE_URI and a basic_auth.ini written with mode 0600.

`serve.py upgrade` migrates the tracking database after an MLflow upgrade instead of serving
(`docker compose run --rm mlflow upgrade`); the auth database migrates itself at start.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from urllib.parse import quote

REQUIRED = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
PORT = 5000


def postgres_uri(env: Mapping[str, str], database: str) -> str:
    user = quote(env["POSTGRES_USER"], safe="")
    password = quote(env["POSTGRES_PASSWORD"], safe="")
    host = env.get("POSTGRES_HOST") or "postgres"
    port = env.get("POSTGRES_PORT") or "5432"
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def auth_config(env: Mapping[str, str]) -> str:
    """basic_auth.ini: the user store in PostgreSQL; the admin comes from MLFLOW_AUTH_ADMIN_* itself."""
    database_uri = postgres_uri(env, env.get("MLFLOW_AUTH_DB") or "mlflow_auth")
    return (
        "[mlflow]\n"
        f"default_permission = {env.get('MLFLOW_DEFAULT_PERMISSION') or 'READ'}\n"
        # configparser reads '%' as interpolation: percent-encoded passwords need it doubled.
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def server_command(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) that start the server; the store URI goes by environment."""
    argv = [
        "mlflow", "server",
        "--app-name", "basic-auth",
        "--serve-artifacts",
        "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"],
        # Inside the container: compose publishes the port (on 127.0.0.1 unless told otherwise).
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--workers", env.get("MLFLOW_WORKERS") or "4",
    ]
    if env.get("MLFLOW_ALLOWED_HOSTS"):
        argv += ["--allowed-hosts", env["MLFLOW_ALLOWED_HOSTS"]]
    extra = {"MLFLOW_BACKEND_STORE_URI": postgres_uri(env, env.get("POSTGRES_DB") or "mlflow")}
    return argv, extra


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        print(f"serve.py: set {', '.join(missing)} (see infra/mlflow/.env.example)", file=sys.stderr)
        return 2
    if argv == ["upgrade"]:
        upgrade = ["mlflow", "db", "upgrade", postgres_uri(env, env.get("POSTGRES_DB") or "mlflow")]
        os.execvpe(upgrade[0], upgrade, env)
    if argv:
        print(f"serve.py: unknown arguments {argv}; none serves, 'upgrade' migrates the database", file=sys.stderr)
        return 2
    config_dir = tempfile.mkdtemp(prefix="mlflow-auth-")
    config_path = os.path.join(config_dir, "basic_auth.ini")
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth_config(env))
    argv, extra = server_command(env)
    env.update(extra, MLFLOW_AUTH_CONFIG_PATH=config_path)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
