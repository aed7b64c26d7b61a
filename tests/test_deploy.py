"""compose.yaml validates with docker-compose and holds what a GPU host needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import yaml

from stepcast.settings import Settings, WorkerSettings
from tests.conftest import ROOT


def rendered(*profiles: str, **variables: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make deps` installs it (Debian's docker-compose)"
    chosen = [argument for profile in profiles for argument in ("--profile", profile)]
    command = [binary, "-f", str(ROOT / "compose.yaml"), *chosen, "config"]
    path = {"PATH": os.environ["PATH"]}
    bare = subprocess.run(command, capture_output=True, text=True, timeout=60, env=path)
    assert bare.returncode != 0 and "STEPCAST_SESSION_SECRET" in bare.stderr  # no insecure default
    env = {**path, "STEPCAST_SESSION_SECRET": "s3cret", **variables}
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    config: dict[str, Any] = yaml.safe_load(run.stdout)
    return config


def seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(value[:-1]) * units[value[-1]]


def test_compose_validates_and_wires_a_gpu_host() -> None:
    services = rendered()["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "server", "gpu_worker"} <= set(services)
    for name in ("postgres", "redis", "minio", "server", "gpu_worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "mc mb" in " ".join(services["minio-bucket"]["command"])  # the bucket is created
    redis = services["redis"]["command"]  # bounded, and full refuses writes rather than evict
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in redis

    worker = services["gpu_worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(str(volume).endswith(":/models:ro") for volume in worker["volumes"])
    assert worker["healthcheck"]["test"][:3] == ["CMD", "stepcast", "worker-alive"]
    grace = float(worker["environment"]["STEPCAST_SHUTDOWN_GRACE_S"])
    assert seconds(worker["stop_grace_period"]) > grace  # hand-back happens before the kill

    # The schema is migrated once, before any server or worker starts (they only check it).
    assert services["migrate"]["command"] == ["stepcast", "migrate"]
    for name in ("server", "gpu_worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name

    server = services["server"]
    assert server["ports"] == [{"published": "8000-8009", "target": 8000}]  # room for --scale server=N
    env = server["environment"]
    assert env["STEPCAST_STORAGE"] == "s3" and env["STEPCAST_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("server", "gpu_worker"):  # a log collector reads JSON, terminal or not
        assert services[name]["environment"]["STEPCAST_LOG_FORMAT"] == "json", name
    for variable in env:  # every variable set is a real setting
        assert variable.removeprefix("STEPCAST_").lower() in Settings.model_fields, variable


def test_compose_runs_a_pool_per_model() -> None:
    """gpu_worker_sdxl (--profile sdxl) is gpu_worker for another model: its own name, directory
    and default size (unset: the model's native 1024), the same GPU, probes and shutdown."""
    services = rendered()["services"]
    first, second = services["gpu_worker"], services["gpu_worker_sdxl"]
    assert second["profiles"] == ["sdxl"]
    env = second["environment"]
    worker_env = {name: value for name, value in env.items() if name != "STEPCAST_SESSION_SECRET"}
    settings = WorkerSettings(
        **{name.removeprefix("STEPCAST_").lower(): value for name, value in worker_env.items()}
    )
    assert (settings.model_name, settings.model_dir, settings.default_size_px) == (
        "sdxl",
        "/models/sdxl",
        None,
    )
    assert first["environment"]["STEPCAST_MODEL_NAME"] != "sdxl"
    for key in ("deploy", "healthcheck", "stop_grace_period", "volumes", "command", "depends_on"):
        assert second[key] == first[key], key


def test_compose_can_put_the_event_plane_on_a_redis_cluster() -> None:
    """By default the events share `redis`; `--profile cluster` adds a Redis Cluster of three
    primaries and three replicas, and two variables move the events onto it."""
    plain = rendered()["services"]
    assert all(service["profiles"] == ["cluster"] for name, service in plain.items() if "cluster" in name)
    settings = Settings(**{"event_redis_url": plain["server"]["environment"]["STEPCAST_EVENT_REDIS_URL"]})
    assert settings.event_redis_url is None and not settings.event_redis_cluster

    url = "redis://redis-cluster-1:6379"
    services = rendered("cluster", STEPCAST_EVENT_REDIS_URL=url, STEPCAST_EVENT_REDIS_CLUSTER="true")[
        "services"
    ]
    nodes = {name: service for name, service in services.items() if name.startswith("redis-cluster-")}
    assert set(nodes) == {f"redis-cluster-{n}" for n in range(1, 7)} | {"redis-cluster-create"}
    for name in (f"redis-cluster-{n}" for n in range(1, 7)):
        node = nodes[name]
        command = " ".join(node["command"])
        assert node["profiles"] == ["cluster"] and node["hostname"] == name
        assert "--cluster-enabled yes" in command and "--maxmemory-policy noeviction" in command
        assert node["healthcheck"]["test"]
    create = " ".join(nodes["redis-cluster-create"]["command"])
    assert "--cluster create --cluster-replicas 1" in create
    assert set(nodes["redis-cluster-create"]["depends_on"]) == {f"redis-cluster-{n}" for n in range(1, 7)}
    for name in ("server", "gpu_worker"):
        env = services[name]["environment"]
        chosen = Settings(
            event_redis_url=env["STEPCAST_EVENT_REDIS_URL"],
            event_redis_cluster=env["STEPCAST_EVENT_REDIS_CLUSTER"],
        )
        assert chosen.event_redis_url == url and chosen.event_redis_cluster, name
        assert env["STEPCAST_REDIS_URL"] == "redis://redis:6379/0"  # the queue stays on its own Redis
