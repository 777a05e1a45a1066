"""deploy/: the image, the Kubernetes manifests and the Grafana dashboard.

Every kustomization is rendered with ``kubectl kustomize`` and validated against the
Kubernetes schemas (kubernetes-validate, offline); the custom resources (KEDA, Prometheus
Operator) are checked field by field. Then the cross-file invariants that break deployments
quietly: the ConfigMap is a config the relay loads, the probes and Prometheus hit the port the
config serves, the grace period covers the hand-off, KEDA never scales past the partitions, and
the dashboard and the scaler query metrics the relay exports.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from segment_relay.app import Relay
from segment_relay.config import RelayConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUSTOMIZE / "overlays").iterdir() if (path / "kustomization.yaml").is_file())
KUSTOMIZATIONS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
PLUGIN = ROOT / "examples" / "handler-plugin"

# The oldest Kubernetes the manifests support (preStop `sleep` is on by default from 1.30,
# PodDisruptionBudget.unhealthyPodEvictionPolicy is GA in 1.31) and the newest the schemas cover.
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {  # not in Kubernetes' schemas: checked by the tests below
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}
# After the drain: the final checkpoint (three tries, 1.5 s of pauses) and closing the source
# (Event Hubs releases its ownership blobs). Kinesis adds up to one lease duration on top.
HANDOFF_MARGIN_S = 10.0
# Values for settings that come from Secrets, shaped as the relay expects them.
SECRET_PLACEHOLDERS = {
    "SEGMENT_RELAY_STATE": "redis://:placeholder@redis.segment-relay.svc:6379/0",
    "SEGMENT_RELAY_EVENTHUBS__CONNECTION_STRING": (
        "Endpoint=sb://adobe-exports-ns.servicebus.windows.net/;SharedAccessKeyName=listen;"
        "SharedAccessKey=placeholder;EntityPath=adobe-exports"
    ),
    "SEGMENT_RELAY_EVENTHUBS__CHECKPOINT_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=https;AccountName=segmentrelaycheckpoints;AccountKey=cGxhY2Vob2xkZXI=;"
        "EndpointSuffix=core.windows.net"
    ),
}
SECRET_PLACEHOLDERS["SEGMENT_RELAY_DEAD_LETTER_SINK__AZBLOB_CONNECTION_STRING"] = \
    SECRET_PLACEHOLDERS["SEGMENT_RELAY_EVENTHUBS__CHECKPOINT_CONNECTION_STRING"]

Docs = tuple[dict[str, Any], ...]
PodConfig = Callable[[Docs], RelayConfig]

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH (kubectl kustomize renders the manifests)")


# --- helpers ---------------------------------------------------------------------------------------


@functools.cache
def render(kustomization: str) -> Docs:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZE / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: Docs, kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: Docs) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def relay_container(docs: Docs) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(docs)["containers"]
    assert len(containers) == 1, "one container: the relay"
    return containers[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def label_value(query: str, label: str) -> str | None:
    match = re.search(rf'\b{label}="([^"]*)"', query)
    return match[1] if match else None


@pytest.fixture
def pod_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PodConfig:
    """Loads the relay config a pod of a rendered kustomization runs with: the ConfigMap's file
    at the --config path, and the container's environment (Secrets as placeholders)."""

    def load(docs: Docs) -> RelayConfig:
        container = relay_container(docs)
        config_path = Path(container["args"][container["args"].index("--config") + 1])
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
        (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"]]
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                         and d["metadata"]["name"] == volume["configMap"]["name"]]
        toml = tmp_path / config_path.name
        toml.write_text(config_map["data"][config_path.name])
        for name in [name for name in os.environ if name.startswith("SEGMENT_RELAY_")]:
            monkeypatch.delenv(name)
        for name, item in env_of(container).items():
            source = item.get("valueFrom", {})
            if "value" in item:
                monkeypatch.setenv(name, item["value"])
            elif "fieldRef" in source:
                monkeypatch.setenv(name, "segment-relay-7d9f8c6b5-x2k4q")  # what metadata.name gives
            elif "secretKeyRef" in source:
                monkeypatch.setenv(name, SECRET_PLACEHOLDERS.get(name, "placeholder"))
        return load_config(toml)

    return load


def exported_metric_names() -> set[str]:
    """Every series name /metrics has once each kind of sample exists."""
    from segment_relay.consumer.claims import ClaimsSnapshot
    from segment_relay.consumer.pipeline import PipelineSnapshot
    from segment_relay.consumer.sources.base import SourceSnapshot
    from segment_relay.handlers.dispatch import HandlerSnapshot
    from segment_relay.histogram import Histogram
    from segment_relay.ops.metrics import RelaySnapshot, metrics_registry

    latency, sizes = Histogram(), Histogram()
    latency.observe(0.01)
    sizes.observe(10)
    pipeline = PipelineSnapshot(
        records_read=1, records_finished=1, records_dropped=0, invalid={"not_json": 1}, changes={("seg", "enter"): 1},
        stale=0, duplicate=0, filtered=0, dead_letters=1, in_flight_records=0, in_flight_bytes=0, profiles_waiting=0,
        checkpoints={"shard-0": 42}, checkpoints_written={"shard-0": 3}, checkpointed_at={"shard-0": 1.7e9},
        claims=ClaimsSnapshot(held=1, waits=1))
    handler = HandlerSnapshot(name="log", batch=True, calls=2, failed_calls=1, failures=1, dead_letters=1, dropped=0,
                              pending=0, circuit="closed", circuit_opened=0,
                              latency={"ok": latency, "error": latency}, batch_sizes=sizes)
    source = SourceSnapshot(owned=("shard-0",), lag_ms={"shard-0": 1000.0}, lag_events={"shard-0": 10})
    text = generate_latest(metrics_registry(lambda: RelaySnapshot(pipeline, (handler,), source))).decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\bsegment_relay_[a-z0-9_]+", expr))


# --- schemas ------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate_against_the_kubernetes_schemas(kustomization: str, version: str) -> None:
    docs = render(kustomization)
    kinds = sorted(doc["kind"] for doc in docs)
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount", "ServiceMonitor"]
    if kustomization != "base":
        expected.append("ScaledObject")
    if kustomization.startswith("overlays/eventhubs"):
        expected.append("TriggerAuthentication")
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                        f"Kubernetes {version}: {path}: {exc.message}")


# --- the pod --------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_pod_runs_unprivileged_on_a_read_only_root(kustomization: str) -> None:
    docs = render(kustomization)
    spec, container = pod_spec(docs), relay_container(docs)
    pod_security, security = spec["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"resources.{bound}"


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_config_map_is_a_config_the_relay_runs(kustomization: str, pod_config: PodConfig) -> None:
    docs = render(kustomization)
    config = pod_config(docs)
    relay = Relay(config)  # wires source, store, handlers and dead letter: every spec resolves

    if kustomization != "base":
        assert config.source.partition(":")[0] == kustomization.removeprefix("overlays/").split("-")[0]
    container = relay_container(docs)
    writable = {Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")}
    # The root filesystem is read-only: a dead-letter file must land on a volume.
    if "://" not in config.dead_letter:
        assert Path(config.dead_letter).parent in writable
    assert Path("/tmp") in writable
    assert relay.ops is not None and config.metrics_host == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == config.metrics_port


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_ask_the_ops_server(kustomization: str) -> None:
    container = relay_container(render(kustomization))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check = container[probe]
        assert check["httpGet"]["path"] == path, probe
        assert check["httpGet"]["port"] in ports, probe
    liveness = container["livenessProbe"]
    # A stuck loop shows as unanswered probes: the timeout must be short, one miss no restart.
    assert liveness["timeoutSeconds"] < liveness["periodSeconds"] and liveness["failureThreshold"] >= 2


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_hand_off(overlay: str, pod_config: PodConfig) -> None:
    docs = render(f"overlays/{overlay}")
    config = pod_config(docs)
    pre_stop = relay_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    source_release = config.kinesis.lease_duration_s if config.source.startswith("kinesis:") else 0.0
    needed = pre_stop + config.pipeline.shutdown_timeout_s + source_release + HANDOFF_MARGIN_S
    assert pod_spec(docs)["terminationGracePeriodSeconds"] >= needed


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cloud_identity_and_secrets(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    annotations = one(docs, "ServiceAccount")["metadata"].get("annotations", {})
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    env = env_of(relay_container(docs))
    toml = one(docs, "ConfigMap")["data"]["relay.toml"]
    assert "SharedAccessKey=" not in toml and "AccountKey=" not in toml  # secrets only in Secrets
    # Dead letters outlive the pod (an emptyDir goes with every rollout, drain and scale-in).
    assert tomllib.loads(toml)["dead_letter"].startswith({"kinesis": "s3://"}.get(overlay, "azblob://"))
    if overlay == "kinesis":
        assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert env["SEGMENT_RELAY_KINESIS__WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["AWS_REGION"]["value"]
    elif overlay == "eventhubs":
        assert annotations["azure.workload.identity/client-id"]
        assert pod_labels["azure.workload.identity/use"] == "true"
    else:
        for name in ("SEGMENT_RELAY_EVENTHUBS__CONNECTION_STRING", "SEGMENT_RELAY_EVENTHUBS__CHECKPOINT_CONNECTION_STRING",
                     "SEGMENT_RELAY_DEAD_LETTER_SINK__AZBLOB_CONNECTION_STRING"):
            assert "secretKeyRef" in env[name]["valueFrom"], name


# --- Service, ServiceMonitor, PodDisruptionBudget -------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_selectors_reach_the_pods_and_the_metrics_port(kustomization: str) -> None:
    docs = render(kustomization)
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selector_matches(service["spec"]["selector"], pod_labels)
    assert selector_matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert "replicas" not in deployment["spec"]  # KEDA owns the count; a number would be reset on apply

    container_ports = {port["name"] for port in relay_container(docs)["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert service_ports["metrics"]["targetPort"] in container_ports
    assert service["spec"]["publishNotReadyAddresses"] is True  # scrape replicas that start or drain

    monitor = one(docs, "ServiceMonitor")
    assert selector_matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports.keys()
    assert all(endpoint["path"] == "/metrics" for endpoint in monitor["spec"]["endpoints"])


# --- KEDA ------------------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_deployment_within_the_partition_count(overlay: str, pod_config: PodConfig) -> None:
    docs = render(f"overlays/{overlay}")
    config = pod_config(docs)
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    partitions = int(scaled["metadata"]["annotations"]["segment-relay.io/partition-count"])
    assert spec["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    metadata = trigger["metadata"]
    kind, _, stream = config.source.partition(":")

    if kind == "kinesis":
        assert trigger["type"] == "prometheus"
        query = metadata["query"]
        assert metrics_in(query) == {"segment_relay_partition_lag_seconds"}
        assert metrics_in(query) <= exported_metric_names()
        # The series carry the labels Prometheus Operator gives the ServiceMonitor's targets.
        assert label_value(query, "namespace") == one(docs, "Deployment")["metadata"]["namespace"]
        assert label_value(query, "job") == one(docs, "Service")["metadata"]["name"]
        assert float(metadata["threshold"]) > 0
        # No series is an error (the fallback then applies), not zero lag.
        assert metadata["ignoreNullValues"] == "false"
        return

    assert trigger["type"] == "azure-eventhub"
    section = config.eventhubs
    assert metadata["checkpointStrategy"] == "blobMetadata"  # the layout the SDK's BlobCheckpointStore writes
    assert metadata["blobContainer"] == section.checkpoint_container
    # KEDA lower-cases only the consumer group; the SDK lower-cases the whole blob name.
    assert metadata["consumerGroup"] == section.consumer_group == section.consumer_group.lower()
    assert metadata["eventHubName"] == stream == stream.lower()
    assert int(metadata["unprocessedEventThreshold"]) > 0
    authentication = [d for d in docs if d["kind"] == "TriggerAuthentication"
                      and d["metadata"]["name"] == trigger["authenticationRef"]["name"]]
    assert len(authentication) == 1, "authenticationRef names no TriggerAuthentication"
    auth_spec = authentication[0]["spec"]
    if section.fully_qualified_namespace is not None:  # workload identity, for the relay and for KEDA
        assert auth_spec["podIdentity"]["provider"] == "azure-workload"
        assert f"{metadata['eventHubNamespace']}.servicebus.windows.net" == section.fully_qualified_namespace
        assert section.checkpoint_account_url is not None
        assert urlsplit(section.checkpoint_account_url).hostname == f"{metadata['storageAccountName']}.blob.core.windows.net"
    else:  # KEDA reads the same Secret keys as the relay
        env = env_of(relay_container(docs))
        refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth_spec["secretTargetRef"]}
        for parameter, variable in (("connection", "SEGMENT_RELAY_EVENTHUBS__CONNECTION_STRING"),
                                    ("storageConnection", "SEGMENT_RELAY_EVENTHUBS__CHECKPOINT_CONNECTION_STRING")):
            secret = env[variable]["valueFrom"]["secretKeyRef"]
            assert refs[parameter] == (secret["name"], secret["key"]), parameter


# --- the images ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for these files)."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[last_from:]


def copied_sources(instructions: list[Instruction]) -> list[str]:
    """The build-context paths of every COPY/ADD (copies from another stage excluded)."""
    sources = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = instruction.args.split()
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def user_of(stage: list[Instruction]) -> str:
    users = [instruction.args for instruction in stage if instruction.keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    return users[-1]


def test_the_relay_image(pod_config: PodConfig) -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile")
    assert sum(instruction.keyword == "FROM" for instruction in instructions) >= 2, "multi-stage"
    base_image = next(i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9][.\d]*-slim(-\w+)?", base_image)
    stage = final_stage(instructions)

    user = user_of(stage)
    uid = user.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it, and the one the Deployment runs as.
    assert uid.isdigit() and int(uid) != 0
    if KUBECTL is not None:
        assert pod_spec(render("base"))["securityContext"]["runAsUser"] == int(uid)

    (entrypoint,) = [json.loads(i.args) for i in stage if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["segment-relay"]
    (command,) = [json.loads(i.args) for i in stage if i.keyword == "CMD"]
    assert command[:2] == ["run", "--config"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in stage if i.keyword == "ENV")))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # nothing written under a read-only root

    exposed = {int(port.split("/")[0]) for i in stage if i.keyword == "EXPOSE" for port in i.args.split()}
    base_config = load_config(KUSTOMIZE / "base" / "relay.toml")
    assert base_config.metrics_port in exposed

    for source in copied_sources(instructions):  # the build context is the repository root
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which does not exist"


def test_the_plugin_image_extends_the_relay_image() -> None:
    relay_user = user_of(final_stage(parse_dockerfile(DEPLOY / "Dockerfile")))
    instructions = parse_dockerfile(PLUGIN / "Dockerfile")
    assert instructions[0].keyword == "ARG" and instructions[0].args.startswith("RELAY_IMAGE=")
    assert [i.args for i in instructions if i.keyword == "FROM"] == ["${RELAY_IMAGE}"]
    assert user_of(instructions) == relay_user  # back to the unprivileged user after pip install
    assert not [i for i in instructions if i.keyword in ("ENTRYPOINT", "CMD")]  # the relay's own
    for source in copied_sources(instructions):  # the build context is the plug-in's directory
        assert (PLUGIN / source).exists(), f"the plug-in Dockerfile copies {source}, which does not exist"


# --- the dashboard -------------------------------------------------------------------------------------------------


def dashboard_queries() -> dict[str, list[str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "segment-relay.json").read_text())
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in dashboard["panels"] if panel["type"] != "row"
    }


def test_the_dashboard_queries_metrics_the_relay_exports() -> None:
    exported = exported_metric_names()
    queries = dashboard_queries()
    for title, exprs in queries.items():
        assert exprs, f"panel {title!r} has no query"
        for expr in exprs:
            unknown = metrics_in(expr) - exported
            assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which /metrics does not export"
            assert "$namespace" in expr and "$pod" in expr, f"panel {title!r} ignores the namespace/replica filter"


def test_the_dashboard_covers_what_operators_ask() -> None:
    used = set().union(*(metrics_in(expr) for exprs in dashboard_queries().values() for expr in exprs))
    for question, metric in [
        ("throughput", "segment_relay_records_read_total"),
        ("lag by shard or partition", "segment_relay_partition_lag_seconds"),
        ("checkpoints written", "segment_relay_checkpoints_total"),
        ("end-to-end latency", "segment_relay_record_latency_seconds_bucket"),
        ("how old changes are when handled", "segment_relay_change_age_seconds_bucket"),
        ("lag in events", "segment_relay_partition_lag_events"),
        ("changes by segment and type", "segment_relay_changes_total"),
        ("handler latency", "segment_relay_handler_latency_seconds_bucket"),
        ("handler errors", "segment_relay_handler_failures_total"),
        ("dead letters", "segment_relay_dead_letters_total"),
        ("partitions owned per replica", "segment_relay_partitions_owned"),
    ]:
        assert metric in used, f"no panel shows {question} ({metric})"


# --- the example plug-in -------------------------------------------------------------------------------
PLUGIN_OVERLAY = "../../examples/handler-plugin/deploy"


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_example_plugins_overlay_runs_one_writer_of_its_sqlite_file_on_a_persistent_volume(version: str) -> None:
    docs = render(PLUGIN_OVERLAY)
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)
    kinds = {doc["kind"] for doc in docs}
    assert "ScaledObject" not in kinds and "HorizontalPodAutoscaler" not in kinds  # no second replica, ever
    deployment = one(docs, "Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}  # the old pod stops before the new one opens the file
    claim = one(docs, "PersistentVolumeClaim")
    (data,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    (mount,) = [m for m in relay_container(docs)["volumeMounts"] if m["name"] == "data"]
    config = one(docs, "ConfigMap")["data"]["relay.toml"]
    handler = next(line for line in config.splitlines() if line.startswith("handlers"))
    assert f'"suppression-list:{mount["mountPath"]}/' in handler
    assert relay_container(docs)["image"].startswith("registry.example.com/segment-relay-suppression:")


# --- alerting rules --------------------------------------------------------------------------------------
RULES = DEPLOY / "prometheus"
PROMTOOL = os.environ.get("PROMTOOL") or next(
    (str(path) for path in (ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool",) if path.is_file()),
    shutil.which("promtool"))
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (`make promtool` unpacks Debian's)")


@needs_promtool
def test_the_alerting_rules_are_valid_and_fire_exactly_where_their_tests_say() -> None:
    assert PROMTOOL is not None
    for command in (["check", "rules", "segment-relay.rules.yaml"], ["test", "rules", "segment-relay.rules.test.yaml"]):
        result = subprocess.run([PROMTOOL, *command], cwd=RULES, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"


def test_every_alert_is_shown_firing_and_asks_only_for_metrics_the_relay_exports() -> None:
    rules = yaml.safe_load((RULES / "segment-relay.rules.yaml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((RULES / "segment-relay.rules.test.yaml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for name, rule in alerts.items():
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name} is never shown firing"
        assert metrics_in(rule["expr"]) <= exported_metric_names(), f"{name} asks for a metric /metrics lacks"
    # Silence is shown too: promtool compares the whole list of alerts, so every series of a test
    # that is not in a case's exp_alerts must stay silent; and some cases expect none at all.
    assert len([c for c in cases if not c["exp_alerts"]]) >= 4


def test_the_package_ships_its_type_hints_to_plugin_authors() -> None:
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["segment_relay"]  # PEP 561: without it a type checker sees Any
    assert (ROOT / "segment_relay" / "py.typed").is_file()
