"""The Kubernetes manifests render, validate, and keep the promises docs/scaling.md makes.

Every kustomization under deploy/k8s (the base and each overlay) is rendered
with `kubectl kustomize`, validated offline with kubernetes-validate --strict
(built-in kinds; KEDA's custom resources have no schema there and are checked
by shape below), and its objects are checked for what a cluster would only
reveal in production: probes, GPU limits, a shutdown grace that outlasts a
job, non-root read-only containers, workers closed to ingress, real setting
names. The KEDA query runs against the real schema in a test database.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import asyncpg
import pytest
import yaml

from stepcast import settings as settings_module
from stepcast.db import Database
from stepcast.errors import ConfigError
from stepcast.settings import Settings
from tests.conftest import ROOT, fox_params, model_queue

K8S = ROOT / "deploy" / "k8s"
# Every kustomization that renders on its own: the base and each overlay (components, the
# worker pool and an overlay's pools only render inside one).
TARGETS = sorted(
    str(path.parent.relative_to(K8S))
    for path in [K8S / "base" / "kustomization.yaml", *K8S.glob("overlays/*/kustomization.yaml")]
)
GPU = "overlays/gpu"
GPU_REDIS_CLUSTER = "overlays/gpu-redis-cluster"  # the gpu overlay, its events on a Redis Cluster
GPU_TARGETS = {GPU, GPU_REDIS_CLUSTER}
# The targets that scale workers with KEDA; the others run a fixed worker count.
KEDA_TARGETS = GPU_TARGETS
# Custom resources kubernetes-validate has no schema for (it would only warn).
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
# The oldest and the newest Kubernetes the manifests must validate against.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
PLACEHOLDER = "REPLACE_ME"
FILLED = secrets.token_hex(32)  # what an operator puts in place of each placeholder

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One target's `kubectl kustomize` output: the text and its objects."""

    target: str
    text: str
    objects: tuple[Obj, ...]

    def all(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def named(self, kind: str, name: str) -> Obj:
        found = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.target}: expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def workloads(self, component: str) -> list[Obj]:
        """The Deployments of a component (server; worker: one pool per model)."""
        found = [
            obj
            for obj in self.all("Deployment")
            if pod_labels(obj).get("app.kubernetes.io/component") == component
        ]
        assert found, f"{self.target}: no {component} Deployment"
        return found

    def workload(self, component: str) -> Obj:
        """The one Deployment of a component (the server)."""
        [found] = self.workloads(component)
        return found

    def env(self, container: Obj) -> dict[str, str]:
        """The container's environment as the kubelet builds it: envFrom first, then env."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.named("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
            if "secretRef" in source:
                env.update(secret_values(self.named("Secret", source["secretRef"]["name"])))
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = str(variable["value"])
                continue
            source = variable.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                values = secret_values(self.named("Secret", ref["name"]))
                assert ref["key"] in values, f"{self.target}: {variable['name']} names a missing Secret key"
                env[variable["name"]] = values[ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[variable["name"]] = self.named("ConfigMap", ref["name"])["data"][ref["key"]]
            else:
                env[variable["name"]] = "<from the pod>"
        return env

    def settings(self, container: Obj, *, filled: bool = True) -> Settings:
        """The settings the container's process would start with (an invalid value fails here),
        once every placeholder is filled in (``filled=False``: as they stand)."""
        overrides: dict[str, Any] = {
            name.removeprefix("STEPCAST_").lower(): value.replace(PLACEHOLDER, FILLED) if filled else value
            for name, value in self.env(container).items()
            if name.startswith("STEPCAST_")
        }
        for name, value in overrides.items():  # a list setting is JSON in the environment
            if value.startswith("["):
                overrides[name] = json.loads(value)
        return settings_module.load(**overrides)


@functools.cache
def render(target: str) -> Rendered:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: it renders the manifests (kubectl kustomize)"
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"kubectl kustomize {target} failed: {run.stderr}"
    objects = tuple(obj for obj in yaml.safe_load_all(run.stdout) if obj)
    return Rendered(target, run.stdout, objects)


def secret_values(secret: Obj) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def pod_templates(rendered: Rendered) -> list[tuple[str, Obj]]:
    """Every pod spec in the render, named by its owner."""
    found = []
    for obj in rendered.objects:
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            found.append((name, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            found.append((name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            found.append((name, obj["spec"]))
    return found


def containers(pod: Obj) -> list[Obj]:
    all_containers: list[Obj] = [*pod.get("initContainers", []), *pod["containers"]]
    return all_containers


def only_container(workload: Obj) -> Obj:
    pod = workload["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1, f"{workload['metadata']['name']}: expected one container"
    container: Obj = pod["containers"][0]
    return container


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Does a Kubernetes label selector (matchLabels + matchExpressions) match these labels?"""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def port_number(container: Obj, port: int | str) -> int:
    """A probe's or Service's port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} is not a named port of container {container['name']}"
    return int(named[port])


def writable_mounts(pod: Obj, container: Obj) -> dict[str, Obj]:
    """Mount path -> volume, for every mount the container may write to."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    return {
        mount["mountPath"]: volumes[mount["name"]]
        for mount in container.get("volumeMounts", [])
        if not mount.get("readOnly", False)
    }


def is_under(path: str, directory: str) -> bool:
    return PurePosixPath(directory) in PurePosixPath(path).parents


# -- rendering and validation ------------------------------------------------


def test_every_deployment_target_is_covered() -> None:
    assert {"base", "overlays/cpu", GPU} <= set(TARGETS), f"kustomizations found: {TARGETS}"


@pytest.mark.parametrize("target", TARGETS)
def test_renders_the_whole_stack(target: str) -> None:
    rendered = render(target)
    kinds = sorted(obj["kind"] for obj in rendered.objects)
    for kind, count in {
        "Namespace": 1, "ConfigMap": 1, "Secret": 1, "Deployment": 1 + len(rendered.workloads("worker")),
        "Service": 1, "Job": 1,
        "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 2, "NetworkPolicy": 2,
    }.items():  # fmt: skip
        assert kinds.count(kind) == count, f"{target}: expected {count} {kind}, rendered {kinds}"
    namespace = rendered.all("Namespace")[0]["metadata"]["name"]
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "stepcast", (
            f"{target}: {obj['kind']} {obj['metadata']['name']} lacks app.kubernetes.io/name=stepcast"
        )
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, (
                f"{target}: {obj['kind']} {obj['metadata']['name']} is not in namespace {namespace}"
            )
    assert (
        rendered.all("Namespace")[0]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
        == "restricted"
    ), f"{target}: the namespace does not enforce the restricted Pod Security Standard"


@pytest.mark.parametrize("target", TARGETS)
def test_validates_strictly_against_kubernetes_schemas(target: str, tmp_path: Path) -> None:
    rendered = render(target)
    builtin = [obj for obj in rendered.objects if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(manifest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = run.stdout + run.stderr
    # Fail on warnings too: a kind without a schema (a typo in apiVersion) only warns.
    problems = "\n".join(line for line in output.splitlines() if not line.startswith("INFO"))
    assert run.returncode == 0 and not problems, f"{target}: kubernetes-validate --strict:\n{problems}"
    passed = output.count(" passed for resource ")
    assert passed == len(builtin) * len(KUBERNETES_VERSIONS), (
        f"{target}: not every object validated:\n{output}"
    )


# -- probes, ports, shutdown -------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_server_probes_readyz_and_healthz(target: str) -> None:
    rendered = render(target)
    server = rendered.workload("server")
    container = only_container(server)
    settings = rendered.settings(container)
    assert container["command"] == ["stepcast", "serve"], (
        f"{target}: the server does not run `stepcast serve`"
    )
    assert settings.host == "0.0.0.0", f"{target}: the server listens on {settings.host}, not on the pod's IP"

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert probe in container, f"{target}: the server has no {probe}"
        get = container[probe].get("httpGet", {})
        assert get.get("path") == path, (
            f"{target}: the server's {probe} is {container[probe]}, not GET {path}"
        )
        port = port_number(container, get["port"])
        assert port == settings.port, (
            f"{target}: the server's {probe} probes port {port}, not {settings.port}"
        )

    service = rendered.named("Service", server["metadata"]["name"])
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(server)), (
        f"{target}: the server Service does not select the server pods"
    )
    for port in service["spec"]["ports"]:
        target_port = port_number(container, port["targetPort"])
        assert target_port == settings.port, f"{target}: the Service sends traffic to port {target_port}"


@pytest.mark.parametrize("target", TARGETS)
def test_worker_liveness_is_its_own_heartbeat(target: str) -> None:
    rendered = render(target)
    for worker in rendered.workloads("worker"):
        check_worker_liveness(target, rendered, worker)


def check_worker_liveness(target: str, rendered: Rendered, worker: Obj) -> None:
    pod = worker["spec"]["template"]["spec"]
    container = only_container(worker)
    settings = rendered.settings(container)
    assert container["command"] == ["stepcast", "worker"], (
        f"{target}: the worker does not run `stepcast worker`"
    )

    assert settings.worker_alive_file is not None, f"{target}: STEPCAST_WORKER_ALIVE_FILE is not set"
    alive_file = str(settings.worker_alive_file)
    assert any(
        is_under(alive_file, path) and "emptyDir" in volume
        for path, volume in writable_mounts(pod, container).items()
    ), f"{target}: the heartbeat file {alive_file} is not on a writable emptyDir (the root is read-only)"

    for probe in ("startupProbe", "livenessProbe"):
        assert probe in container, f"{target}: the worker has no {probe}"
        command = container[probe].get("exec", {}).get("command", [])
        assert command[:2] == ["stepcast", "worker-alive"], (
            f"{target}: the worker's {probe} is {container[probe]}, not `stepcast worker-alive`"
        )
        max_age_s = float(command[command.index("--max-age") + 1]) if "--max-age" in command else 30.0
        assert max_age_s >= 5 * settings.heartbeat_s, (
            f"{target}: {probe} allows a heartbeat only {max_age_s} s old; "
            f"the worker beats every {settings.heartbeat_s} s"
        )
    startup = container["startupProbe"]
    budget_s = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3
    )
    assert budget_s >= 300, f"{target}: the startup probe gives a model load only {budget_s} s"


@pytest.mark.parametrize("target", TARGETS)
def test_worker_outlives_its_job_on_sigterm(target: str) -> None:
    rendered = render(target)
    for worker in rendered.workloads("worker"):
        check_worker_outlives_its_job(target, rendered, worker)


def check_worker_outlives_its_job(target: str, rendered: Rendered, worker: Obj) -> None:
    settings = rendered.settings(only_container(worker))
    grace_s = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    needed_s = settings.job_timeout_s + settings.shutdown_grace_s
    assert grace_s >= needed_s, (
        f"{target}: terminationGracePeriodSeconds {grace_s} < job time-out {settings.job_timeout_s} "
        f"+ shutdown grace {settings.shutdown_grace_s}: a scale-down could kill a job mid-run"
    )
    # What the ConfigMap's comment promises: the running job always finishes within the grace.
    assert settings.shutdown_grace_s >= settings.job_timeout_s, (
        f"{target}: shutdown grace {settings.shutdown_grace_s} s < job time-out {settings.job_timeout_s} s: "
        "a scale-down would hand long jobs back instead of letting them finish"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_worker_metrics_port_is_exposed(target: str) -> None:
    rendered = render(target)
    for worker in rendered.workloads("worker"):
        container = only_container(worker)
        settings = rendered.settings(container)
        check_worker_metrics(target, container, settings)


def check_worker_metrics(target: str, container: Obj, settings: Settings) -> None:
    assert settings.worker_metrics_port, (
        f"{target}: the worker serves no metrics (STEPCAST_WORKER_METRICS_PORT)"
    )
    assert settings.worker_metrics_host == "0.0.0.0", f"{target}: worker metrics listen on loopback only"
    assert port_number(container, "metrics") == settings.worker_metrics_port, (
        f"{target}: the container's metrics port is not STEPCAST_WORKER_METRICS_PORT"
    )


# -- GPUs --------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(GPU_TARGETS))
def test_gpu_workers_get_one_gpu_on_a_gpu_node(target: str) -> None:
    rendered = render(target)
    for worker in rendered.workloads("worker"):
        check_gpu_worker(rendered, worker)
    server = rendered.workload("server")
    assert "nvidia.com/gpu" not in str(server["spec"]["template"]["spec"]), "the server asks for a GPU"


def test_the_gpu_overlay_runs_one_pool_per_model_on_its_own_queue() -> None:
    rendered = render(GPU)
    pools = rendered.workloads("worker")
    models = [rendered.settings(only_container(pool)).model_name for pool in pools]
    assert sorted(models) == ["sd15", "sdxl"], f"the gpu overlay's pools serve {models}"
    for pool in pools:  # no Deployment's selector takes another pool's pods
        others = [other for other in pools if other is not pool]
        assert not any(selects(pool["spec"]["selector"], pod_labels(other)) for other in others), (
            f"{pool['metadata']['name']}'s selector matches another pool's pods"
        )
    # The servers take every pool's jobs before its first worker announces (pools start at zero).
    server = rendered.settings(only_container(rendered.workload("server")))
    assert set(models) <= {server.model_name, *server.models}, f"the servers know {server.models}"
    xl = next(pool for pool in pools if rendered.settings(only_container(pool)).model_name == "sdxl")
    settings = rendered.settings(only_container(xl))
    assert settings.default_size_px is None and str(settings.model_dir) == "/models/sdxl"


def test_an_overlay_puts_the_event_plane_on_a_redis_cluster() -> None:
    """Every server and worker of gpu-redis-cluster reads the cluster's URL (a placeholder to
    fill in) and cluster mode; the queue stays on STEPCAST_REDIS_URL; the base does neither."""
    plain = render("base")
    assert plain.settings(only_container(plain.workload("server"))).event_redis_url is None
    rendered = render(GPU_REDIS_CLUSTER)
    containers_of = [only_container(rendered.workload("server"))]
    containers_of += [only_container(pool) for pool in rendered.workloads("worker")]
    for container in containers_of:
        assert PLACEHOLDER in rendered.env(container)["STEPCAST_EVENT_REDIS_URL"]
        settings = rendered.settings(container)
        assert settings.event_redis_cluster and settings.event_redis_url is not None
        assert (
            settings.event_redis_url.startswith("rediss://")
            and settings.event_redis_url != settings.redis_url
        )
    secret = secret_values(rendered.named("Secret", "stepcast-secrets"))
    assert {"STEPCAST_DATABASE_URL", "STEPCAST_REDIS_URL", "STEPCAST_EVENT_REDIS_URL"} <= set(secret)


def check_gpu_worker(rendered: Rendered, worker: Obj) -> None:
    pod = worker["spec"]["template"]["spec"]
    container = only_container(worker)
    limits = container["resources"].get("limits", {})
    assert str(limits.get("nvidia.com/gpu")) == "1", (
        f"the gpu worker's limits are {limits}, not one nvidia.com/gpu"
    )
    assert pod.get("nodeSelector"), "the gpu worker has no nodeSelector for GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
        "the gpu worker does not tolerate the nvidia.com/gpu taint of GPU nodes"
    )
    settings = rendered.settings(container)
    assert settings.device == "cuda" and settings.dtype == "float16", (
        "the gpu worker does not run on cuda/fp16"
    )
    # The model comes from a read-only volume.
    mounts = [
        m for m in container.get("volumeMounts", []) if is_under(str(settings.model_dir), m["mountPath"])
    ]
    assert mounts and all(m.get("readOnly") for m in mounts), (
        f"the gpu worker's model dir {settings.model_dir} is not on a read-only mount"
    )


@pytest.mark.parametrize("target", [target for target in TARGETS if target not in GPU_TARGETS])
def test_cpu_targets_ask_for_no_gpu(target: str) -> None:
    rendered = render(target)
    assert "nvidia.com/gpu" not in rendered.text, f"{target}: mentions nvidia.com/gpu"
    [worker] = rendered.workloads("worker")
    settings = rendered.settings(only_container(worker))
    assert settings.device == "cpu", f"{target}: the worker runs on {settings.device}"
    assert settings.backend == "diffusers", f"{target}: the worker runs the {settings.backend} backend"
    assert settings.model_name == "tiny", (
        f"{target}: the worker serves {settings.model_name}, not the tiny model"
    )


# -- security ----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_unprivileged_and_read_only(target: str) -> None:
    templates = pod_templates(render(target))
    assert len(templates) >= 3, f"{target}: expected the server, worker and migration pods"
    for owner, pod in templates:
        where = f"{target}: {owner}"
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), f"{where} sets {field}"
        assert pod.get("automountServiceAccountToken") is False, f"{where} mounts a service account token"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), f"{where} mounts a hostPath"
        pod_context = pod.get("securityContext", {})
        for container in containers(pod):
            context = {**pod_context, **container.get("securityContext", {})}
            name = f"{where} container {container['name']}"
            assert context.get("runAsNonRoot") is True, f"{name} may run as root (runAsNonRoot)"
            assert context.get("runAsUser", 0) != 0, f"{name} runs as uid 0 or an unset uid"
            assert not context.get("privileged"), f"{name} is privileged"
            assert context.get("allowPrivilegeEscalation") is False, f"{name} allows privilege escalation"
            assert context.get("readOnlyRootFilesystem") is True, f"{name} has a writable root filesystem"
            capabilities = context.get("capabilities", {})
            assert "ALL" in capabilities.get("drop", []), f"{name} does not drop all capabilities"
            assert not capabilities.get("add"), f"{name} adds capabilities"
            seccomp = context.get("seccompProfile", {}).get("type")
            assert seccomp == "RuntimeDefault", f"{name} has seccomp profile {seccomp}"
            for path, volume in writable_mounts(pod, container).items():
                assert "emptyDir" in volume, f"{name} may write to {path}, which is not an emptyDir"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_sets_requests_and_limits(target: str) -> None:
    for owner, pod in pod_templates(render(target)):
        for container in containers(pod):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), (
                        f"{target}: {owner} container {container['name']} sets no {resource} {kind}"
                    )


@pytest.mark.parametrize("target", TARGETS)
def test_workers_admit_no_ingress_and_servers_admit_http(target: str) -> None:
    rendered = render(target)
    for worker in rendered.workloads("worker"):
        worker_labels = pod_labels(worker)
        policies = [
            p for p in rendered.all("NetworkPolicy") if selects(p["spec"]["podSelector"], worker_labels)
        ]
        assert policies, f"{target}: no NetworkPolicy selects the worker pods"
        for policy in policies:
            name = policy["metadata"]["name"]
            assert "Ingress" in policy["spec"].get("policyTypes", []), (
                f"{target}: {name} does not restrict ingress"
            )
            assert not policy["spec"].get("ingress"), f"{target}: {name} lets ingress reach the workers"
        for service in rendered.all("Service"):
            assert not selects({"matchLabels": service["spec"].get("selector", {})}, worker_labels), (
                f"{target}: Service {service['metadata']['name']} exposes the workers"
            )

    server = rendered.workload("server")
    container = only_container(server)
    settings = rendered.settings(container)
    allowed = {
        port_number(container, port["port"])
        for policy in rendered.all("NetworkPolicy")
        if selects(policy["spec"]["podSelector"], pod_labels(server))
        for rule in policy["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }
    assert settings.port in allowed, (
        f"{target}: no NetworkPolicy admits HTTP on port {settings.port} to servers"
    )


# -- settings ----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_stepcast_variable_is_a_real_setting(target: str) -> None:
    rendered = render(target)
    names = set(re.findall(r"\bSTEPCAST_[A-Z0-9_]+", rendered.text))
    assert names, f"{target}: sets no STEPCAST_ variable at all"
    unknown = sorted(n for n in names if n.removeprefix("STEPCAST_").lower() not in Settings.model_fields)
    assert not unknown, f"{target}: not settings (stepcast/settings.py): {unknown}"
    for owner, pod in pod_templates(rendered):
        for container in containers(pod):
            settings = rendered.settings(container)  # raises ConfigError naming a bad value
            where = f"{target}: {owner} container {container['name']}"
            assert rendered.env(container), f"{where} has no settings"
            assert settings.log_format == "json", f"{where} logs {settings.log_format}, not JSON"


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_are_marked_placeholders(target: str) -> None:
    for secret in render(target).all("Secret"):
        for key, value in secret_values(secret).items():
            assert PLACEHOLDER in value, f"{target}: Secret key {key} holds a value not marked {PLACEHOLDER}"


@pytest.mark.parametrize("target", TARGETS)
def test_a_server_applied_with_its_placeholders_refuses_to_start(target: str) -> None:
    rendered = render(target)
    with pytest.raises(ConfigError, match=r"STEPCAST_SESSION_SECRET: .*placeholder"):
        rendered.settings(only_container(rendered.workload("server")), filled=False)


@pytest.mark.parametrize("target", TARGETS)
def test_runs_the_migration_job(target: str) -> None:
    rendered = render(target)
    migrations = [
        container
        for job in rendered.all("Job")
        for container in job["spec"]["template"]["spec"]["containers"]
        if container.get("command", [])[:2] == ["stepcast", "migrate"]
    ]
    assert len(migrations) == 1, f"{target}: {len(migrations)} Jobs run `stepcast migrate`, expected one"
    # Only the pre steps: the old pods of a rolling update still run against the schema.
    assert migrations[0]["command"] == ["stepcast", "migrate", "--pre"], target
    assert "STEPCAST_DATABASE_URL" in rendered.env(migrations[0]), (
        f"{target}: the migration has no database URL"
    )


# -- scaling -----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_servers_scale_on_cpu_with_budgets(target: str) -> None:
    rendered = render(target)
    server = rendered.workload("server")
    [hpa] = rendered.all("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2", f"{target}: the HPA is {hpa['apiVersion']}"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", server["metadata"]["name"]), (
        f"{target}: the HPA scales {ref}, not the server Deployment"
    )
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert "cpu" in resources, f"{target}: the HPA does not scale on CPU ({hpa['spec']['metrics']})"
    assert "replicas" not in server["spec"], f"{target}: the server Deployment sets replicas the HPA owns"

    for workload in [rendered.workload("server"), *rendered.workloads("worker")]:
        labels = pod_labels(workload)
        budgets = [b for b in rendered.all("PodDisruptionBudget") if selects(b["spec"]["selector"], labels)]
        name = workload["metadata"]["name"]
        assert len(budgets) == 1, f"{target}: {len(budgets)} PodDisruptionBudgets cover the {name} pods"


@pytest.mark.parametrize("target", TARGETS)
def test_keda_scales_workers_from_the_job_table(target: str) -> None:
    rendered = render(target)
    workers = rendered.workloads("worker")
    scaled_objects = rendered.all("ScaledObject")
    if target not in KEDA_TARGETS:
        assert not scaled_objects, f"{target}: has a ScaledObject but is not listed in KEDA_TARGETS"
        return
    assert len(scaled_objects) == len(workers), (
        f"{target}: {len(scaled_objects)} ScaledObjects for {len(workers)} worker pools"
    )
    for worker in workers:  # each pool scaled on its own model's queue
        name = worker["metadata"]["name"]
        [scaled] = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == name]
        check_keda_scales(target, rendered, worker, scaled["spec"])


def check_keda_scales(target: str, rendered: Rendered, worker: Obj, spec: Obj) -> None:
    ref = spec["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment"), ref["name"]) == (
        "apps/v1", "Deployment", worker["metadata"]["name"],
    ), f"{target}: the ScaledObject scales {ref}, not the worker Deployment"  # fmt: skip
    assert spec.get("minReplicaCount") == 0, (
        f"{target}: minReplicaCount is {spec.get('minReplicaCount')}, not 0"
    )
    assert spec.get("maxReplicaCount", 100) >= 1, f"{target}: maxReplicaCount allows no worker"
    assert "replicas" not in worker["spec"], f"{target}: the worker Deployment sets replicas KEDA owns"
    for field in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec.get(field), int), (
            f"{target}: the ScaledObject leaves {field} at KEDA's default"
        )

    [trigger] = spec["triggers"]
    assert trigger["type"] == "postgresql", f"{target}: the trigger is {trigger['type']}, not postgresql"
    metadata = trigger["metadata"]
    assert float(metadata["targetQueryValue"]) == 1, f"{target}: targetQueryValue is not one job per worker"
    assert float(metadata.get("activationTargetQueryValue", 0)) == 0, (
        f"{target}: activationTargetQueryValue must be 0 "
        "(KEDA activates on count > it, so that one job wakes a worker)"
    )
    queue = model_queue(rendered.settings(only_container(worker)))
    assert f"queue = '{queue}'" in metadata["query"], f"{target}: the query does not count queue {queue!r}"

    auth = rendered.named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    [connection] = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "connection"]
    secret = secret_values(rendered.named("Secret", connection["name"]))
    assert connection["key"] == "STEPCAST_DATABASE_URL" and connection["key"] in secret, (
        f"{target}: KEDA does not connect with the workers' STEPCAST_DATABASE_URL"
    )


async def test_keda_query_counts_pending_and_processing_jobs_of_the_queue(database_url: str) -> None:
    """The first pool's query, on the real schema: its own model's queue and nothing else (the
    other pool's jobs among those it must not count)."""
    rendered = render(GPU)
    worker = rendered.named("Deployment", "stepcast-worker")
    [scaled_object] = [
        s for s in rendered.all("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == "stepcast-worker"
    ]
    [trigger] = scaled_object["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    activation = float(trigger["metadata"].get("activationTargetQueryValue", 0))
    per_worker = float(trigger["metadata"]["targetQueryValue"])
    queue = model_queue(rendered.settings(only_container(worker)))

    db = await Database.connect(database_url, max_size=2)
    try:

        async def count() -> float:
            # KEDA scans the single value into a float64.
            return float(await db.pool.fetchval(query))

        async def add(on_queue: str, status: str) -> None:
            params = fox_params(prompt="a red fox", steps=20)
            insertion = await db.jobs.insert(
                owner="k8s", params=params, preview=None, queue=on_queue, model_name="tiny",
                version="test", queue_ttl_s=0,
            )  # fmt: skip
            job = insertion.job
            assert job is not None
            await db.pool.execute(
                "UPDATE jobs SET status = $2::job_status,"
                " error_code = CASE WHEN $2 = 'failed' THEN 'pipeline_error' END WHERE id = $1",
                job.id, status,
            )  # fmt: skip

        assert await count() == 0, "the query counts jobs in an empty table"
        assert not await count() > activation, "KEDA would wake a worker with no job"
        await add(queue, "pending")
        assert await count() == 1, "the query does not count a pending job"
        assert await count() > activation, "one pending job would not wake a worker from zero"

        statuses = {"pending": 2, "processing": 3, "completed": 2, "failed": 1, "canceled": 1}
        for status, how_many in statuses.items():
            for _ in range(how_many):
                await add(queue, status)
                await add("stepcast:queue:sdxl", status)
        expected = 1 + statuses["pending"] + statuses["processing"]
        counted = await count()
        assert counted == expected, (
            f"the query counts {counted} jobs, not {expected} "
            f"(the pending and processing jobs of {queue!r}, and no others)"
        )
        assert math.ceil(counted / per_worker) == expected, "KEDA would not ask for one worker per job"
    except asyncpg.PostgresError as exc:
        raise AssertionError(f"the KEDA query fails on the real schema: {exc}\n{query}") from exc
    finally:
        await db.close()
