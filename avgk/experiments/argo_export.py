"""A pipeline spec as an Argo Workflow: the same graph, each stage a KubeRay RayJob on a cluster of its own.

    avgk pipeline configs/pipelines/plantnet300k.yaml --export argo > workflow.yaml
    kubectl apply -f infra/argo/rbac.yaml && argo submit workflow.yaml

One DAG task per stage, depending on the stages it needs. Each task creates a RayJob (the cluster
spec and submitter of a template, infra/kuberay/rayjob.yaml by default) whose entrypoint is
`avgk pipeline SPEC --only STAGE` with the command's overrides: the RayJob's cluster runs that
stage's cells and is deleted when the job ends. The task succeeds or fails with the RayJob
(status.jobStatus). Stages find each other's outputs through their records in run.storage, as in a
single `avgk pipeline` run, so run.storage and every data.shards must be in a bucket every cluster
reads; a retried task reuses the cells its stage finished and resumes the interrupted ones.

No Ray, torch or Kubernetes client here: hera (the Argo Workflows Python SDK) builds the workflow
from its models of Argo's schema.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from avgk.experiments.pipeline_plan import Plan
from avgk.experiments.pipeline_spec import PipelineSpecError
from avgk.runtime import storage

WORKFLOW_SERVICE_ACCOUNT = "avgk-workflow"
"""The service account the workflow's steps run as: infra/argo/rbac.yaml lets it create and watch RayJobs."""

_DNS = re.compile(r"[^a-z0-9-]+")


def _dns_name(name: str) -> str:
    """A Kubernetes-style name (lowercase letters, digits, '-') for a stage or pipeline name."""
    return _DNS.sub("-", name.lower()).strip("-")


def check_exportable(plan: Plan) -> None:
    """Each stage runs on its own cluster: every path the stages share must be in a bucket."""
    root = plan.base.run.storage
    if not storage.is_remote(root):
        raise PipelineSpecError(
            f"--export argo: run.storage={root!r} is on one machine, and each stage runs on a Ray cluster of its "
            "own: give run.storage a bucket every cluster reads (s3://...)")
    for cell in plan.cells.values():
        if not storage.is_remote(cell.config.data.shards):
            raise PipelineSpecError(
                f"--export argo: {cell.id} reads data.shards={cell.config.data.shards!r}, on one machine: give "
                "data.shards a bucket every cluster reads (s3://...)")
    names: dict[str, str] = {}
    for stage in plan.stage_order:
        dns = _dns_name(stage)
        if not dns or dns in names:
            raise PipelineSpecError(f"--export argo: stage {stage!r} has no Kubernetes name of its own "
                                    f"({dns!r}{', also ' + repr(names[dns]) if dns in names else ''}): rename it")
        names[dns] = stage


def load_template(path: str | Path) -> dict[str, Any]:
    """The RayJob every step copies (its cluster spec, submitter, retries)."""
    file = Path(path)
    if not file.is_file():
        raise PipelineSpecError(f"--export argo: --rayjob-template {str(path)!r}: no such file "
                                "(the project's is infra/kuberay/rayjob.yaml)")
    tree = yaml.safe_load(file.read_text())
    if not isinstance(tree, dict) or tree.get("kind") != "RayJob" or not isinstance(tree.get("spec"), dict):
        raise PipelineSpecError(f"--export argo: --rayjob-template {str(path)!r} must hold a KubeRay RayJob "
                                f"(kind: RayJob with a spec), got kind {tree.get('kind') if isinstance(tree, dict) else None!r}")
    return tree


def entrypoint(spec_path: str, stage: str, overrides: list[str]) -> str:
    """The command a stage's RayJob runs: this stage of the same spec, with the same overrides."""
    return shlex.join(["avgk", "pipeline", spec_path, "--only", stage, *overrides])


def stage_rayjob(template: dict[str, Any], *, pipeline: str, stage: str, command: str) -> dict[str, Any]:
    job = copy.deepcopy(template)
    metadata = job.setdefault("metadata", {})
    metadata.pop("name", None)  # a retried step creates a new RayJob: generated names never collide
    metadata["generateName"] = f"{_dns_name(pipeline)}-{_dns_name(stage)}-"
    metadata["labels"] = {**(metadata.get("labels") or {}), "avgk.pipeline": _dns_name(pipeline),
                          "avgk.stage": _dns_name(stage)}
    job["spec"]["entrypoint"] = command
    return job


def export_argo(plan: Plan, *, spec_path: str, overrides: list[str], template: dict[str, Any],
                retries: int = 2) -> dict[str, Any]:
    """The Argo Workflow (a dict, ready for yaml.safe_dump) that runs `plan` stage by stage as RayJobs."""
    from hera.workflows import DAG, Resource, RetryStrategy, Task, Workflow

    check_exportable(plan)
    name = _dns_name(plan.spec.name)
    with Workflow(
        generate_name=f"avgk-{name}-",
        entrypoint="pipeline",
        service_account_name=WORKFLOW_SERVICE_ACCOUNT,
        parallelism=plan.spec.max_concurrent,
        labels={"app.kubernetes.io/name": "avgk", "avgk.pipeline": name},
        annotations={"avgk.spec": spec_path, "avgk.overrides": shlex.join(overrides)},
    ) as workflow:
        templates = {}
        for stage in plan.stage_order:
            job = stage_rayjob(template, pipeline=plan.spec.name, stage=stage,
                               command=entrypoint(spec_path, stage, overrides))
            templates[stage] = Resource(
                name=f"stage-{_dns_name(stage)}",
                action="create",
                set_owner_reference=True,  # the RayJobs go when the workflow is deleted
                manifest=yaml.safe_dump(job, sort_keys=False),
                success_condition="status.jobStatus == SUCCEEDED",
                failure_condition="status.jobStatus == FAILED",
                retry_strategy=RetryStrategy(limit=retries, retry_policy="Always"),
            )
        with DAG(name="pipeline"):
            tasks = {stage: Task(name=_dns_name(stage), template=templates[stage]) for stage in plan.stage_order}
            for stage in plan.stage_order:
                for need in plan.spec.stages[stage].needs:
                    tasks[need] >> tasks[stage]
    result: dict[str, Any] = workflow.to_dict()
    return result


def workflow_yaml(plan: Plan, *, spec_path: str, overrides: list[str], template_path: str | Path) -> str:
    """`avgk pipeline SPEC --export argo`'s output: the workflow, validated, as YAML."""
    tree = export_argo(plan, spec_path=spec_path, overrides=overrides, template=load_template(template_path))
    validate_workflow(tree)
    return yaml.safe_dump(tree, sort_keys=False)


def validate_workflow(tree: dict[str, Any]) -> None:
    """Argo's schema (hera's models of it) accepts the workflow; raises ValueError naming what it does not."""
    from hera.workflows.models import Workflow as WorkflowModel
    from pydantic import ValidationError

    try:
        WorkflowModel.model_validate(tree)
    except ValidationError as err:
        raise ValueError(f"not a valid Argo Workflow: {err}") from None
