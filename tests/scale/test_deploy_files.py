"""deploy/: every manifest parses; the Serve config builds the worker application as `serve run` would; the
RayService, Kubernetes and systemd examples agree with it and with the CLI. Nothing here starts Ray."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from kleinserve.cli import build_parser
from kleinserve.deploy import SHUTDOWN_MARGIN_S, GPUWorker, QueueDepthPolicy, WorkerArgs
from kleinserve.scale import Scale

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = {"kleinserve-api.service": "api", "kleinserve-worker@.service": "worker"}


def _documents(name: str) -> list[Any]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def _serve_config() -> dict[str, Any]:
    [config] = _documents("serve.yaml")
    return config


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    """kubernetes.yaml's objects of `kind`, by name."""
    return {doc["metadata"]["name"]: doc for doc in _documents("kubernetes.yaml") if doc["kind"] == kind}


def _parse_cli(argv: list[str]) -> None:
    """`argv` (after the program name) must be accepted by kleinserve's own parser (exit 2 otherwise)."""
    build_parser().parse_args(argv)


@pytest.mark.parametrize("name", sorted(path.name for path in DEPLOY.glob("*.yaml")))
def test_every_yaml_file_parses(name: str) -> None:
    documents = _documents(name)
    assert documents and all(isinstance(document, dict) for document in documents)


def test_the_serve_config_builds_the_worker_application() -> None:
    config = ServeDeploySchema.model_validate(_serve_config())
    [application] = config.applications
    assert application.route_prefix is None  # workers pull; nothing is routed to them
    # What `serve run deploy/serve.yaml` and the controller do with an application (ray/serve/scripts.py
    # and _private/api.py, 2.60): import the builder, call it with `args`, build the deployments.
    bound = call_user_app_builder_with_args_if_necessary(
        import_attr(application.import_path), application.args
    )
    [deployment] = build_app(bound, name=application.name).deployments

    args = WorkerArgs.model_validate(application.args)
    assert deployment.func_or_class is GPUWorker
    assert deployment.ray_actor_options == {"num_gpus": 1, "num_cpus": args.num_cpus}
    worker_config, drain_timeout_s = deployment.init_args
    assert worker_config.scale == Scale(args.database_url, args.media_url, args.data_dir, args.lease_s)
    assert (worker_config.model.model, worker_config.model.download, worker_config.max_batch) == (
        args.model,
        args.download,
        args.max_batch,
    )
    assert drain_timeout_s == args.drain_timeout_s
    # Ray has no public accessor for the rest of a deployment's options.
    options = deployment._deployment_config
    assert options.graceful_shutdown_timeout_s == args.drain_timeout_s + SHUTDOWN_MARGIN_S
    autoscaling = options.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (args.min_replicas, args.max_replicas)
    assert autoscaling.target_ongoing_requests == args.target_queued_per_replica
    assert autoscaling.policy.get_policy() is QueueDepthPolicy
    assert autoscaling.policy.policy_kwargs == {
        "database_url": args.database_url,
        "models": [args.model_name],
        "poll_interval_s": args.poll_interval_s,
    }


def test_the_rayservice_embeds_the_serve_config() -> None:
    [service] = _documents("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _serve_config()

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    [group] = cluster["workerGroupSpecs"]
    [container] = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The kubelet must not kill a pod before Serve's graceful shutdown (the drain) is over.
    [application] = _serve_config()["applications"]
    graceful_s = application["args"]["drain_timeout_s"] + SHUTDOWN_MARGIN_S
    assert group["template"]["spec"]["terminationGracePeriodSeconds"] > graceful_s


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_units_start_the_cli(name: str) -> None:
    unit = configparser.ConfigParser(interpolation=None)  # strict: a repeated key is an error
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / name).read_text())
    assert unit.sections() == ["Unit", "Service", "Install"]
    program, *argv = shlex.split(unit["Service"]["ExecStart"])
    assert program.endswith("/bin/kleinserve") and argv[0] == UNITS[name]
    # systemd expands ${VAR} from EnvironmentFile= and %i to the instance (the GPU index).
    _parse_cli([re.sub(r"\$\{\w+\}|%i", "0", arg) for arg in argv])
    assert unit["Service"]["KillSignal"] == "SIGTERM"  # drains


@pytest.mark.parametrize("name", ["kleinserve-api", "kleinserve-worker"])
def test_kubernetes_deployments_start_the_cli(name: str) -> None:
    [container] = _by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    program, *argv = container["command"]
    assert program == "kleinserve" and name == f"kleinserve-{argv[0]}"
    settings = _by_kind("ConfigMap")["kleinserve"]["data"]
    # Kubernetes expands $(VAR) in a command from the container's environment (the ConfigMap here).
    _parse_cli([re.sub(r"\$\((\w+)\)", lambda match: settings[match[1]], arg) for arg in argv])
